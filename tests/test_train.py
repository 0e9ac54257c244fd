"""The training loop, presets and `soco pretrain` (stage 4), on tiny real photos.

The full R50-FPN network runs on 64 px views with 1-2 images per batch and K = 2, so each
optimiser step takes about a second on a shared CPU core. Data loading in the main process
(workers 0) and fixed seeds make runs deterministic.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from data_fixtures import SMALL_PRETRAIN, make_photos, make_store, random_boxes, small_pretrain_config

from soco_pretrain.cli import PRETRAIN_PRESETS, main
from soco_pretrain.config import apply_overrides
from soco_pretrain.engine.checkpoint import CheckpointManager, load_checkpoint
from soco_pretrain.engine.metrics import read_metrics
from soco_pretrain.errors import UserError
from soco_pretrain.presets import PRESETS, load_preset
from soco_pretrain.train.loop import NonFiniteLossError, make_plan, pretrain

SMALL = SMALL_PRETRAIN  # tests/data_fixtures.py


pytestmark = pytest.mark.usefixtures("one_thread")


small_config = small_pretrain_config  # tests/data_fixtures.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 photos (long side 96 px) with 6 random proposals each, and list files of 2 and 4 of them."""
    root = tmp_path_factory.mktemp("train_data")
    rel = make_photos(root / "images", side=96)
    store = make_store(root / "store", root / "images", rel, boxes_per_image=6)
    two = root / "images" / "two.txt"  # beside the images: list paths relative to the store's root
    two.write_text("\n".join(str(root / "images" / p) for p in rel[:2]) + "\n")
    four = root / "images" / "four.txt"
    four.write_text("\n".join(str(root / "images" / p) for p in rel[:4]) + "\n")
    return {"images": root / "images", "store": store, "two": two, "four": four}


def _losses(run):
    return [r["loss"] for r in read_metrics(run)]


# ---------------------------------------------------------------- presets and plan


def test_presets_load_with_the_paper_settings():
    assert PRETRAIN_PRESETS == PRESETS  # the CLI's copy (kept for a fast --help) matches
    for name in PRESETS:
        cfg = load_preset(name)
        if name not in ("tiny", "cpu-small", "fpn-head-warm", "fpn-warm"):  # our recipes (warm starts: test_warm_start)
            assert cfg.train.batch_size == 2048 and cfg.train.base_lr == 1.0 and cfg.train.warmup_epochs == 10
    assert load_preset("fpn-100ep").train.epochs == 100
    assert load_preset("fpn-400ep").train.epochs == 400
    star = load_preset("fpn-star-400ep")
    assert star.data.views.soco_star and star.train.epochs == 400 and star.model.arch == "fpn"
    for name, epochs in (("c4-100ep", 100), ("c4-400ep", 400)):
        c4 = load_preset(name)
        assert c4.model.arch == "c4" and c4.train.epochs == epochs and not c4.data.views.soco_star
    tiny = load_preset("tiny")
    assert tiny.model.arch == "fpn" and tiny.data.views.v1_size < 224 and tiny.train.per_device_batch <= 8
    small = load_preset("cpu-small")  # the CPU experiment: ResNet-18 at 64 px, batch 32, constant EMA
    assert small.model.backbone == "resnet18" and small.data.views.v1_size == 64 and small.train.batch_size == 32
    assert small.train.ema_schedule == "constant" and small.train.warmup_steps == 32
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        load_preset("nope")


def test_plan_derives_accumulation_and_schedule_lengths():
    cfg = load_preset("fpn-100ep")  # 2048 total, per device auto: 64 on a CPU
    plan = make_plan(cfg, world_size=8, micro_batches_per_epoch=100, device="cpu")
    assert plan.accum == 4 and plan.steps_per_epoch == 25
    assert plan.total_steps == 100 * 25 and plan.warmup_steps == 10 * 25
    assert plan.peak_lr == pytest.approx(8.0)  # 1.0 x 2048 / 256
    assert plan.precision == "fp32"  # auto on the CPU
    assert make_plan(cfg, 32, 10, "cpu").accum == 1
    with pytest.raises(UserError, match="multiple of train.per_device_batch"):
        make_plan(cfg, 3, 100, "cpu")
    with pytest.raises(UserError, match="needs 4 batches"):
        make_plan(cfg, 8, 3, "cpu")
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        make_plan(apply_overrides(cfg, ["train.precision=fp16"]), 32, 10, "cpu")


