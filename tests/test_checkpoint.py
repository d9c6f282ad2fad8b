"""Checkpoints load as plain data only."""

import pickle

import pytest
import torch

from gan_dist.train.checkpoint import STATE_FILE, CheckpointError, load_checkpoint, save_checkpoint


class Payload:
    def __reduce__(self):  # would run code on an unsafe load
        return (print, ("pwned",))


def test_round_trip(tmp_path):
    state = {"g": {"w": torch.arange(3.0)}, "step": 5, "config": {"train": {"steps": 9}}}
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path)
    assert loaded["step"] == 5 and torch.equal(loaded["g"]["w"], torch.arange(3.0))
    assert "steps: 9" in (tmp_path / "config.yaml").read_text()


def test_pickled_object_is_refused(tmp_path):
    torch.save({"format_version": 1, "evil": Payload(), "config": {}}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(tmp_path)


def test_plain_pickle_is_refused(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)


def test_unknown_format_version_is_a_clear_error(tmp_path):
    torch.save({"format_version": 99, "config": {}}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path)


def test_missing_state_file(tmp_path):
    with pytest.raises(CheckpointError, match="no state.pt"):
        load_checkpoint(tmp_path)
