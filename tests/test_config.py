"""Config: YAML + --set overrides, typed values, and errors that name the key."""

from pathlib import Path

import pytest
import yaml

from gan_dist.config import ConfigError, build_config, load_config

BASE = {"data": {"url": "/data/shards"}}


def _error_key(tree, overrides=()):
    with pytest.raises(ConfigError) as info:
        build_config(tree, overrides)
    return info.value.key, str(info.value)


def test_overrides_are_typed_by_yaml():
    cfg = build_config(BASE, ["train.steps=7", "optim.betas=[0.0, 0.99]", "scaling.use_gpu=false", "loss.name=hinge"])
    assert cfg.train.steps == 7
    assert cfg.optim.betas == (0.0, 0.99)
    assert cfg.scaling.use_gpu is False
    assert cfg.loss.name == "hinge"


def test_seed_defaults_match_the_dcgan_recipe():
    cfg = build_config(BASE)
    assert (cfg.optim.g_lr, cfg.optim.d_lr, cfg.optim.betas) == (2e-4, 2e-4, (0.5, 0.999))


def test_arch_defaults_are_resolved_into_the_effective_config():
    assert build_config(BASE).model.d_norm == "batch"
    resnet = build_config(BASE, ["model.arch=resnet"])
    assert resnet.model.d_norm == "none" and resnet.model.d_spectral_norm is True


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.bogus=1"], "train.bogus"),
        (["nosection.x=1"], "nosection"),
        (["train.steps=many"], "train.steps"),
        (["train.batch_size=3", "scaling.num_workers=4"], "train.batch_size"),  # a sample for every worker
        (["scaling.num_workers=[3,2]"], "scaling.num_workers"),
        (["loss.name=wgan-gp"], "model.d_norm"),  # dcgan's D defaults to BatchNorm
        (["data.resolution=48"], "data.resolution"),
        (["loss.name=bce"], "loss.name"),
        (["loss.r1_gamma=1"], "loss.r1_gamma"),  # R1 with dcgan's BatchNorm D
        (["loss.pl_weight=2"], "loss.pl_weight"),  # path length needs a style-based G
        (["train.accumulate=40"], "train.batch_size"),  # 2 workers x 40 micro-batches > 64 images
        (["model.channel_base=512"], "model.channel_base"),  # a stylegan2 key on dcgan
        (["model.arch=stylegan3"], "model.arch"),
        (["augment.kind=mixup"], "augment.kind"),
        (["optim.g_schedule.kind=linear"], "optim.g_schedule.kind"),
        (["trainsteps=3"], "trainsteps"),
    ],
)
def test_bad_configs_name_the_key(overrides, key):
    assert _error_key(BASE, overrides)[0] == key


def test_missing_data_url_is_reported():
    key, message = _error_key({})
    assert key == "data" and "missing" in message


def test_misplaced_arch_keys_name_the_arch():
    key, message = _error_key(BASE, ["model.arch=resnet", "model.mapping_layers=2"])
    assert key == "model.mapping_layers" and "model.arch=resnet" in message


def test_stylegan2_defaults_follow_stylegan2_ada():
    cfg = build_config(BASE, ["model.arch=stylegan2", "data.resolution=256", "train.batch_size=64", "scaling.num_workers=8"])
    assert cfg.loss.r1_gamma == pytest.approx(0.0002 * 256**2 / 64)  # the gamma heuristic
    assert cfg.loss.pl_weight == 2.0 and cfg.model.style_mixing == 0.9 and cfg.model.mapping_layers == 8
    assert build_config(BASE).loss.r1_gamma == 0.0 and build_config(BASE).loss.pl_weight == 0.0


def test_wgan_gp_without_batchnorm_is_accepted():
    cfg = build_config(BASE, ["loss.name=wgan-gp", "model.d_norm=none"])
    assert cfg.loss.name == "wgan-gp"


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"data": {"url": "shards"}, "tracking": {"uri": "sqlite:///m.db"}, "checkpoint": {"storage": "runs"}})
    assert cfg.data.url == str(tmp_path / "shards")
    assert cfg.checkpoint.storage == str(tmp_path / "runs")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'm.db'}"
    s3 = build_config({"data": {"url": "s3://b/p"}, "checkpoint": {"storage": "s3://b/runs"}})
    assert (s3.data.url, s3.checkpoint.storage) == ("s3://b/p", "s3://b/runs")


def test_run_names_are_fresh_unless_given():
    assert build_config(BASE).run.name != build_config(BASE).run.name
    assert build_config(BASE, ["run.name=mine"]).run.name == "mine"


def test_yaml_file_round_trip(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(build_config(BASE, ["train.steps=3"]).to_yaml())
    assert load_config(path).train.steps == 3
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_shipped_job_configs_validate():
    jobs = sorted((Path(__file__).parents[1] / "jobs").glob("*.yaml"))
    assert jobs, "jobs/ should ship configs"
    for job in jobs:
        load_config(job)


JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_the_elastic_4x8_job_is_valid_at_every_world_size_in_its_range():
    """16-32 workers share 64 images as 2 or 3 each (24 workers: both): minibatch-stddev keeps its group of 2
    on every rank (models/layers.py), so every size in the range is accepted."""
    cfg = load_config(JOBS / "ffhq_256_4x8.yaml")
    assert cfg.scaling.num_workers == (16, 32) and cfg.model.mbstd_group_size == 2


def test_a_world_size_that_would_break_minibatch_stddev_is_refused_naming_the_keys():
    # 48 images on 33..48 workers: some ranks get a single image, fewer than the group of 2
    key, message = _error_key(yaml.safe_load((JOBS / "ffhq_256_4x8.yaml").read_text()), ["train.batch_size=48", "scaling.num_workers=[16, 48]"])
    assert key == "model.mbstd_group_size"
    assert "scaling.num_workers" in message and "train.batch_size=48 on 25 workers" in message
    # micro-batches count too: 4 images per rank in micro-batches of 1 -> forwards of 1 < group 4
    key, _ = _error_key(BASE, ["model.arch=stylegan2", "train.batch_size=16", "scaling.num_workers=4", "train.micro_batch=1"])
    assert key == "model.mbstd_group_size"


def test_micro_batches_are_the_same_count_on_every_rank_and_never_empty():
    cfg = build_config(BASE, ["train.batch_size=8", "scaling.num_workers=3", "train.micro_batch=2"])
    assert cfg.micro_batches(3) == 2  # shares 2, 3, 3: every rank 2 micro-batches (1+1, 2+1, 2+1)
    assert cfg.micro_batches(1) == 4
    # shares 2 and 3 in micro-batches of 1 would give the rank of 2 an empty third micro-batch
    key, message = _error_key(BASE, ["train.batch_size=8", "scaling.num_workers=3", "train.micro_batch=1"])
    assert key == "train.micro_batch" and "empty" in message


def test_cross_key_errors_name_their_key_without_parsing_messages():
    key, message = _error_key(BASE, ["model.arch=mlp", "loss.pl_weight=1"])
    assert key == "loss.pl_weight" and message.startswith("loss.pl_weight: the path-length penalty")
    key, _ = _error_key(BASE, ["model.arch=dcgan", "model.conditional=true", "model.num_classes=3", "model.g_batchnorm=false"])
    assert key == "model.g_batchnorm"
