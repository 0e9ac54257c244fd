"""Warm start (``soco pretrain --init FILE``): every format loads into the encoder it should,
partial or foreign files are refused in one line before anything is written.

The files are made here: random torchvision models' state dicts (``weights=None``), a SoCo
checkpoint written with the real model's keys, and its Detectron2 / MMDetection exports. The
oracle for "what loaded" is the source model's own tensors, compared by torchvision name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from data_fixtures import make_photos, make_store

from soco_pretrain.cli import main
from soco_pretrain.config import ModelConfig, PretrainConfig, to_dict
from soco_pretrain.engine.checkpoint import save_checkpoint
from soco_pretrain.model import SoCoModel
from soco_pretrain.transfer.warm_start import InitError, apply_init, prepare_init

pytestmark = pytest.mark.usefixtures("one_thread")

# The runs and most files use ResNet-18 (the formats do not depend on the backbone; R18 is
# cheap); the torchvision detection file is the real maskrcnn_resnet50_fpn_v2.
BACKBONE = "resnet18"


def _seeded(build, seed: int):
    torch.manual_seed(seed)
    model = build()
    with torch.no_grad():  # distinct, non-default running statistics: a load of BN buffers shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    made = {}
    resnet = _seeded(lambda: getattr(torchvision.models, BACKBONE)(weights=None), 1)
    torch.save(resnet.state_dict(), root / "resnet.pth")
    made["resnet"] = (root / "resnet.pth", resnet.state_dict())
    det = _seeded(lambda: torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None), 2)
    torch.save({"model": det.state_dict()}, root / "maskrcnn_v2.pth")  # under "model", as torchvision's references
    made["detection"] = (root / "maskrcnn_v2.pth", det.state_dict())
    r34 = _seeded(lambda: torchvision.models.resnet34(weights=None), 3)  # another backbone than the runs'
    torch.save(r34.state_dict(), root / "r34.pth")
    made["r34"] = (root / "r34.pth", r34.state_dict())
    partial = {k: v for k, v in resnet.state_dict().items() if not k.startswith("layer4.")}
    torch.save(partial, root / "no_layer4.pth")
    made["partial"] = (root / "no_layer4.pth", partial)
    (root / "corrupt.pth").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    made["corrupt"] = (root / "corrupt.pth", None)
    return made


@pytest.fixture(scope="module")
def soco_run(tmp_path_factory):
    """A SoCo FPN checkpoint with seeded random online weights (the target differs)."""
    run = tmp_path_factory.mktemp("soco_run")
    cfg = PretrainConfig()
    cfg.model.backbone = BACKBONE
    torch.manual_seed(4)
    model = SoCoModel(cfg)
    with torch.no_grad():
        for p in model.target_parameters():
            p.add_(1.0)
    save_checkpoint(run / "checkpoints" / "last.pt", {"model": model.state_dict(), "step": 3, "config": to_dict(cfg)})
    return run, {k[len("encoder.") :]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}


def _fresh(arch="fpn", backbone=BACKBONE):
    cfg = PretrainConfig()
    cfg.model.arch, cfg.model.backbone = arch, backbone
    torch.manual_seed(0)
    return SoCoModel(cfg)


def _count(state, prefix: str) -> int:
    """Tensors of ``state`` under ``prefix`` that a load must fill (not the fc, not BN counters)."""
    return sum(1 for k in state if k.startswith(prefix) and not k.startswith("fc.") and "num_batches" not in k)


R50 = _count(torchvision.models.resnet50(weights=None).state_dict(), "")  # 265: torchvision's own keys
BODY = _count(getattr(torchvision.models, BACKBONE)(weights=None).state_dict(), "")


def _equal(a, b) -> bool:
    return a.shape == b.shape and torch.equal(a.float(), b.float())


def test_torchvision_resnet_fills_the_fpn_body(files):
    path, source = files["resnet"]
    report = prepare_init(path, ModelConfig(arch="fpn", backbone=BACKBONE))
    assert report.modules["backbone.body"] == (BODY, BODY)  # every tensor but the BN counters
    assert report.modules["backbone.fpn"][0] == 0 and report.modules["roi_heads.box_head"][0] == 0
    assert report.unused == ["fc.weight", "fc.bias"]
    model = _fresh()
    fpn_before = {k: v.clone() for k, v in model.encoder.backbone.fpn.state_dict().items()}
    apply_init(model, report)
    body = model.encoder.backbone.body.state_dict()
    assert all(_equal(body[k], v) for k, v in source.items() if not k.startswith("fc."))
    assert all(_equal(model.encoder.backbone.fpn.state_dict()[k], v) for k, v in fpn_before.items())
    # the target starts as a copy of the online encoder
    target = model.target_encoder.state_dict()
    assert all(_equal(target[k], v) for k, v in model.encoder.state_dict().items())
    text = report.format()
    assert re.search(rf"backbone.body +{BODY}/{BODY} ", text) and "box_head" in text and "random init" in text


def test_torchvision_detection_model_fills_body_fpn_and_box_head(files):
    path, source = files["detection"]
    report = prepare_init(path, ModelConfig(arch="fpn"))
    fpn, head = _count(source, "backbone.fpn."), _count(source, "roi_heads.box_head.")
    assert report.modules == {
        "backbone.body": (R50, R50),
        "backbone.fpn": (fpn, fpn),
        "roi_heads.box_head": (head, head),
    }
    assert any(k.startswith("rpn.") for k in report.unused) and any(
        k.startswith("roi_heads.mask") for k in report.unused
    )
    model = _fresh(backbone="resnet50")
    apply_init(model, report)
    own = model.encoder.state_dict()
    for key, value in source.items():
        if key.startswith("backbone."):
            assert _equal(own[key], value), key
        elif key.startswith("roi_heads.box_head."):
            assert _equal(own[key[len("roi_heads.") :]], value), key


def test_soco_run_and_its_detectron2_and_mmdet_exports_load_the_online_encoder(soco_run, tmp_path):
    run, online = soco_run
    from soco_pretrain.transfer.export import export

    sources = {"run": run}
    for target, name in (("detectron2", "d2.pkl"), ("mmdet", "mm.pth")):
        export(run, target, out=tmp_path / name)
        sources[target] = tmp_path / name
    for kind, path in sources.items():
        report = prepare_init(path, ModelConfig(arch="fpn", backbone=BACKBONE))
        fpn, head = _count(online, "backbone.fpn."), _count(online, "box_head.")
        assert report.modules == {
            "backbone.body": (BODY, BODY),
            "backbone.fpn": (fpn, fpn),
            "roi_heads.box_head": (head, head),
        }, kind
        model = _fresh()
        apply_init(model, report)
        own = model.encoder.state_dict()
        for key, value in online.items():
            if not key.endswith("num_batches_tracked"):
                assert _equal(own[key], value), (kind, key)
    assert "Detectron2 checkpoint" in prepare_init(sources["detectron2"], ModelConfig(backbone=BACKBONE)).description


def test_a_file_of_another_backbone_is_refused_naming_it(files):
    path, _ = files["r34"]
    with pytest.raises(InitError) as err:
        prepare_init(path, ModelConfig(arch="fpn", backbone=BACKBONE))
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "resnet34" in message and "model.backbone=resnet34" in message and "--init-partial" in message


def test_a_partial_file_is_refused_unless_init_partial(files):
    path, source = files["partial"]
    with pytest.raises(InitError) as err:
        prepare_init(path, ModelConfig(arch="fpn", backbone=BACKBONE))
    assert "layer4" in str(err.value) and "\n" not in str(err.value)
    report = prepare_init(path, ModelConfig(arch="fpn", backbone=BACKBONE, init_partial=True))
    n, total = report.modules["backbone.body"]
    assert n == total - sum(1 for k in files["resnet"][1] if k.startswith("layer4.") and "num_batches" not in k)
    model = _fresh()
    apply_init(model, report)
    own = model.encoder.backbone.body.state_dict()
    assert all(_equal(own[k], v) for k, v in source.items() if not k.startswith("fc."))
    random_layer4 = _fresh().encoder.backbone.body.layer4.state_dict()  # what the file lacks keeps its init
    assert all(_equal(model.encoder.backbone.body.layer4.state_dict()[k], v) for k, v in random_layer4.items())


def test_a_corrupt_file_is_one_line(files):
    path, _ = files["corrupt"]
    with pytest.raises(InitError) as err:
        prepare_init(path, ModelConfig())
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- through soco pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm_data")
    rel = make_photos(root / "images", ("astronaut", "coffee"), side=96)
    return root / "images", make_store(root / "store", root / "images", rel, boxes_per_image=4)


def _pretrain_argv(data, out, *extra):
    from data_fixtures import SMALL_PRETRAIN

    images, store = data
    sets = [x for s in (*SMALL_PRETRAIN, f"model.backbone={BACKBONE}") for x in ("--set", s)]
    return ["pretrain", "--preset", "tiny", "--images", str(images), "--proposals", str(store), "-o", str(out),
            *sets, "--max-steps", "1", *extra]  # fmt: skip


def test_cli_init_loads_reports_and_records(data, files, tmp_path, capsys):
    path, source = files["resnet"]
    out = tmp_path / "run"
    assert main(_pretrain_argv(data, out, "--init", str(path), "--set", "train.freeze=backbone")) == 0
    printed = capsys.readouterr().out
    assert "init: torchvision ResNet state dict" in printed and re.search(rf"backbone.body +{BODY}/{BODY} ", printed)
    saved = json.loads((out / "init_report.json").read_text())
    assert saved["modules"]["backbone.body"] == {"loaded": BODY, "total": BODY}
    import hashlib

    assert saved["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    from soco_pretrain.weights import read_soco_checkpoint

    found = read_soco_checkpoint(out)
    assert found.config["model"]["init"] == str(path.resolve()) and found.config["train"]["freeze"] == "backbone"
    # frozen backbone: after a step both networks still hold the file's ResNet exactly
    for network in (found.online, found.target):
        for key, value in source.items():
            if not key.startswith("fc."):
                assert _equal(network[f"backbone.body.{key}"], value), key
    # a rerun resumes from the checkpoint and does not read the file again
    path_moved = path.with_suffix(".moved")
    path.rename(path_moved)
    try:
        assert main(_pretrain_argv(data, out, "--init", str(path), "--set", "train.freeze=backbone")) == 2
        err = capsys.readouterr().err  # the flag itself names a missing file, and that a resume needs none
        assert "no such file" in err and "needs no --init" in err
    finally:
        path_moved.rename(path)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("r34", "resnet34"),
        ("corrupt", "corrupt.pth"),
        ("missing", "no such file"),
    ],
)
def test_cli_bad_init_is_one_line_and_writes_nothing(data, files, tmp_path, capsys, case, expected):
    path = tmp_path / "nothing.pth" if case == "missing" else files[case][0]
    out = tmp_path / "run"
    assert main(_pretrain_argv(data, out, "--init", str(path))) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_freezing_without_init_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_pretrain_argv(data, out, "--set", "train.freeze=backbone")) == 2
    err = capsys.readouterr().err
    assert "train.freeze=backbone" in err and "--init" in err and not out.exists()


@pytest.mark.parametrize(
    "case, flags, part, fits",
    [
        ("resnet", ["--set", "train.freeze=backbone+fpn"], "backbone.fpn.", "backbone"),  # no FPN in the file
        ("partial", ["--init-partial", "--set", "train.freeze=backbone"], "backbone.body.layer4.", "stem"),
    ],
)
def test_freezing_tensors_the_file_does_not_fill_is_refused(data, files, tmp_path, capsys, case, flags, part, fits):
    """Frozen random weights would stay random for the whole run: one line naming how many and
    the first few, the largest freeze mode that would work, and nothing written."""
    out = tmp_path / "run"
    assert main(_pretrain_argv(data, out, "--init", str(files[case][0]), *flags)) == 2
    err = capsys.readouterr().err.strip()
    unfilled = _count(_fresh().encoder.state_dict(), part)
    assert len(err.splitlines()) == 1 and f"{unfilled} tensors fixed that the file does not hold" in err, err
    assert f"({part}" in err and f"train.freeze={fits})" in err and not out.exists()


def test_a_warm_started_run_resumes_by_the_init_files_sha256(data, files, tmp_path, capsys):
    """Resume never reads the init file: without --init the recorded one is kept; --init is
    compared by content (another path with the same bytes is said in one line; other bytes, even
    at the recorded path, are refused naming both)."""
    import shutil

    import yaml

    init = tmp_path / "r.pth"
    shutil.copy(files["resnet"][0], init)
    out = tmp_path / "run"
    freeze = ("--set", "train.freeze=backbone")
    assert main(_pretrain_argv(data, out, "--init", str(init), *freeze)) == 0
    moved = tmp_path / "moved.pth"
    init.rename(moved)
    capsys.readouterr()
    assert main(_pretrain_argv(data, out, *freeze)) == 0  # resumes, no --init
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "differs" not in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["init"] == str(init.resolve())
    assert main(_pretrain_argv(data, out, "--init", str(moved), *freeze)) == 0  # same bytes elsewhere
    assert f"found at another path, {moved.resolve()}" in capsys.readouterr().out
    shutil.copy(files["partial"][0], init)  # other bytes at the recorded path
    for other in (init, files["r34"][0]):
        assert main(_pretrain_argv(data, out, "--init", str(other), *freeze)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--init {Path(other).resolve()} (sha256" in err, err
        assert f"started from {init.resolve()} (sha256" in err and "resume without --init" in err


@pytest.mark.parametrize("preset", ["fpn-warm", "fpn-head-warm"])
def test_warm_presets_without_init_are_refused(data, tmp_path, capsys, preset):
    out = tmp_path / "run"
    assert main(_pretrain_argv(data, out, "--preset", preset)) == 2
    err = capsys.readouterr().err
    assert f"--preset {preset} is a warm start" in err and "--init FILE" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_warm_presets_resolve():
    from soco_pretrain.presets import load_preset

    head, full = load_preset("fpn-head-warm"), load_preset("fpn-warm")
    assert head.train.freeze == "backbone" and head.train.epochs == 12 and head.model.arch == "fpn"
    assert head.train.base_lr == 1.0  # the paper's: the trained parts start random
    assert full.train.freeze == "none" and full.train.base_lr == 0.1  # a tenth: the backbone starts trained


def test_a_model_zoo_fpn_and_two_fc_head_start_from_scratch(soco_run, tmp_path):
    """Detectron2's model-zoo R-FPN has an FPN without norm (conv + bias) and a two-fc box head:
    some shapes match soco's, the layout does not, so only the body loads (with a note each)."""
    import pickle

    from soco_pretrain.transfer.export import export

    run, online = soco_run
    export(run, "detectron2", out=tmp_path / "d2.pkl")
    with open(tmp_path / "d2.pkl", "rb") as f:
        content = pickle.load(f)
    model = {k: v for k, v in content["model"].items() if not (k.startswith("backbone.fpn_") and ".norm." in k)}
    model = {k: v for k, v in model.items() if not k.startswith("roi_heads.box_head.conv")}
    for k in [k for k in model if k.startswith("backbone.fpn_")]:
        model[k.replace(".weight", ".bias")] = np.zeros(256, np.float32)
    model["roi_heads.box_head.fc2.weight"] = np.zeros((1024, 1024), np.float32)
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump({"model": model, "__author__": "test"}, f)
    report = prepare_init(tmp_path / "zoo.pkl", ModelConfig(arch="fpn", backbone=BACKBONE))
    fpn, head = _count(online, "backbone.fpn."), _count(online, "box_head.")
    assert report.modules == {"backbone.body": (BODY, BODY), "backbone.fpn": (0, fpn), "roi_heads.box_head": (0, head)}
    assert not any(k.startswith(("backbone.fpn.", "box_head.")) for k in report.state)
    assert len(report.notes) == 2 and "another layout" in report.format()