# ---------------------------------------------------------------- training


def test_tiny_loss_goes_down(data, tmp_path):
    # Overfit 2 photos: one step per epoch, 1 warm-up step (lr 0), then lr 0.5 decaying.
    cfg = small_config("train.epochs=10", "train.base_lr=64.0")
    summary = pretrain(cfg, data["two"], data["store"], tmp_path / "run", progress=False)
    assert summary.step == 10 and summary.finished
    losses = _losses(tmp_path / "run")
    assert len(losses) == 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, losses
    assert -8.0 <= min(losses)  # paper loss with 2 pairs: -2 x 2 directions x 2 pairs at best


def _state_equal(a: dict, b: dict, path=""):
    assert a.keys() == b.keys(), path
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            _state_equal(x, y, f"{path}.{key}")
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{path}.{key}"
        elif isinstance(x, (list, tuple)) and x and isinstance(x[0], dict):
            for i, (u, v) in enumerate(zip(x, y)):
                _state_equal(u, v, f"{path}.{key}[{i}]")
        else:
            assert x == y, f"{path}.{key}"


def test_resume_equals_an_uninterrupted_run(data, tmp_path):
    # 4 images, 1 per micro-batch, 2 micro-batches per optimiser step (accumulation): 2 steps per
    # epoch, so the split after step 1 is mid-epoch (the loader must skip 2 samples) and step 3
    # is in the next epoch. With one image per batch, BatchNorm needs more than one value per
    # channel: V3 at 64 px (at 32 px res5 is 1x1) and K rows per image (repeat-padding).
    cfg = small_config(
        "train.per_device_batch=1",
        "train.batch_size=2",
        "train.epochs=3",
        "data.views.v3_size=64",
        "data.views.pad=repeat",
    )
    split, straight = tmp_path / "split", tmp_path / "straight"
    first = pretrain(cfg, data["four"], data["store"], split, max_steps=1, progress=False)
    assert first.step == 1 and not first.finished and first.plan.accum == 2
    assert load_checkpoint(split / "checkpoints" / "last.pt")["batch_in_epoch"] == 1
    second = pretrain(cfg, data["four"], data["store"], split, max_steps=3, progress=False)
    assert second.start_step == 1 and second.step == 3
    pretrain(cfg, data["four"], data["store"], straight, max_steps=3, progress=False)

    a = load_checkpoint(split / "checkpoints" / "last.pt")
    b = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (b["step"], b["epoch"], b["batch_in_epoch"]) == (3, 1, 1)
    _state_equal(a["model"], b["model"], "model")  # online and target weights, BN buffers
    _state_equal(a["optimizer"], b["optimizer"], "optimizer")  # LARS momentum buffers
    # The resumed run's metrics continue the same file; the loss history matches step for step.
    assert _losses(split) == pytest.approx(_losses(straight), rel=0, abs=0)


