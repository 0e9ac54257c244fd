"""Checkpoints: atomic writes survive a crash, round trips with RNG states, retention, latest()."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from soco_pretrain.engine import checkpoint as ckpt
from soco_pretrain.engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from soco_pretrain.train.lars import LARS, lars_param_groups


def small_state(step=0):
    torch.manual_seed(step)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = LARS(lars_param_groups(model, 1e-5), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return {
        "model": {"online": model.state_dict(), "target": model.state_dict()},
        "optimizer": opt.state_dict(),
        "step": step,
        "epoch": 1,
        "batch_in_epoch": 3,
        "rng": rng_state(),
        "scaler": {"scale": 65536.0, "growth_tracker": 0},
        "config": {"train": {"epochs": 100, "base_lr": 1.0}, "data": {"views": {"crop_scale": [0.5, 1.0]}}},
        "world_size": 1,
    }


def temps(directory):
    return [p for p in directory.rglob("*") if p.name.startswith(ckpt.TMP_PREFIX)]


def test_round_trip_with_tensors_and_rng(tmp_path):
    state = small_state(step=7)
    path = save_checkpoint(tmp_path / "a" / "c.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["config"] == state["config"] and loaded["scaler"] == state["scaler"]
    for key, value in state["model"]["online"].items():
        torch.testing.assert_close(loaded["model"]["online"][key], value)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    # The RNG states restore the exact streams.
    set_rng_state(loaded["rng"])
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_raw_numpy_rng_state_loads_safely(tmp_path):
    # A loop may store np.random.get_state() and numpy scalars directly: still loadable with weights_only.
    path = save_checkpoint(tmp_path / "c.pt", {"numpy": np.random.get_state(), "x": np.float64(1.5)})
    loaded = load_checkpoint(path)
    np.random.set_state(loaded["numpy"])
    assert loaded["x"] == 1.5


def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # some bytes reach the temp file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["step"] == 1
    assert temps(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_unreadable_and_missing_checkpoints_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_retention_keeps_last_and_keep_numbered(tmp_path):
    manager = CheckpointManager(tmp_path / "run", keep=2)
    assert manager.latest() is None
    for step in [10, 20, 30, 40]:
        assert manager.save({"step": step, "w": torch.full((2,), float(step))}) == manager.last
    directory = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["last.pt", "step_00000030.pt", "step_00000040.pt"]
    assert manager.latest() == directory / "last.pt"
    assert load_checkpoint(manager.latest())["step"] == 40
    assert [p.name for p in manager.numbered()] == ["step_00000030.pt", "step_00000040.pt"]
    # last.pt is an independent name: deleting the numbered file keeps it.
    (directory / "step_00000040.pt").unlink()
    assert load_checkpoint(directory / "last.pt")["step"] == 40
    (directory / "last.pt").unlink()
    assert manager.latest() == directory / "step_00000030.pt"


def test_keep_zero_writes_only_last(tmp_path):
    manager = CheckpointManager(tmp_path, keep=0)
    manager.save({"step": 5})
    manager.save({"step": 6})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.pt"]
    assert load_checkpoint(manager.latest())["step"] == 6


def test_stale_temp_files_are_removed_by_the_writer_not_by_readers(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / f"{ckpt.TMP_PREFIX}last.pt.abc").write_bytes(b"killed mid-write")
    reader = CheckpointManager(tmp_path, keep=1)  # e.g. soco export while the run still trains
    assert reader.latest() is None
    assert len(temps(tmp_path)) == 1  # may be another process's checkpoint in flight: left alone
    writer = CheckpointManager(tmp_path, keep=1)
    writer.save({"step": 1})
    assert temps(tmp_path) == []
    assert load_checkpoint(writer.latest())["step"] == 1


def test_link_fallback_copies(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError("hard links not supported")

    monkeypatch.setattr(ckpt.os, "link", no_links)
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save({"step": 1})
    manager.save({"step": 2})
    assert load_checkpoint(manager.last)["step"] == 2
    assert [p.name for p in manager.numbered()] == ["step_00000002.pt"]
    assert temps(tmp_path) == []