@pytest.mark.parametrize(
    "backbone, arch, other",
    [("resnet34", "fpn", "resnet50"), ("resnet50", "c4", "resnet101"), ("resnext50_32x4d", "c4", "resnet50")],
)
def test_other_backbones_warm_start_from_their_own_torchvision_weights(tmp_path, backbone, arch, other):
    source = _seeded(lambda: getattr(torchvision.models, backbone)(weights=None), 5).state_dict()
    torch.save(source, tmp_path / "w.pth")
    report = prepare_init(tmp_path / "w.pth", ModelConfig(arch=arch, backbone=backbone))
    body = _count(source, "")
    assert report.modules[report.body] == (body, body)
    model = _fresh(arch, backbone)
    apply_init(model, report)
    own = model.encoder.get_submodule("backbone.body" if arch == "fpn" else "backbone").state_dict()  # the ResNet
    assert all(_equal(own[k], v) for k, v in source.items() if not k.startswith("fc."))
    with pytest.raises(InitError, match=f"holds {backbone} weights"):  # into a run of another backbone
        prepare_init(tmp_path / "w.pth", ModelConfig(arch=arch, backbone=other))


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("model.backbone=resnet9", "one of resnet18"),  # an unknown backbone name
        ("model.backbone=resnet18", None),  # basic blocks are fine for FPN ...
    ],
)
def test_unknown_backbone_is_one_line_and_writes_nothing(data, tmp_path, capsys, setting, expected):
    out = tmp_path / "run"
    argv = ["config", "show", "--preset", "tiny", "--set", setting]
    assert main(argv) == (2 if expected else 0)
    err = capsys.readouterr().err.strip()
    if expected:
        assert expected in err and "model.backbone" in err and len(err.splitlines()) == 1
        assert main(_pretrain_argv(data, out, "--set", setting)) == 2 and not out.exists()


def test_c4_with_basic_blocks_is_refused(capsys):
    assert main(["config", "show", "--preset", "c4-100ep", "--set", "model.backbone=resnet18"]) == 2
    assert "bottleneck" in capsys.readouterr().err


def test_a_plain_pickle_loads_only_numpy_arrays(tmp_path):
    """Detectron2 .pkl files are read by a restricted unpickler (the allowlist it shares with
    checkpoint loading): arrays of pickle protocols 2, 4 and 5 load; any other global is refused in
    one line, before it could run."""
    import os
    import pickle
    from collections import OrderedDict

    from soco_pretrain.weights import WeightsError, load_weights_file

    weights = OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3), n=np.int64(3))
    for protocol in (2, 4, 5):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps({"model": weights}, protocol=protocol))
        _, content = load_weights_file(path)
        assert np.array_equal(content["model"]["w"], weights["w"]) and content["model"]["n"] == 3

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(WeightsError, match=r"evil\.pkl: not a readable .*(posix|os)\.system is not allowed"):
        load_weights_file(bad)
    assert not (tmp_path / "pwned").exists()