def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one_exactly(data, tmp_path, capsys):
    # last.pt is a hard link to the newest numbered file (one copy on disk): a byte flipped in it
    # damages both names, so a resume falls back to the previous checkpoint, says so in one line,
    # and redoes the lost step exactly. A ResNet-18: the fallback does not depend on the network.
    cfg = small_config("model.backbone=resnet18", "model.head_dim=256", "model.proj_hidden=512",
                       "train.epochs=3", "train.checkpoint_every=1", "train.keep_checkpoints=2")  # fmt: skip
    split, straight = tmp_path / "split", tmp_path / "straight"
    pretrain(cfg, data["four"], data["store"], split, max_steps=2, progress=False)
    checkpoints = split / "checkpoints"
    assert os.path.samestat((checkpoints / "last.pt").stat(), (checkpoints / "step_00000002.pt").stat())
    with open(checkpoints / "last.pt", "r+b") as f:
        f.seek(f.seek(0, os.SEEK_END) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    resumed = pretrain(cfg, data["four"], data["store"], split, max_steps=3, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert resumed.start_step == 1 and len(warnings) == 1
    assert "last.pt: damaged" in warnings[0] and "as is step_00000002.pt (the same file)" in warnings[0]
    assert warnings[0].endswith(f"using {checkpoints / 'step_00000001.pt'} instead")
    pretrain(cfg, data["four"], data["store"], straight, max_steps=3, progress=False)
    a, b = load_checkpoint(checkpoints / "last.pt"), load_checkpoint(straight / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 3
    _state_equal(a["model"], b["model"], "model")
    _state_equal(a["optimizer"], b["optimizer"], "optimizer")
    assert _losses(split) == pytest.approx(_losses(straight), rel=0, abs=0)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    import soco_pretrain.model.soco as soco

    real = soco.soco_loss_terms
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] >= 3:  # the third optimiser step's forward
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms

    monkeypatch.setattr(soco, "soco_loss_terms", poisoned)
    run = tmp_path / "run"
    cfg = small_config("train.epochs=10", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    with pytest.raises(NonFiniteLossError) as info:
        pretrain(cfg, data["two"], data["store"], run, progress=False)
    message = str(info.value)
    assert "non-finite loss (nan) by step 3" in message and "\n" not in message
    assert str(run / "checkpoints" / "last.pt") in message
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    saved = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.endswith(".sha256"))
    assert saved == ["last.pt", "step_00000002.pt"]


@pytest.mark.slow  # 10-minute budget: 2 gloo processes (tests/test_distributed.py runs real 2-process groups)
def test_two_process_ddp_matches_one_process(data, tmp_path):
    # Same total batch of 2: one process x 2 images vs two gloo processes (torchrun, through the
    # CLI) x 1 image; SyncBN makes the BatchNorm statistics those of the whole batch. Repeat-padding
    # keeps every slot valid, so each rank's mean loss weighs its proposals as the single process
    # does. No warm-up, so the first step moves the weights. V3 at 64 px: at 32 px res5 is 1x1 and
    # its BatchNorm sees 2 values in all.
    extra = ["data.views.pad=repeat", "data.views.v3_size=64", "train.warmup_epochs=0", "train.epochs=3"]
    one = tmp_path / "one"
    pretrain(small_config(*extra), data["images"], data["store"], one, max_steps=1, progress=False)

    two = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "soco_pretrain",
        "pretrain",
        "--preset",
        "tiny",
        "--images",
        str(data["images"]),
        "--proposals",
        str(data["store"]),
        "--out",
        str(two),
        "--max-steps",
        "1",
    ]
    for item in [*SMALL, *extra, "train.per_device_batch=1"]:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("pretraining fpn") == 1  # rank 0 alone prints (and logs, saves)

    # The forward on the same global batch (each rank its share of the sampler's order).
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-4)

    # The weights after the step, compared through the update (_same_update).
    a = load_checkpoint(one / "checkpoints" / "last.pt")
    b = load_checkpoint(two / "checkpoints" / "last.pt")
    assert b["world_size"] == 2 and a["world_size"] == 1
    _same_update(a["model"], b["model"], small_config(*extra), per_tensor=True)


