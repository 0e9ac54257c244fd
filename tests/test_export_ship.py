"""soco export --to safetensors / torchvision-backbone / timm: exports people can ship.

The checkpoints hold a full-size SoCo encoder (FPN or C4) with every tensor randomised; the
target network shares the online one's tensors (stored once: the choice of network is
tests/test_export.py's), the projector and predictor are small stand-ins. Expected names come
from torchvision's own models (``maskrcnn_resnet50_fpn_v2``, ``torchvision.models.resnet50``)
and values from the checkpoint file, never from the exporters' mappers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from data_fixtures import make_photos
from safetensors import safe_open
from safetensors.torch import load_file
from test_cli import call  # main(argv) in-process -> (status, out, err)

import soco_pretrain
from soco_pretrain.config import PretrainConfig, to_dict
from soco_pretrain.data.manifest import build_manifest, read_manifest, write_manifest
from soco_pretrain.engine.checkpoint import save_checkpoint
from soco_pretrain.errors import UserError
from soco_pretrain.model.encoder import SoCoEncoder
from soco_pretrain.train.loop import save_config
from soco_pretrain.transfer.export import KeyReport, export

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER_TITLE = "Aligning Pretraining for Detection via Object-Level Contrastive Learning"
NOT_PRETRAINED_TV = ("rpn.", "roi_heads.box_predictor.", "roi_heads.mask_head.", "roi_heads.mask_predictor.")
FC = {"fc.weight", "fc.bias"}


# ---------------------------------------------------------------- fixtures: runs and exports


def _randomised_encoder(cfg: PretrainConfig, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = SoCoEncoder(cfg.model).state_dict()
    with torch.no_grad():
        for value in state.values():
            if value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=gen))
            else:  # num_batches_tracked
                value.fill_(int(torch.randint(1, 10**6, (1,), generator=gen)))
    return state


def _make_run(root: Path, arch: str, *overrides: tuple[str, str, object], manifest: bool = False):
    """A run folder with a randomised encoder; returns (run, its "model" dict, its config dict)."""
    cfg = PretrainConfig()
    cfg.model.arch = arch
    for section, key, value in overrides:
        setattr(getattr(cfg, section), key, value)
    encoder = _randomised_encoder(cfg, seed=len(arch))
    model = {f"encoder.{k}": v for k, v in encoder.items()}
    model |= {f"target_encoder.{k}": v for k, v in encoder.items()}  # same tensors: stored once
    model |= {"projector.0.weight": torch.ones(4, 4), "predictor.0.weight": torch.ones(4, 4)}
    run = root / f"run_{arch}"
    save_checkpoint(run / "checkpoints" / "last.pt", {"model": model, "config": to_dict(cfg), "step": 7})
    save_config(cfg, run)
    if manifest:
        images = make_photos(root / "images", names=("astronaut", "coffee"), side=32)
        write_manifest(run, build_manifest([root / "images" / p for p in images], root, progress=False))
    return run, model, to_dict(cfg)


@pytest.fixture(scope="session")
def fpn_run(tmp_path_factory):
    """FPN run with a data manifest, a frozen stem and a warm start recorded in its config."""
    root = tmp_path_factory.mktemp("ship")
    return _make_run(
        root, "fpn", ("train", "freeze", "stem"), ("model", "init", "/elsewhere/r50_init.pth"), manifest=True
    )


@pytest.fixture(scope="session")
def c4_run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("ship"), "c4")


@pytest.fixture(scope="session")
def exports(tmp_path_factory, fpn_run, c4_run):
    """Lazily made exports, keyed by (target, arch); each made once."""
    out = tmp_path_factory.mktemp("shipped")
    runs = {"fpn": fpn_run[0], "c4": c4_run[0]}
    done: dict[tuple, KeyReport] = {}
    suffix = {"safetensors": ".safetensors"}

    def get(target: str, arch: str) -> KeyReport:
        if (target, arch) not in done:
            path = out / f"{target}_{arch}{suffix.get(target, '.pth')}"
            done[(target, arch)] = export(runs[arch], target, out=path)
        return done[(target, arch)]

    return get


def _assert_same(actual, expected, name):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    assert torch.equal(actual, expected), f"{name} differs from the checkpoint's tensor"


def _tv_source(name: str) -> str:
    # maskrcnn_resnet50_fpn_v2 name -> SoCoEncoder key (model/encoder.py builds torchvision's modules)
    return name[len("roi_heads.") :] if name.startswith("roi_heads.box_head.") else name


# ---------------------------------------------------------------- safetensors


def test_safetensors_holds_the_torchvision_export(exports):
    for arch in ("fpn", "c4"):
        shipped = load_file(exports("safetensors", arch).out)
        plain = torch.load(exports("torchvision", arch).out, weights_only=True)
        assert set(shipped) == set(plain)
        for name, tensor in plain.items():
            _assert_same(shipped[name], tensor, name)


def test_safetensors_fpn_loads_into_mask_rcnn_v2(exports, fpn_run):
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    _, ckpt, _ = fpn_run
    report = exports("safetensors", "fpn")
    state = load_file(report.out)
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=5)
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    heads = {k for k in model.state_dict() if k.startswith(NOT_PRETRAINED_TV)}
    # BatchNorm fills in a missing num_batches_tracked itself and does not list it
    assert set(result.missing_keys) == {k for k in heads if not k.endswith("num_batches_tracked")}
    loaded = model.state_dict()
    for name in state:
        _assert_same(loaded[name], ckpt[f"encoder.{_tv_source(name)}"], name)
    assert report.loaded == len(state) and report.missing == len(heads)
    rows = {r.module: r for r in report.detector}
    assert rows["rpn"].missing > 0 and rows["roi_heads.mask_head"].missing > 0
    assert {r.module: r.unused for r in report.checkpoint_unused} == {
        "target_encoder": len(state),
        "projector": 1,
        "predictor": 1,
    }


def test_safetensors_c4_loads_into_resnet50(exports, c4_run):
    from torchvision.models import resnet50

    state = load_file(exports("safetensors", "c4").out)
    result = resnet50(weights=None).load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == FC
    for name, tensor in state.items():
        _assert_same(tensor, c4_run[1][f"encoder.backbone.{name}"], name)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_safetensors_metadata(exports, fpn_run, c4_run):
    run, _, config = fpn_run
    meta = _metadata(exports("safetensors", "fpn").out)
    manifest = read_manifest(run)
    assert set(meta) == {
        "format",
        "arch",
        "backbone",
        "weights",
        "step",
        "soco_pretrain_version",
        "config",
        "recipe",
        "data_manifest_hash",
        "data_manifest_count",
        "license",
    }
    assert meta["format"] == "soco-pretrain"
    assert (meta["arch"], meta["backbone"], meta["weights"], meta["step"]) == ("fpn", "resnet50", "online", "7")
    assert meta["soco_pretrain_version"] == soco_pretrain.__version__
    shipped = json.loads(meta["config"])  # the saved config, but no path of the training machine
    assert shipped["model"]["init"] == "r50_init.pth" and config["model"]["init"] == "/elsewhere/r50_init.pth"
    shipped["model"]["init"] = config["model"]["init"]
    assert shipped == config
    assert meta["data_manifest_hash"] == manifest["set_hash"] and meta["data_manifest_count"] == "2"
    for words in ("fpn", "resnet50", "epochs 100", "batch 2048", "base_lr 1.0", "views 224/224/112"):
        assert words in meta["recipe"], words
    assert "freeze stem" in meta["recipe"] and "init r50_init.pth" in meta["recipe"]  # the name, not the path
    assert "\n" not in meta["recipe"]
    assert "training data" in meta["license"] and "MIT" in meta["license"]

    c4 = _metadata(exports("safetensors", "c4").out)  # no manifest, nothing frozen, no warm start
    assert "data_manifest_hash" not in c4 and "data_manifest_count" not in c4
    assert c4["arch"] == "c4" and "freeze" not in c4["recipe"] and "init" not in c4["recipe"]
    assert json.loads(c4["config"]) == c4_run[2]


def _code_block(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def _run_snippet(code: str, weights: Path, monkeypatch) -> None:
    """Run the card's loading code where the file is (it names the file without a folder) and
    check that its ``model`` then holds every tensor of the file."""
    monkeypatch.chdir(weights.parent)
    namespace: dict = {}
    exec(compile(code, "MODEL_CARD.md", "exec"), namespace)  # noqa: S102 - our own card, as written
    loaded = namespace["model"].state_dict()
    for name, tensor in load_file(weights).items():
        _assert_same(loaded[name], tensor, name)


def test_model_card_beside_the_file(exports, fpn_run, monkeypatch):
    report = exports("safetensors", "fpn")
    card_file = report.out.with_name("safetensors_fpn.MODEL_CARD.md")
    assert card_file.is_file() and str(card_file) in report.format()
    card = card_file.read_text()
    manifest = read_manifest(fpn_run[0])
    for words in (
        PAPER_TITLE,
        "NeurIPS 2021",
        "resnet50",
        "Step: 7",
        manifest["set_hash"],
        "2 images",
        "`train.epochs` | 100",
        "`train.freeze` | stem",
        "pip install safetensors",
        "Intended use",
        "MIT",
    ):
        assert words in card, words
    assert "/elsewhere" not in card  # a local path means nothing to whoever gets the file
    code = _code_block(card)
    assert "maskrcnn_resnet50_fpn_v2" in code and len(code.strip().splitlines()) <= 4
    _run_snippet(code, report.out, monkeypatch)


def test_model_card_of_a_c4_run_without_manifest(exports, monkeypatch):
    report = exports("safetensors", "c4")
    card = report.out.with_name("safetensors_c4.MODEL_CARD.md").read_text()
    data = card.split("## Training data")[1].split("##")[0]
    assert "Not recorded" in data
    code = _code_block(card)
    assert "torchvision.models.resnet50" in code
    _run_snippet(code, report.out, monkeypatch)


def test_model_card_of_an_unfinished_run_says_where_it_stopped(tmp_path):
    run, model, config = _make_run(tmp_path, "c4")
    checkpoint = run / "checkpoints" / "last.pt"
    cases = [  # (what the checkpoint holds besides model and config, the card's step line)
        ({"step": 7, "total_steps": 20}, "Step: 7: stopped at step 7 of 20, before the end of its schedule"),
        ({"step": 20, "total_steps": 20}, "Step: 20 of 20 (the run finished its schedule)"),
        # written before total_steps was recorded: 100 epochs x 3 steps, from its position (epoch 2, 1 step in)
        ({"step": 7, "epoch": 2, "batch_in_epoch": 1}, "stopped at step 7 of 300"),
        ({"step": 2, "epoch": 0, "batch_in_epoch": 2}, "Step: 2 (optimiser steps"),  # first epoch: unknown
    ]
    for extra, words in cases:
        save_checkpoint(checkpoint, {"model": model, "config": config, **extra})
        report = export(run, "safetensors", out=tmp_path / "w.safetensors")
        card = (tmp_path / "w.MODEL_CARD.md").read_text()
        assert words in card, (extra, card.split("## Recipe")[0])
        recorded = extra["total_steps"] if "total_steps" in extra else {7: 300, 2: None}[extra["step"]]
        assert _metadata(report.out).get("total_steps") == (None if recorded is None else str(recorded))


def test_a_copy_without_its_manifest_says_what_the_metadata_knows(exports, fpn_run, tmp_path):
    """The leak guard on a safetensors export copied without FILE.manifest.json: the metadata has
    the set hash and count, not the per-file hashes, and the line says so (not "no data manifest")."""
    import shutil

    from soco_pretrain.data.manifest import check_weights_no_leak

    copy = tmp_path / "shipped.safetensors"
    shutil.copy(exports("safetensors", "fpn").out, copy)
    lines: list[str] = []
    check_weights_no_leak([("--weights", copy)], [tmp_path / "val.png"], "val", lines.append)
    set_hash = read_manifest(fpn_run[0])["set_hash"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    for words in (str(copy), "shipped.safetensors.manifest.json", f"set hash {set_hash[:12]} (2 images)", "per-file"):
        assert words in lines[0], (words, lines[0])
    assert "no data manifest" not in lines[0]
    lines.clear()  # an export of a run without a manifest has nothing in its metadata either
    check_weights_no_leak([("--weights", exports("safetensors", "c4").out)], [], "val", lines.append)
    assert len(lines) == 1 and "has no data manifest" in lines[0]


# ---------------------------------------------------------------- torchvision-backbone / timm


@pytest.mark.parametrize("arch, prefix", [("fpn", "encoder.backbone.body."), ("c4", "encoder.backbone.")])
def test_backbone_loads_into_torchvision_resnet50(arch, prefix, exports, fpn_run, c4_run):
    from torchvision.models import resnet50

    ckpt = (fpn_run if arch == "fpn" else c4_run)[1]
    report = exports("torchvision-backbone", arch)
    state = torch.load(report.out, weights_only=True)
    model = resnet50(weights=None)
    assert set(state) == set(model.state_dict()) - FC
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == FC
    loaded = model.state_dict()
    for name in state:
        _assert_same(loaded[name], ckpt[prefix + name], name)
    assert "torchvision.models.resnet50 / timm resnet50" in report.layout
    assert report.loaded == len(state) and report.missing == 2
    assert {r.module: r.missing for r in report.detector if r.missing} == {"fc": 2}
    unused = {r.module: r.unused for r in report.checkpoint_unused}
    encoder_keys = [k for k in ckpt if k.startswith("encoder.")]
    assert unused.get("encoder", 0) == len(encoder_keys) - len(state)  # FPN and box head (fpn); none (c4)
    assert unused["target_encoder"] == len(encoder_keys)


def test_another_resnet_is_named_and_loads(tmp_path, monkeypatch):
    """A basic-block ResNet-18 FPN run: its body loads into torchvision.models.resnet18; its
    safetensors card names resnet18 and its snippet loads the file."""
    from torchvision.models import resnet18

    run, ckpt, _ = _make_run(tmp_path, "fpn", ("model", "backbone", "resnet18"))
    report = export(run, "timm", out=tmp_path / "r18.pth")
    state = torch.load(report.out, weights_only=True)
    result = resnet18(weights=None).load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == FC
    assert not any(".conv3." in name for name in state)  # BasicBlocks: conv1, conv2 only
    for name, tensor in state.items():
        _assert_same(tensor, ckpt[f"encoder.backbone.body.{name}"], name)
    assert "torchvision.models.resnet18 / timm resnet18" in report.layout

    shipped = export(run, "safetensors", out=tmp_path / "r18.safetensors")
    assert _metadata(shipped.out)["backbone"] == "resnet18"
    assert shipped.loaded == len([k for k in ckpt if k.startswith("encoder.")])
    card = (tmp_path / "r18.MODEL_CARD.md").read_text()
    assert "resnet18" in card.split("\n")[0]
    _run_snippet(_code_block(card), shipped.out, monkeypatch)


def test_timm_alias_writes_the_same_file(exports, tmp_path):
    backbone = exports("torchvision-backbone", "c4")
    timm = export(backbone.checkpoint, "timm", out=tmp_path / backbone.out.name)
    assert timm.out.read_bytes() == backbone.out.read_bytes()
    assert timm.target == "timm" and "timm resnet50" in timm.format()


# ---------------------------------------------------------------- CLI and bad input


def test_cli_safetensors_end_to_end(fpn_run, tmp_path, capsys):
    out = tmp_path / "ship" / "soco_r50.safetensors"
    status, stdout, err = call(
        ["export", str(fpn_run[0]), "--to", "safetensors", "--soco-weights", "target", "-o", str(out)], capsys
    )
    assert status == 0, err
    for words in ("loaded", "missing", "unused", "backbone.body", "roi_heads.box_head", "soco_r50.MODEL_CARD.md"):
        assert words in stdout, words
    assert (tmp_path / "ship" / "soco_r50.MODEL_CARD.md").is_file()
    assert (tmp_path / "ship" / "soco_r50.safetensors.manifest.json").is_file()
    assert _metadata(out)["weights"] == "target"
    status, stdout, err = call(["export", str(fpn_run[0]), "--to", "timm", "-o", str(tmp_path / "b.pth")], capsys)
    assert status == 0, err
    assert "timm resnet50" in stdout and "fc" in stdout


def test_bad_inputs_are_one_line_errors(fpn_run, tmp_path, capsys):
    run = str(fpn_run[0])
    (tmp_path / "a_dir").mkdir()
    cases = {
        "safetensors into a directory": ([run, "--to", "safetensors", "-o", str(tmp_path / "a_dir")], "is a directory"),
        "backbone into a directory": ([run, "--to", "timm", "-o", str(tmp_path / "a_dir")], "is a directory"),
        "unknown target": ([run, "--to", "onnx", "-o", str(tmp_path / "x")], "invalid choice"),
        "config for safetensors": (
            [run, "--to", "safetensors", "-o", str(tmp_path / "x"), "--config-out", str(tmp_path / "c.yaml")],
            "--config-out",
        ),
    }
    for case, (args, words) in cases.items():
        status, _, err = call(["export", *args], capsys)
        assert status == 2, case
        assert err.startswith("soco: error:") and err.strip().count("\n") == 0, (case, err)
        assert words in err, (case, err)
    assert list((tmp_path / "a_dir").iterdir()) == [] and not (tmp_path / "x").exists()
    # the extension is how readers tell safetensors from torch / pickle files: a mismatch is refused
    mismatched = {
        "safetensors as .pth": (["--to", "safetensors", "-o", str(tmp_path / "w.pth")], "name it e.g. w.safetensors"),
        "torchvision as .safetensors": (["--to", "torchvision", "-o", str(tmp_path / "w.safetensors")], "w.pth"),
        "detectron2 as .safetensors": (["--to", "detectron2", "-o", str(tmp_path / "d.safetensors")], "d.pkl"),
        "timm as .safetensors": (["--to", "timm", "-o", str(tmp_path / "b.safetensors")], "--to safetensors"),
    }
    for case, (args, words) in mismatched.items():
        status, _, err = call(["export", run, *args], capsys)
        assert status == 2 and err.startswith("soco: error:") and err.strip().count("\n") == 0, (case, err)
        assert words in err, (case, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir"]  # nothing written, not even a config
    with pytest.raises(UserError, match="unknown target 'onnx'") as exc:  # the Python API
        export(run, "onnx", out=tmp_path / "x")
    assert "\n" not in str(exc.value) and "safetensors" in str(exc.value)
