"""soco doctor: the preflight of a pretraining run (train/doctor.py, cli/doctor.py). Small photos,
no training: the model is only built on the meta device to size a checkpoint."""

from __future__ import annotations

import os
import socket

import pytest
import torch.multiprocessing as mp
from data_fixtures import corrupt, make_photos, make_store, small_pretrain_config

from soco_pretrain import files
from soco_pretrain.cli import main
from soco_pretrain.train.doctor import diagnose, micro_batches_per_epoch, sample_indices
from soco_pretrain.train.throughput import lookup

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket")
WHOLE = "data.views.proposal_source=whole_image"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture
def alone(monkeypatch):
    """One process, whatever launched the tests."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor_photos")
    make_photos(root, NAMES, side=96)
    return root


def with_ghost(tmp_path, ghost: str = "d_ghost.png"):
    """A folder of the photos and a list file in it naming them and one file that does not exist
    (sorted after coffee and coins); returns (list file, folder)."""
    folder = tmp_path / "photos"
    make_photos(folder, NAMES, side=96)
    listing = folder / "list.txt"
    listing.write_text("".join(f"{n}.png\n" for n in NAMES) + f"{ghost}\n")
    return listing, folder


@pytest.mark.parametrize("extra", [(), ("train.batch_size=4",)])
def test_plan_is_make_plans(alone, photos, tmp_path, extra):
    cfg = small_pretrain_config(WHOLE, "train.epochs=3", *extra)
    report = diagnose(cfg, photos, None, tmp_path / "run", device="cpu")
    # oracle: epochs x (images // total batch) optimiser steps, each of batch_size images
    steps = 3 * (len(NAMES) // cfg.train.batch_size)
    assert report.exit_code == 0, report.text()
    assert f"= {steps} steps, {steps * cfg.train.batch_size} images seen" in report.text()
    assert [c.status for c in report.checks if c.name in ("images", "disk", "batch")] == ["ok"] * 3
    assert "eta: unknown card" in report.text()  # R50 at 64 px was never measured here
    assert not (tmp_path / "run").exists()  # nothing written


def test_micro_batches_follow_the_loader():
    assert micro_batches_per_epoch(10, 2, 1) == 5
    assert micro_batches_per_epoch(10, 2, 2) == 2  # 5 per rank, full batches only
    assert micro_batches_per_epoch(3, 8, 2) == 1  # fewer than one batch per process: one short batch
    assert sample_indices(100, 4) == [0, 25, 50, 75]
    assert sample_indices(3, 32) == [0, 1, 2]


def test_measured_figures_only_for_their_device_and_model():
    assert lookup("cpu", "fpn", "resnet18", 64, False, "fp32", cores=2).images_per_s == 7.4
    assert lookup("cpu", "fpn", "resnet18", 64, False, "fp32", cores=16) is None  # other cores: unknown
    assert lookup("NVIDIA H200", "fpn", "resnet50", 224, False, "bf16").images_per_s == 1102.1
    assert lookup("NVIDIA H100 80GB HBM3", "fpn", "resnet50", 224, False, "bf16") is None


def test_missing_image_is_counted_and_named(alone, tmp_path):
    listing, folder = with_ghost(tmp_path)
    store = make_store(tmp_path / "store", folder, [f"{n}.png" for n in NAMES])
    report = diagnose(small_pretrain_config(), listing, store, tmp_path / "run", device="cpu")
    lines = [c.line() for c in report.problems]
    # 1 of 7 is above the 10% the loader is left to skip: it blocks
    assert len(lines) == 1 and "1 of 7 sampled images missing: d_ghost.png" in lines[0], report.text()
    assert "1 of 7 images have no proposals" in report.text()  # the ghost is not in the store either


def test_undecodable_image_is_named(alone, tmp_path):
    folder = tmp_path / "photos"
    make_photos(folder, NAMES, side=96)
    corrupt(folder / "coins.png")
    report = diagnose(small_pretrain_config(WHOLE), folder, None, tmp_path / "run", device="cpu")
    assert [c.detail.split(":")[0] for c in report.problems] == ["1 of 6 sampled images do not decode"]
    assert "coins.png (" in report.problems[0].detail


def test_cli_exit_2_one_line_per_blocking_problem(alone, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(files, "free_bytes", lambda folder: 1000)  # a nearly full disk
    argv = ["doctor", "--preset", "tiny", "--images", str(with_ghost(tmp_path)[0]), "--out", str(tmp_path / "r"),
            "--set", WHOLE, "--set", "train.batch_size=6", "--set", "train.per_device_batch=4"]  # fmt: skip
    assert main(argv) == 2
    out, err = capsys.readouterr()
    problems = err.strip().splitlines()
    assert len(problems) == 3, err
    assert problems[0].startswith("soco doctor: problem: images: 1 of 7 sampled images missing")
    assert problems[1].startswith("soco doctor: problem: disk: ") and "1000 bytes free" in problems[1]
    assert problems[2].startswith("soco doctor: problem: batch: train.batch_size=6 must be a multiple")
    assert "software   ok" in out and "device     ok       cpu, " in out


def test_cli_clean_run_exits_0(alone, photos, tmp_path, capsys):
    argv = ["doctor", "--preset", "tiny", "--images", str(photos), "--out", str(tmp_path / "r"), "--set", WHOLE]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == "" and "plan: 6 images," in out


# ---------------------------------------------------------------- two processes (gloo)


def _rank(rank: int, port: int, listing: str, out: str, results) -> None:
    import torch

    torch.set_num_threads(1)
    env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"}
    os.environ.update({**env, "MASTER_PORT": str(port)})
    report = diagnose(small_pretrain_config(WHOLE), listing, None, out, device="cpu")
    results.put((rank, report.exit_code, report.text()))


def test_two_ranks_report_the_rank_that_misses_an_image(tmp_path):
    # sorted list: astronaut camera chelsea coffee coins d_ghost rocket; rank 1 reads 1, 3, 5
    listing, _ = with_ghost(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(port, str(listing), str(tmp_path / "run"), results), nprocs=2, start_method="spawn")
    got = dict((rank, (code, text)) for rank, code, text in (results.get() for _ in range(2)))
    assert got[1] == (0, "")  # rank 0 reports for everyone
    code, text = got[0]
    assert code == 2
    assert "rank 1: 1 of 3 sampled images missing: d_ghost.png" in text
    assert "rank 0: cpu, " in text and "rank 1: cpu, " in text