def _same_update(a: dict, b: dict, cfg, per_tensor: bool) -> None:
    """The one-process and two-process weights after a step agree through the update (weights -
    initial weights): overall within 2 %, and with ``per_tensor`` each moved tensor within 5 % and
    the EMA targets close. At initialisation this loss's gradient is a small difference of large
    terms (float32 alone is ~0.5 % off float64 here), hence one step and a loose tolerance."""
    from soco_pretrain.model import SoCoModel

    torch.manual_seed(0)
    init = SoCoModel(cfg).state_dict()
    moved, off = 0.0, 0.0
    for key, x in a.items():
        y = b[key]
        if not x.is_floating_point():
            assert torch.equal(x, y), key
        elif key.startswith("target_"):
            if per_tensor:
                torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-4)  # EMA of nearly equal weights
        elif per_tensor or "running_" not in key:
            assert torch.isfinite(y).all(), key
            update, diff = (x - init[key]).double(), (x - y).double()
            moved += update.square().sum().item()
            off += diff.square().sum().item()
            if per_tensor and "running_" not in key and update.norm() > 1e-3:
                assert diff.norm() <= 0.05 * update.norm(), key
    assert moved > 0 and (off / moved) ** 0.5 < 0.02, (off / moved) ** 0.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, cfg, images, store, jobs) -> None:
    """One rank: the launcher's variables as torchrun sets them, then ``pretrain`` once per job
    ``(run_dir, max_steps, port)``, one process group each (pretrain joins and leaves it)."""
    torch.set_num_threads(1)
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "TQDM_DISABLE": "1",
        }
    )
    for run_dir, max_steps, port in jobs:
        os.environ["MASTER_PORT"] = str(port)
        pretrain(cfg, images, store, run_dir, max_steps=max_steps, progress=False, device="cpu")


def _run_ddp(cfg, images, store, jobs, world: int = 2) -> None:
    """``world`` spawned CPU processes (gloo) running ``jobs`` = [(run_dir, max_steps), ...] in order."""
    jobs = [(str(run), steps, _free_port()) for run, steps in jobs]
    mp.start_processes(
        _ddp_worker, args=(world, cfg, str(images), str(store), jobs), nprocs=world, join=True, start_method="spawn"
    )


def _uneven_store(out, image_dir, rel, counts):
    """A proposal store for the images ``rel`` with ``counts[i]`` random boxes for image i."""
    from PIL import Image

    from soco_pretrain.proposals.filters import RULE_PAPER
    from soco_pretrain.proposals.store import write_store

    rng = np.random.default_rng(3)
    order = sorted(range(len(rel)), key=lambda i: rel[i])
    boxes, offsets, sizes = [], [0], []
    for i in order:
        with Image.open(image_dir / rel[i]) as im:
            w, h = im.size
        boxes.append(random_boxes(rng, w, h, counts[i]))
        offsets.append(offsets[-1] + counts[i])
        sizes.append((w, h))
    return write_store(
        out,
        [rel[i] for i in order],
        np.concatenate(boxes),
        offsets,
        sizes,
        [RULE_PAPER] * len(rel),
        [counts[i] for i in order],
        {"preset": "test"},
    )


