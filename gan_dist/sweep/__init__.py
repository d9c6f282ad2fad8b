"""``gan-dist sweep``: hyper-parameter search over job-config keys with Ray Tune (random, grid, ASHA, PBT), each
trial a gan_dist training run nested under the sweep's MLflow run (docs/sweeps.md)."""
