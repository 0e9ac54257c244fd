"""The linear probe (paper appendix B) on a tiny synthetic class-folder set, 64 px crops."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from soco_pretrain.cli import main
from soco_pretrain.config import PretrainConfig, to_dict
from soco_pretrain.engine.checkpoint import load_checkpoint, save_checkpoint
from soco_pretrain.engine.metrics import read_metrics
from soco_pretrain.errors import UserError
from soco_pretrain.model import SoCoModel
from soco_pretrain.train.loop import save_config
from soco_pretrain.transfer import linear
from soco_pretrain.transfer.linear import LinearConfig, linear_probe, load_backbone, lr_at

COLOURS = {"blue": (30, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}
TINY = dict(epochs=2, batch_size=8, image_size=64, workers=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_class_folders(root, per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            h, w = int(rng.integers(70, 96)), int(rng.integers(70, 96))
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """3 colour classes: 4 training and 2 validation images each, plus a truncated training PNG."""
    root = tmp_path_factory.mktemp("linear")
    _write_class_folders(root / "train", 4, seed=0)
    _write_class_folders(root / "val", 2, seed=1)
    good = (root / "train" / "red" / "0.png").read_bytes()
    (root / "train" / "red" / "broken.png").write_bytes(good[: len(good) // 2])
    return root


def _randomise(state: dict, generator) -> dict:
    # Noise on every float tensor (running statistics too) so no equality holds by accident.
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            v = v + 0.05 * torch.randn(v.shape, generator=generator)
            if k.endswith("running_var"):
                v = v.abs() + 0.5
        out[k] = v
    return out


_STATES = {}  # run folder -> its checkpoint's "model" (loaded once: the file is ~200 MB)


def _make_run(root, arch: str):
    cfg = PretrainConfig()
    cfg.model.arch = arch
    # Smaller box head and MLPs (the probe never reads them) keep the file and the test lighter.
    cfg.model.head_dim = cfg.model.proj_hidden = 64
    torch.manual_seed(0)
    state = _randomise(SoCoModel(cfg).state_dict(), torch.Generator().manual_seed(1))
    # Online and target must differ for the online/target test.
    assert not torch.equal(
        state["encoder.backbone." + ("body." if arch == "fpn" else "") + "conv1.weight"],
        state["target_encoder.backbone." + ("body." if arch == "fpn" else "") + "conv1.weight"],
    )
    save_checkpoint(root / "checkpoints" / "last.pt", {"model": state, "config": to_dict(cfg), "step": 0})
    save_config(cfg, root)
    _STATES[root] = state
    return root


@pytest.fixture(scope="module")
def fpn_run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("fpn_run"), "fpn")


def _expected(run, prefix):
    return {k[len(prefix) :]: v for k, v in _STATES[run].items() if k.startswith(prefix)}


def _assert_state_equal(model, expected):
    state = model.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


# ---------------------------------------------------------------- weights


def test_online_and_target_weights_load_exactly(fpn_run, tmp_path):
    online, info = load_backbone(fpn_run)  # default: online
    assert info["arch"] == "fpn" and info["soco_weights"] == "online"
    _assert_state_equal(online, _expected(fpn_run, "encoder.backbone.body."))
    target, _ = load_backbone(fpn_run / "checkpoints" / "last.pt", "target")
    _assert_state_equal(target, _expected(fpn_run, "target_encoder.backbone.body."))
    # A torchvision-export style state dict (backbone.body.*) loads the same tensors.
    exported = {f"backbone.body.{k}": v for k, v in _expected(fpn_run, "encoder.backbone.body.").items()}
    torch.save(exported, tmp_path / "export.pth")
    _assert_state_equal(load_backbone(tmp_path / "export.pth")[0], _expected(fpn_run, "encoder.backbone.body."))
    assert load_backbone("none")[1]["kind"] == "random_init"


def test_c4_checkpoint_loads_encoder_backbone(tmp_path):
    run = _make_run(tmp_path / "c4", "c4")
    model, info = load_backbone(run, "target")
    assert info["arch"] == "c4"
    _assert_state_equal(model, _expected(run, "target_encoder.backbone."))


def test_bad_weights_are_one_line_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    for weights, problem in [
        (tmp_path / "junk.pt", "not a readable checkpoint"),
        (tmp_path / "partial.pth", "no complete ResNet-50"),
        (tmp_path, "no checkpoint in"),
        (tmp_path / "nowhere", "no such run folder"),
    ]:
        with pytest.raises(UserError) as err:
            load_backbone(weights)
        assert problem in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- schedule


def test_lr_schedule_warmup_cosine_and_steps():
    cfg = LinearConfig(epochs=10, batch_size=512, warmup_epochs=2)  # peak = 30 x 512 / 256 = 60
    spe, total = 10, 100
    assert lr_at(0, total, spe, cfg) == pytest.approx(0.6)  # warm-up from lr / 100
    assert lr_at(10, total, spe, cfg) == pytest.approx(0.6 + (60 - 0.6) * 0.5)
    assert lr_at(20, total, spe, cfg) == pytest.approx(60.0)
    assert lr_at(60, total, spe, cfg) == pytest.approx(1e-6 + (60 - 1e-6) * 0.5)  # cosine half-way
    assert lr_at(100, total, spe, cfg) == pytest.approx(1e-6)
    moco = LinearConfig(epochs=100, batch_size=256, warmup_epochs=0, schedule="steps")
    assert [lr_at(s, 1000, 10, moco) for s in (0, 599, 600, 799, 800, 999)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])


# ---------------------------------------------------------------- training


def test_probe_trains_only_the_classifier_and_reports_accuracy(folders, fpn_run, tmp_path, monkeypatch):
    captured = {}
    real = linear.load_backbone

    def spy(*args, **kwargs):
        model, info = real(*args, **kwargs)
        captured["model"] = model
        return model, info

    monkeypatch.setattr(linear, "load_backbone", spy)
    out = tmp_path / "probe"
    summary = linear_probe(fpn_run, folders / "train", folders / "val", out, device="cpu", progress=False, **TINY)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["top5_k"] == 3  # top-k with k = min(5, classes)
    assert saved["classes"] == sorted(COLOURS) and saved["evaluated_images"] == 6
    assert saved["skipped"]["count"] == 1 and saved["skipped"]["files"][0]["path"].endswith("red/broken.png")
    assert saved["finished"] and saved["step"] == 2 * math.ceil(13 / 8)
    assert saved["weights"]["soco_weights"] == "online"
    epochs = [r for r in read_metrics(out) if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [0, 1]
    # Frozen: every backbone tensor, BN running statistics included, still equals the checkpoint's.
    model = captured["model"]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    _assert_state_equal(model, _expected(fpn_run, "encoder.backbone.body."))
    assert (out / "checkpoints" / "last.pt").is_file()


def _bn_calibrated_resnet50(path, size: int) -> None:
    """A random-init ResNet-50 whose BatchNorm running statistics are those of colour images (as
    any trained network's are), saved as a plain state dict. With torchvision's raw init (running
    mean 0, var 1) the pooled features share one huge common component (norm ~250 against class
    differences ~40), which makes a few SGD steps a lottery; calibrated statistics remove it."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50(weights=None)
    rng = np.random.default_rng(0)  # flat random colours + noise: no class of the test in particular
    x = torch.tensor(rng.uniform(0, 1, (48, 3, 1, 1)) + rng.normal(0, 0.1, (48, 3, size, size)), dtype=torch.float32)
    x = (x - torch.tensor(LinearConfig.mean).view(1, 3, 1, 1)) / torch.tensor(LinearConfig.std).view(1, 3, 1, 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the statistics of the whole calibration batch
    model.train()
    with torch.no_grad():
        model(x)
    torch.save(model.state_dict(), path)


def test_probe_learns_linearly_separable_classes(tmp_path):
    # 3 classes of flat red / green / blue images with pixel noise: linearly separable in any
    # sensible feature space. Chance is 33 %; the trained probe must be far above it and its
    # training loss must fall well below the uniform prediction's ln 3 = 1.10.
    _write_class_folders(tmp_path / "train", 8, seed=10)
    _write_class_folders(tmp_path / "val", 4, seed=11)
    _bn_calibrated_resnet50(tmp_path / "r50.pth", 32)
    # lr for features of norm ~75 (not the paper's 30, meant for 100 epochs of 5000 steps).
    summary = linear_probe(
        tmp_path / "r50.pth",
        tmp_path / "train",
        tmp_path / "val",
        tmp_path / "out",
        device="cpu",
        progress=False,
        epochs=6,
        batch_size=8,
        image_size=32,
        workers=0,
        base_lr=0.1,
        warmup_epochs=0,
    )
    assert summary["evaluated_images"] == 12 and summary["weights"]["kind"] == "state_dict"
    assert summary["top1"] >= 75.0, summary["top1"]
    losses = [r["train_loss"] for r in read_metrics(tmp_path / "out") if "train_loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.5 * math.log(3) and losses[-1] < losses[0], losses


def test_resume_equals_an_uninterrupted_run(folders, tmp_path):
    kwargs = dict(device="cpu", progress=False, **{**TINY, "image_size": 32})  # 2 steps per epoch
    straight = linear_probe("none", folders / "train", folders / "val", tmp_path / "a", **kwargs)
    first = linear_probe("none", folders / "train", folders / "val", tmp_path / "b", max_steps=1, **kwargs)
    assert first["step"] == 1 and not first["finished"]
    second = linear_probe("none", folders / "train", folders / "val", tmp_path / "b", **kwargs)
    assert second["step"] == straight["step"] and second["top1"] == straight["top1"]
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["classifier"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["classifier"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert second["skipped"]["count"] == 1  # remembered across the resume


def test_a_resume_with_another_recipe_is_refused_unless_accepted(folders, tmp_path, capsys):
    kwargs = dict(device="cpu", progress=False, **{**TINY, "image_size": 32})
    out = tmp_path / "out"
    linear_probe("none", folders / "train", folders / "val", out, max_steps=1, **kwargs)
    with pytest.raises(UserError, match=r"made with other settings \(base_lr, momentum\)"):
        linear_probe("none", folders / "train", folders / "val", out, **{**kwargs, "base_lr": 1.0, "momentum": 0.5})
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 1  # nothing trained on
    summary = linear_probe(
        "none", folders / "train", folders / "val", out, accept_changes=True, **{**kwargs, "base_lr": 1.0}
    )
    assert summary["step"] == summary["total_steps"] and summary["config"]["base_lr"] == 1.0
    assert "note: the settings differ from the checkpoint's in base_lr" in capsys.readouterr().out


# ---------------------------------------------------------------- the command


def test_cli_class_mismatch_and_bad_weights_are_one_line(folders, tmp_path, capsys):
    val = tmp_path / "val"
    _write_class_folders(val, 1, seed=2)
    (val / "red").rename(val / "purple")
    base = ["linear", "--train", str(folders / "train"), "--out", str(tmp_path / "out"), "--workers", "0"]
    assert main([*base, "--weights", "none", "--val", str(val)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("soco: error: ") and err.count("\n") == 1
    assert "missing in val: red" in err and "not in train: purple" in err
    assert main([*base, "--weights", str(tmp_path / "nowhere"), "--val", str(folders / "val")]) == 2
    err = capsys.readouterr().err
    assert "no such run folder" in err and err.count("\n") == 1


def test_cli_linear_smoke(folders, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "linear",
        "--weights",
        "none",
        "--train",
        str(folders / "train"),
        "--val",
        str(folders / "val"),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--image-size",
        "64",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--max-steps",
        "1",
        "--no-progress",
    ]
    assert main(args) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["step"] == 1 and saved["peak_lr"] == pytest.approx(30 * 8 / 256)
    assert "top-1" in capsys.readouterr().out