@pytest.mark.slow  # about 30 s; masked padding across a split is in the default run (test_loss_split)
def test_two_process_ddp_with_masked_padding_matches_one_process(data, tmp_path):
    # pad=mask with K = 2 on two images holding 1 and 3 proposals: one image's second slot is
    # padding (valid=False), so the two ranks (one image each) have different numbers of valid
    # proposals. With the released normalisation (per-image mean, then mean over images) the
    # mean over ranks of each rank's loss is the one-process loss of the whole batch, and SyncBN
    # sees the same valid rows as one process: padded slots must stay out of both everywhere.
    images = tmp_path / "images"
    rel = make_photos(images, ("astronaut", "coffee"), side=96)
    store = _uneven_store(tmp_path / "store", images, rel, [1, 3])
    extra = [
        "data.views.pad=mask",
        "model.loss=released",
        "data.views.v3_size=64",
        "train.warmup_epochs=0",
        "train.epochs=3",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(small_config(*extra), images, store, one, max_steps=1, progress=False, device="cpu")
    _run_ddp(small_config(*extra, "train.per_device_batch=1"), images, store, [(two, 1)])

    assert _losses(two) == pytest.approx(_losses(one), abs=1e-4)
    a = load_checkpoint(one / "checkpoints" / "last.pt")
    b = load_checkpoint(two / "checkpoints" / "last.pt")
    assert b["world_size"] == 2 and a["world_size"] == 1
    _same_update(a["model"], b["model"], small_config(*extra), per_tensor=False)  # overall, as masked padding allows


@pytest.mark.slow  # about 60 s: 6 DDP steps of R50-FPN and 3 process-group starts on 2 cores
def test_two_process_ddp_resume_equals_an_uninterrupted_two_process_run(data, tmp_path):
    # 4 images, 1 per process and step: 2 steps per epoch. Stop after step 1 (mid-epoch: each
    # rank's loader must skip its share of the epoch's order), resume to step 3 (the next
    # epoch), and compare with 3 uninterrupted steps: weights, LARS buffers and losses bit for
    # bit (gloo on CPU is deterministic). Only rank 0 saves; rank 1 resumes from rank 0's file.
    cfg = small_config(
        "train.per_device_batch=1",
        "train.batch_size=2",
        "train.epochs=3",
        "data.views.pad=mask",
        "data.views.v3_size=64",
    )
    split, straight = tmp_path / "split", tmp_path / "straight"
    _run_ddp(cfg, data["four"], data["store"], [(split, 1), (split, 3), (straight, 3)])
    a = load_checkpoint(split / "checkpoints" / "last.pt")
    b = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert a["world_size"] == b["world_size"] == 2
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (b["step"], b["epoch"], b["batch_in_epoch"]) == (3, 1, 1)
    _state_equal(a["model"], b["model"], "model")
    _state_equal(a["optimizer"], b["optimizer"], "optimizer")
    assert [r["step"] for r in read_metrics(split)] == [1, 2, 3]
    assert _losses(split) == pytest.approx(_losses(straight), rel=0, abs=0)


@pytest.mark.slow  # about 30 s: two R18 processes started, a kill, the survivor's 10 s roll call, a resume
def test_a_killed_rank_stops_the_other_in_one_line_and_the_run_resumes(data, tmp_path):
    # Two `soco pretrain` processes with the variables torchrun sets, but no torchrun agent: its
    # agent would SIGTERM the survivor at once; what the survivor does alone is what an srun or
    # multi-node job sees. Before: a gloo traceback naming an address (kill -9), or a 30-minute
    # wait (a hung rank, gloo's default timeout).
    run = tmp_path / "run"
    sets = [*SMALL, "model.backbone=resnet18", "model.head_dim=256", "model.proj_hidden=512",
            "train.per_device_batch=1", "train.checkpoint_every=1", "train.keep_checkpoints=2",
            "data.views.v3_size=64", "data.views.pad=repeat", "train.dist_timeout_s=20"]  # fmt: skip
    cmd = [sys.executable, "-m", "soco_pretrain", "pretrain", "--preset", "tiny", "--images", str(data["images"]),
           "--proposals", str(data["store"]), "--out", str(run), "--max-steps", "100"]  # fmt: skip
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}  # fmt: skip
    logs = [tmp_path / f"rank{r}.err" for r in range(2)]
    streams = [open(log, "w") for log in logs]
    ranks = [
        subprocess.Popen(
            cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL, stderr=streams[r]
        )  # fmt: skip
        for r in range(2)
    ]

    def steps_done() -> int:
        return read_metrics(run)[-1]["step"] if (run / "metrics.jsonl").is_file() and read_metrics(run) else 0

    try:
        started = time.monotonic()
        while steps_done() < 2:  # step 1's checkpoint is written before step 2's record
            assert time.monotonic() - started < 60 and ranks[0].poll() is None, logs[0].read_text()[-3000:]
            time.sleep(0.2)
        ranks[1].kill()  # kill -9
        killed = time.monotonic()
        ranks[0].wait(timeout=60)
        after = time.monotonic() - killed
    finally:
        for proc, stream in zip(ranks, streams):
            proc.kill()
            proc.wait()
            stream.close()
    err = logs[0].read_text()
    assert ranks[0].returncode == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last == (
        "soco: error: rank 1 of 2 stopped answering (its connection closed); rank 0 stops too; rerun the same "
        f"command to resume from the last checkpoint in {run / 'checkpoints'}"
    )
    assert after < 30  # seen at once (gloo's connection closes), then the 10 s roll call

    # The run folder resumes, here in one process (another world size is said in one line).
    saved = load_checkpoint(CheckpointManager(run).latest())["step"]
    assert saved >= 1
    cfg = small_config(*sets[len(SMALL) :])
    summary = pretrain(cfg, data["images"], data["store"], run, max_steps=saved + 1, progress=False, device="cpu")
    assert (summary.start_step, summary.step) == (saved, saved + 1)
    assert [r["step"] for r in read_metrics(run)][-1] == saved + 1


