"""Checkpoints: atomic writes survive a crash, round trips with RNG states, checksums, last.pt as
a hard link to the newest numbered file (its bytes on disk once), retention (and what it spares),
latest() and its fallback."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
from collections import namedtuple

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
from soco_pretrain.errors import PathError, one_line
from soco_pretrain.files import WriteError, human_bytes
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
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(WriteError, match="No space") as info:
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert str(info.value).startswith(f"{path}: cannot write") and "\n" not in str(info.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["step"] == 1
    assert temps(tmp_path) == []
    # The old checksum file went first: the intact old checkpoint loads (unverified).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_unreadable_and_missing_checkpoints_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(PathError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_retention_keeps_last_and_keep_numbered(tmp_path):
    manager = CheckpointManager(tmp_path / "run", keep=2)
    assert manager.latest() is None
    for step in [10, 20, 30, 40]:
        assert manager.save({"step": step, "w": torch.full((2,), float(step))}) == manager.last
    directory = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == [
        "last.pt",
        "last.pt.sha256",
        "step_00000030.pt",
        "step_00000030.pt.sha256",
        "step_00000040.pt",
        "step_00000040.pt.sha256",
    ]
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
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "last.pt.sha256"]
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


# ---------------------------------------------------------------- last.pt, checksums, fallback


def flip_a_tensor_byte(path):
    # A bit flip inside tensor data: torch.load still succeeds and returns a wrong value.
    data = bytearray(path.read_bytes())
    at = data.find(bytes(4 * 64))  # the zeros of small_tensor_state's tensor
    data[at + 10] ^= 0xFF
    path.write_bytes(bytes(data))


def small_tensor_state(step):
    return {"step": step, "w": torch.zeros(256)}


def disk_bytes(directory) -> int:
    """Bytes the checkpoint files take on disk: each file (inode) once, as ``du`` counts them."""
    files = {(st.st_dev, st.st_ino): st.st_blocks * 512 for p in directory.glob("*.pt") if (st := p.stat())}
    return sum(files.values())


def test_last_is_a_hard_link_and_each_checkpoint_is_on_disk_once(tmp_path):
    # The demo wrote 2.0 GB when last.pt was a second copy of the newest numbered file.
    manager = CheckpointManager(tmp_path, keep=2)
    state = {"step": 10, "w": torch.zeros(1 << 18)}  # 1 MiB of tensor data
    manager.save(state)
    manager.save({**state, "step": 20})
    newest = manager.directory / "step_00000020.pt"
    assert os.path.samestat(os.stat(manager.last), os.stat(newest))  # the same file, two names
    one = newest.stat().st_blocks * 512
    assert disk_bytes(manager.directory) == 2 * one  # keep=2 copies, not keep + 1
    assert (manager.directory / "last.pt.sha256").read_text().split()[0] == ckpt._recorded_digest(newest)
    manager.save({**state, "step": 30})
    assert disk_bytes(manager.directory) == 2 * one and manager.last.stat().st_nlink == 2
    assert load_checkpoint(manager.latest())["step"] == 30 and temps(tmp_path) == []
    # keep=0: last.pt is the one file, never a link to a numbered name retention could delete.
    only = CheckpointManager(tmp_path / "zero", keep=0)
    only.save(state)
    assert only.last.stat().st_nlink == 1 and only.numbered() == []


def test_without_hard_links_last_is_a_copy_said_once(tmp_path, monkeypatch, capsys):
    # FAT, some network mounts: os.link fails; last.pt is an atomic copy (here also without
    # copy_file_range, the read-write loop), and one note says it costs twice the space.
    def refused(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refused)
    monkeypatch.setattr(os, "copy_file_range", refused, raising=False)
    monkeypatch.setattr(ckpt, "_said_no_links", False)
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(small_tensor_state(1))
    manager.save(small_tensor_state(2))
    assert manager.last.read_bytes() == manager.numbered()[-1].read_bytes()
    assert not os.path.samestat(os.stat(manager.last), os.stat(manager.numbered()[-1]))
    assert load_checkpoint(manager.last)["step"] == 2
    assert [p.name for p in manager.numbered()] == ["step_00000002.pt"]
    assert temps(tmp_path) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no hard links here (Operation not permitted); last.pt is a copy" in err[0]


def test_checksum_is_written_and_verified_on_load(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", small_tensor_state(3))
    side = tmp_path / "c.pt.sha256"
    assert side.read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  c.pt\n"  # sha256sum -c format
    flip_a_tensor_byte(path)
    with pytest.raises(CheckpointError, match=r"c\.pt: damaged") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    side.unlink()  # a checkpoint written before checksums existed loads unverified
    assert load_checkpoint(path)["step"] == 3


def test_a_malformed_checksum_file_is_a_one_line_error(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", small_tensor_state(3))
    (tmp_path / "c.pt.sha256").write_text("not a digest\n")
    with pytest.raises(CheckpointError, match=r"c\.pt\.sha256: not a sha256 checksum file"):
        load_checkpoint(path)


def test_latest_verifies_once_then_load_reuses_it(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(small_tensor_state(5))
    calls = []
    real = ckpt._sha256_of
    monkeypatch.setattr(ckpt, "_sha256_of", lambda f: calls.append(1) or real(f))
    found = manager.latest()
    assert load_checkpoint(found)["step"] == 5
    assert len(calls) == 1


def test_a_file_replaced_while_it_is_verified_is_read_again(tmp_path, monkeypatch):
    # soco export reads last.pt while the run saves a new one: the old bytes and the new checksum
    # are no damage; the load retries on the new file.
    path = save_checkpoint(tmp_path / "last.pt", small_tensor_state(1))
    real = ckpt._recorded_digest
    replaced = []

    def writer_runs_meanwhile(p):
        if not replaced:
            replaced.append(1)
            save_checkpoint(path, small_tensor_state(2))
        return real(p)

    monkeypatch.setattr(ckpt, "_recorded_digest", writer_runs_meanwhile)
    assert load_checkpoint(path)["step"] == 2


def test_latest_prefers_a_numbered_file_saved_after_last(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(small_tensor_state(10))
    manager.save(small_tensor_state(20))
    # A crash between a save's two writes: step 30 written, last.pt still step 20.
    newer = save_checkpoint(manager.directory / "step_00000030.pt", small_tensor_state(30))
    later = os.stat(manager.last).st_mtime_ns + 10**9
    os.utime(newer, ns=(later, later))
    assert manager.latest() == newer
    assert manager.resume_from("auto") == newer


def test_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys, monkeypatch):
    manager = CheckpointManager(tmp_path, keep=3)
    for step in [10, 20, 30]:
        manager.save(small_tensor_state(step))
    directory = manager.directory
    flip_a_tensor_byte(manager.last)  # in place: step_00000030.pt, the same file, is damaged too
    hashed = []
    real = ckpt._sha256_of
    monkeypatch.setattr(ckpt, "_sha256_of", lambda f: hashed.append(1) or real(f))
    assert manager.latest() == directory / "step_00000020.pt"
    assert len(hashed) == 2  # last.pt, then step 20: the damaged file is read once, not per name
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.pt: damaged" in err[0] and "as is step_00000030.pt (the same file)" in err[0]
    assert err[0].endswith("using " + str(directory / "step_00000020.pt") + " instead")
    # Step 20 truncated too: step 10 is used, one line for each skipped file.
    with open(directory / "step_00000020.pt", "r+b") as f:
        f.truncate(50)
    assert manager.resume_from("auto") == directory / "step_00000010.pt"
    assert load_checkpoint(directory / "step_00000010.pt")["step"] == 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(str(directory / "step_00000010.pt") in line for line in err)
    assert "step_00000020.pt: damaged" in err[1]
    # last.pt gone (deleted by hand): the newest intact numbered file, and one line says so.
    manager.last.unlink()
    assert manager.latest() == directory / "step_00000010.pt"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"soco: warning: {manager.last}: missing; using {directory / 'step_00000010.pt'} instead"


def test_without_checksums_a_truncated_file_is_skipped(tmp_path, capsys):
    # Runs written before checksum files existed: a truncated zip is still noticed cheaply.
    manager = CheckpointManager(tmp_path, keep=3)
    for step in [10, 20]:
        manager.save(small_tensor_state(step))
    for side in manager.directory.glob("*.sha256"):
        side.unlink()
    with open(manager.last, "r+b") as f:  # and step 20, the same file
        f.truncate(200)
    assert manager.latest() == manager.directory / "step_00000010.pt"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.pt: not a readable checkpoint" in err[0] and "as is step_00000020.pt" in err[0]


def test_when_nothing_is_intact_latest_names_the_newest_and_loading_it_fails(tmp_path):
    manager = CheckpointManager(tmp_path, keep=0)
    manager.save(small_tensor_state(1))
    flip_a_tensor_byte(manager.last)
    assert manager.latest() == manager.last
    with pytest.raises(CheckpointError, match="last.pt: damaged"):
        load_checkpoint(manager.latest())


def test_an_old_run_without_checksums_still_loads_and_saves(tmp_path):
    # Runs written before checksums existed: last.pt a hard link to the newest numbered file.
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    numbered = directory / "step_00000004.pt"
    torch.save(small_tensor_state(4), numbered)
    os.link(numbered, directory / "last.pt")
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.latest() == directory / "last.pt"
    assert load_checkpoint(manager.latest())["step"] == 4
    manager.save(small_tensor_state(6))
    assert load_checkpoint(numbered)["step"] == 4  # replacing last.pt left the linked file alone
    assert load_checkpoint(manager.last)["step"] == 6
    assert os.path.samestat(manager.last.stat(), (directory / "step_00000006.pt").stat())
    assert (directory / "last.pt.sha256").is_file() and numbered.stat().st_nlink == 1


def test_a_crash_before_the_checksum_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", small_tensor_state(1))

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_write_checksum", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, small_tensor_state(2))
    assert load_checkpoint(path)["step"] == 2  # never the new file beside the old file's checksum


# ---------------------------------------------------------------- retention spares


def test_retention_spares_the_checkpoint_a_run_resumed_from(tmp_path):
    first = CheckpointManager(tmp_path, keep=1)
    for step in [10, 20, 30]:
        first.save(small_tensor_state(step))
    old = first.directory / "step_00000010.pt"
    save_checkpoint(old, small_tensor_state(10))  # e.g. copied back from a backup
    # --resume step_00000010.pt: the loop resumes through one manager and saves through another.
    assert CheckpointManager(tmp_path, keep=1).resume_from(str(old)) == old
    saver = CheckpointManager(tmp_path, keep=1)
    for step in [11, 12]:
        saver.save(small_tensor_state(step))
    names = sorted(p.name for p in saver.numbered())
    # The resumed-from file stays; the new run keeps its newest; step 30 (of the abandoned run,
    # beyond this one's step) is not counted and does not push out step 12.
    assert names == ["step_00000010.pt", "step_00000012.pt", "step_00000030.pt"]
    assert saver.latest() == saver.last and load_checkpoint(saver.last)["step"] == 12
    assert not (saver.directory / "step_00000011.pt.sha256").exists()


def test_protect_by_argument(tmp_path):
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(small_tensor_state(1))
    kept = manager.numbered()[0]
    other = CheckpointManager(tmp_path, keep=1, protect=kept)
    other.save(small_tensor_state(2))
    other.save(small_tensor_state(3))
    assert [p.name for p in other.numbered()] == ["step_00000001.pt", "step_00000003.pt"]


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB file system (tmpfs) mounted on a fresh folder; needs root (CI runs as root)."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def big_state(step):
    return {"step": step, "model": {"w": torch.arange(1_000_000, dtype=torch.float32)}}  # 4 MB


def assert_step_1_intact(manager):
    assert sorted(p.name for p in manager.directory.iterdir()) == [
        "last.pt",
        "last.pt.sha256",
        "step_00000001.pt",
        "step_00000001.pt.sha256",
    ]  # no temporary left, no step 2
    assert load_checkpoint(manager.last)["step"] == 1 and manager.latest() == manager.last


def test_a_save_the_disk_cannot_hold_is_refused_in_one_line(small_disk):
    # A real full disk: torch.save's zip writer turns ENOSPC into "RuntimeError: ... unexpected
    # pos" (a 54-line traceback, exit status 1, before the fix). Refused before writing now.
    manager = CheckpointManager(small_disk / "run", keep=2)
    manager.save(small_tensor_state(1))
    with pytest.raises(WriteError) as info:
        manager.save(big_state(2))
    message = one_line(info.value)
    assert message == str(info.value) and info.value.exit_code == 2
    assert message.startswith(f"{manager.directory}: cannot write step_00000002.pt and last.pt: ")
    assert " MiB free, about 4." in message and " MiB needed (ENOSPC" in message  # once: last.pt is a link
    assert_step_1_intact(manager)


def test_a_full_disk_inside_torch_save_is_one_line(small_disk, monkeypatch):
    # The estimate said it fits (say another process filled the disk meanwhile): the write itself
    # fails inside torch.save, and the zip writer's RuntimeError still becomes one WriteError line.
    manager = CheckpointManager(small_disk / "run", keep=2)
    manager.save(small_tensor_state(1))
    monkeypatch.setattr(ckpt, "state_bytes", lambda state: 0)
    with pytest.raises(WriteError) as info:
        manager.save(big_state(2))
    target = manager.directory / "step_00000002.pt"
    assert str(info.value) == f"{target}: cannot write (ENOSPC: No space left on device)"
    assert isinstance(info.value.__cause__, OSError) and info.value.exit_code == 2
    assert_step_1_intact(manager)
    with pytest.raises(WriteError, match=r"x\.pt: cannot write \(ENOSPC"):
        save_checkpoint(small_disk / "x.pt", big_state(3))
    assert not (small_disk / "x.pt").exists() and temps(small_disk) == []


Usage = namedtuple("Usage", "total used free")


def test_free_space_is_checked_against_the_state_size(tmp_path, monkeypatch):
    state = small_tensor_state(1)
    path = save_checkpoint(tmp_path / "probe.pt", state)
    # The estimate is a little over what torch.save writes, never under.
    assert path.stat().st_size <= ckpt.state_bytes(state) <= path.stat().st_size + (1 << 20)
    asked = []

    def disk_usage(folder):
        asked.append(str(folder))
        return Usage(10**12, 0, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    manager = CheckpointManager(tmp_path / "run", keep=2)
    free = ckpt.state_bytes(state) - 1  # the numbered file (last.pt is a link to it): one byte short
    with pytest.raises(WriteError) as info:
        manager.save(state)
    assert str(info.value) == (
        f"{manager.directory}: cannot write step_00000001.pt and last.pt: {human_bytes(free)} free, about "
        f"{human_bytes(free + 1)} needed (ENOSPC: free some space or write elsewhere)"
    )
    assert asked == [str(tmp_path)]  # the folder does not exist yet: its file system is asked
    assert not (tmp_path / "run").exists()
    free += 1
    manager.save(state)
    assert load_checkpoint(manager.last)["step"] == 1
    free = ckpt.state_bytes(state) - 1  # keep=0 writes one file
    with pytest.raises(WriteError, match=r"cannot write last\.pt: .* free, about .* needed"):
        CheckpointManager(tmp_path / "run0", keep=0).save(state)


def test_a_malformed_pickle_is_named_not_an_unpickler_message(tmp_path):
    # A zip-less file whose pickle stream is cut: torch.load raises IndexError("list index out of
    # range") or an UnpicklingError; the user is told what the file is not, not the unpickler's words.
    import pickle as _pickle

    from soco_pretrain.engine.checkpoint import CheckpointError, load_checkpoint

    path = tmp_path / "cut.pt"
    path.write_bytes(_pickle.dumps({"model": [1, 2, 3]}, protocol=2)[:-7])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "list index out of range" not in message and "truncated or malformed" in message
