"""Checkpoints load as plain data only."""

import pickle

import pytest
import torch

from gan_dist.models.io import STATE_FILE, CheckpointError, read_state
from gan_dist.train.checkpoint import save_checkpoint


class Payload:
    def __reduce__(self):  # would run code on an unsafe load
        return (print, ("pwned",))


def test_round_trip(tmp_path):
    state = {"g": {"w": torch.arange(3.0)}, "step": 5, "config": {"train": {"steps": 9}}}
    save_checkpoint(tmp_path, state)
    loaded = read_state(tmp_path)
    assert loaded["step"] == 5 and torch.equal(loaded["g"]["w"], torch.arange(3.0))
    assert "steps: 9" in (tmp_path / "config.yaml").read_text()


def test_pickled_object_is_refused(tmp_path):
    torch.save({"format_version": 1, "evil": Payload(), "config": {}}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="refusing"):
        read_state(tmp_path)


def test_plain_pickle_is_refused(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError):
        read_state(tmp_path)


def test_unknown_format_version_is_a_clear_error(tmp_path):
    torch.save({"format_version": 99, "config": {}}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="format 99"):
        read_state(tmp_path)


def test_missing_state_file(tmp_path):
    with pytest.raises(CheckpointError, match="no state.pt"):
        read_state(tmp_path)


def test_rollback_snapshot_is_a_host_copy_that_restores_the_modules():
    """The NaN rollback keeps ``host_copy`` of the training state: it must survive further steps (state
    dicts alias the live tensors) and bring G, D and the optimizers back exactly."""
    from gan_dist.config import build_config
    from gan_dist.train.checkpoint import restore_modules, training_state
    from gan_dist.train.modules import build_modules, parameter_digest
    from gan_dist.train.phases import host_copy
    from gan_dist.train.step import DiscriminatorBatch, GeneratorBatch, discriminator_step, generator_step

    cfg = build_config({"data": {"url": "/unused"}, "model": {"g_width": 8, "d_width": 8, "z_dim": 16},
                        "train": {"batch_size": 4}, "scaling": {"num_workers": 1}})  # fmt: skip
    device = torch.device("cpu")
    m = build_modules(cfg, device)
    real = torch.rand(4, 1, 32, 32) * 2 - 1
    discriminator_step(m, cfg, DiscriminatorBatch(real, torch.randn(4, 16)), 0)  # optimizer moments exist from here on
    generator_step(m, cfg, GeneratorBatch(torch.randn(4, 16)), 0)
    snapshot = host_copy({"step": 1, **training_state(m), "config": {}})
    digest, moments = parameter_digest(m), m.opt_d.state_dict()["state"][0]["exp_avg"].clone()

    for step in (1, 2):
        discriminator_step(m, cfg, DiscriminatorBatch(real, torch.randn(4, 16)), step)
        generator_step(m, cfg, GeneratorBatch(torch.randn(4, 16)), step)
    assert parameter_digest(m) != digest  # training moved on; the snapshot must not have

    restore_modules(m, snapshot)
    assert parameter_digest(m) == digest
    assert torch.equal(m.opt_d.state_dict()["state"][0]["exp_avg"], moments)
    assert "config" not in snapshot and all(t.device.type == "cpu" for t in snapshot["g"].values())