# ---------------------------------------------------------------- the command


def test_cli_pretrain_smoke(data, tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        "pretrain",
        "--preset",
        "tiny",
        "--images",
        str(data["two"]),
        "--proposals",
        str(data["store"]),
        "--out",
        str(run),
        "--max-steps",
        "2",
    ]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) == 0
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    for key in ("epoch", "loss", "lr", "tau", "images_per_s", "data_wait"):
        assert key in records[-1]
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["views"]["v1_size"] == 64 and saved["train"]["batch_size"] == 2
    out = capsys.readouterr().out
    assert "stopped at step 2/" in out


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_store", "no such proposal store"),
        ("bad_set", "unknown key 'train.nope'"),
        ("bad_value", "train.epochs=many"),
        ("batch", "must be a multiple of train.per_device_batch"),
        ("resume", "--resume nowhere.pt"),
    ],
)
def test_cli_pretrain_bad_input_is_one_line(data, tmp_path, capsys, case, expected):
    args = [
        "pretrain",
        "--preset",
        "tiny",
        "--images",
        str(data["images"]),
        "--proposals",
        str(data["store"]),
        "--out",
        str(tmp_path / "run"),
    ]
    if case == "missing_store":
        args[6] = str(tmp_path / "no-store")
    elif case == "bad_set":
        args += ["--set", "train.nope=1"]
    elif case == "bad_value":
        args += ["--set", "train.epochs=many"]
    elif case == "batch":
        args += ["--set", "train.batch_size=12", "--set", "train.per_device_batch=8"]
    elif case == "resume":
        args += ["--resume", "nowhere.pt"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("soco: error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_step_the_grad_scaler_skips_moves_neither_network(data, monkeypatch):
    # fp16 needs CUDA; on the CPU a real GradScaler with an infinite scale makes every gradient
    # non-finite, as an fp16 overflow does: GradScaler.step then skips the optimiser, and the EMA
    # update of the target must be skipped with it (the schedules still advance: PretrainStep).
    from soco_pretrain.engine.distributed import init_distributed
    from soco_pretrain.engine.skips import SkipLog
    from soco_pretrain.train.loop import Position, PretrainStep, build_job

    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    cfg = small_config("train.warmup_epochs=0", "train.epochs=3")
    job = build_job(cfg, data["images"], data["store"], None, init_distributed(device="cpu"))
    job.model.train()
    step = PretrainStep(job, Position(), SkipLog())
    step(0)  # a normal step: the online network moves, the target only part of the way
    assert step.stepped
    before = {k: v.clone() for k, v in job.core.state_dict().items()}
    assert not torch.equal(before["target_projector.linear1.weight"], before["projector.linear1.weight"])
    momentum = [s["momentum_buffer"].clone() for s in job.optimizer.state.values()]
    assert momentum

    job.scaler = torch.amp.GradScaler("cpu", init_scale=float("inf"))
    out = step(1)
    assert not step.stepped and torch.isfinite(sum(out.loss)).item()
    after = job.core.state_dict()
    for key, value in before.items():
        if key.rsplit(".", 1)[-1] not in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(after[key], value), key  # online and target weights as they were
    assert all(torch.equal(s["momentum_buffer"], m) for s, m in zip(job.optimizer.state.values(), momentum))
