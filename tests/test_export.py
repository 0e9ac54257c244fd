"""soco export: weights that load into torchvision, Detectron2 and MMDetection (stage 5).

The checkpoints are full-size SoCo models (FPN and C4) with every tensor randomised and the
online and target networks different, saved as a run folder: no training. Each export is made
once per session.

Detectron2 and MMDetection do not install here, so their expected key lists (with shapes) are
generated below from the rules of their model definitions -- not from the exporter's mapping:

- Detectron2 v0.6: detectron2/modeling/backbone/resnet.py (BasicStem.conv1 with norm;
  stages res2..res5 of BottleneckBlock, R-50 = 3, 4, 6, 3 blocks; conv1 1x1, conv2 3x3, conv3
  1x1, each Conv2d(bias=False, norm=...); ``shortcut`` 1x1 + norm where in != out channels, i.e.
  block 0 of each stage), detectron2/modeling/backbone/fpn.py (``fpn_lateral{s}`` 1x1 and
  ``fpn_output{s}`` 3x3 with s = log2(stride) = 2..5, no bias with a norm, ``.norm``; the bottom-up
  ResNet is ``backbone.bottom_up``), detectron2/modeling/roi_heads/box_head.py
  (FastRCNNConvFCHead: ``conv{k}`` k=1..NUM_CONV with norm, ``fc{k}`` nn.Linear after flatten),
  roi_heads/roi_heads.py (Res5ROIHeads keeps res5 as ``roi_heads.res5``). Norm keys: weight, bias,
  running_mean, running_var (as Detectron2's model-zoo pickles: no num_batches_tracked).
- MMDetection v3.3.0: mmdet/models/backbones/resnet.py (ResNet.conv1 + ``bn1``; ``layer1..4`` of
  Bottleneck with conv1/bn1, conv2/bn2, conv3/bn3 and ``downsample.0`` conv / ``downsample.1``
  norm on block 0; R-50 = 3, 4, 6, 3), mmdet/models/necks/fpn.py (``lateral_convs.i`` and
  ``fpn_convs.i`` ConvModule, i = 0..3 for C2..C5: ``.conv`` without bias, norm named ``bn``),
  mmdet/models/roi_heads/bbox_heads/convfc_bbox_head.py (Shared4Conv1FCBBoxHead:
  ``shared_convs.0..3`` ConvModule, ``shared_fcs.0`` Linear(256*7*7, 1024)),
  mmdet/models/roi_heads/shared_heads/res_layer.py (ResLayer(stage=3) registers ``layer4``).
  Norm keys include num_batches_tracked (BatchNorm2d / SyncBatchNorm state dicts).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_cli import call  # main(argv) in-process -> (status, out, err)

from soco_pretrain.config import PretrainConfig, to_dict
from soco_pretrain.engine.checkpoint import save_checkpoint
from soco_pretrain.model import SoCoModel
from soco_pretrain.train.loop import save_config
from soco_pretrain.transfer.export import DEFAULT_WEIGHTS, KeyReport, export

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- fixtures: runs and exports


def _make_run(root: Path, arch: str) -> tuple[Path, dict]:
    """A run folder with a randomised SoCo checkpoint; returns (run, the saved "model" dict)."""
    cfg = PretrainConfig()
    cfg.model.arch = arch
    model = SoCoModel(cfg)
    gen = torch.Generator().manual_seed(0 if arch == "fpn" else 1)
    state = model.state_dict()
    with torch.no_grad():
        for value in state.values():  # online and target drawn independently: they differ
            if value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=gen))
            else:  # num_batches_tracked
                value.fill_(int(torch.randint(1, 10**6, (1,), generator=gen)))
    run = root / f"run_{arch}"
    save_checkpoint(run / "checkpoints" / "last.pt", {"model": state, "config": to_dict(cfg), "step": 7})
    save_config(cfg, run)
    return run, state


@pytest.fixture(scope="session")
def fpn_run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("export"), "fpn")


@pytest.fixture(scope="session")
def c4_run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("export"), "c4")


@pytest.fixture(scope="session")
def exports(tmp_path_factory, fpn_run, c4_run):
    """Lazily made exports, keyed by (target, arch, weights); each made once."""
    out = tmp_path_factory.mktemp("exported")
    runs = {"fpn": fpn_run[0], "c4": c4_run[0]}
    done: dict[tuple, KeyReport] = {}
    suffix = {"torchvision": ".pth", "detectron2": ".pkl", "mmdet": ".pth"}

    def get(target: str, arch: str, weights: str = "online") -> KeyReport:
        key = (target, arch, weights)
        if key not in done:
            path = out / f"{target}_{arch}_{weights}{suffix[target]}"
            done[key] = export(runs[arch], target, weights=weights, out=path)
        return done[key]

    return get


def _assert_same(actual, expected, name):
    actual = torch.as_tensor(actual)
    assert actual.shape == expected.shape, name
    assert actual.dtype == expected.dtype, name
    assert torch.equal(actual, expected), f"{name} differs from the checkpoint's tensor"


# ---------------------------------------------------------------- torchvision


NOT_PRETRAINED_TV = ("rpn.", "roi_heads.box_predictor.", "roi_heads.mask_head.", "roi_heads.mask_predictor.")


def _torchvision_source(name: str) -> str:
    # maskrcnn_resnet50_fpn_v2 names -> SoCoEncoder names (model/encoder.py builds from the same modules)
    return name[len("roi_heads.") :] if name.startswith("roi_heads.box_head.") else name


@pytest.mark.parametrize("weights", ["online", "target"])
def test_torchvision_fpn_loads_into_mask_rcnn_v2(weights, exports, fpn_run):
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    _, ckpt = fpn_run
    report = exports("torchvision", "fpn", weights)
    state = torch.load(report.out, weights_only=True)
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3)
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    expected_missing = {k for k in model.state_dict() if k.startswith(NOT_PRETRAINED_TV)}
    # BatchNorm fills in a missing num_batches_tracked itself and does not list it as missing
    assert set(result.missing_keys) == {k for k in expected_missing if not k.endswith("num_batches_tracked")}
    assert {k.split(".")[0] for k in expected_missing} == {"rpn", "roi_heads"}
    prefix = "encoder." if weights == "online" else "target_encoder."
    other = "target_encoder." if weights == "online" else "encoder."
    loaded = model.state_dict()
    for name in state:
        source = prefix + _torchvision_source(name)
        _assert_same(loaded[name], ckpt[source], name)
    # the other network really differs, so picking it would have failed above
    assert not torch.equal(state["backbone.body.conv1.weight"], ckpt[other + "backbone.body.conv1.weight"])
    assert report.loaded == len(state) == 392
    assert report.missing == len(expected_missing)
    assert report.config_out is None


def test_default_weights_are_the_online_network():
    # BYOL keeps the online encoder; the released converters read module.encoder (online)
    assert DEFAULT_WEIGHTS == "online"


def test_torchvision_c4_is_resnet50_keys(exports, c4_run):
    from torchvision.models import resnet50

    _, ckpt = c4_run
    report = exports("torchvision", "c4")
    state = torch.load(report.out, weights_only=True)
    model = resnet50(weights=None)
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"}
    loaded = model.state_dict()
    for name in state:
        _assert_same(loaded[name], ckpt[f"encoder.backbone.{name}"], name)
    assert "resnet50" in report.layout and "no fc" in report.layout


def test_report_counts_and_table(exports):
    report = exports("torchvision", "fpn")
    rows = {r.module: r for r in report.detector}
    assert rows["backbone.body"].loaded == 318  # ResNet-50 with BN buffers
    assert rows["backbone.fpn"].loaded == 48
    assert rows["roi_heads.box_head"].loaded == 26
    assert rows["rpn"].missing > 0 and rows["roi_heads.mask_head"].missing > 0
    unused = {r.module: r.unused for r in report.checkpoint_unused}
    assert unused == {"target_encoder": 392, "projector": 9, "target_projector": 9, "predictor": 9}
    table = report.format()
    for word in ("loaded", "missing", "unused", "target_encoder", "predictor", "roi_heads.mask_head"):
        assert word in table


# ---------------------------------------------------------------- Detectron2 v0.6 key lists

D2_NORM = ("weight", "bias", "running_mean", "running_var")
R50_BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}  # resnet.py build_resnet_backbone: {50: [3, 4, 6, 3]}
C_OUT = {2: 256, 3: 512, 4: 1024, 5: 2048}  # bottleneck output channels per stage


def _d2_conv(name, shape, tv_conv, tv_bn):
    """A Detectron2 Conv2d(bias=False, norm=BN): (name, shape, torchvision source name) rows."""
    rows = [(f"{name}.weight", shape, f"{tv_conv}.weight")]
    rows += [(f"{name}.norm.{p}", (shape[0],), f"{tv_bn}.{p}") for p in D2_NORM]
    return rows


def _d2_resnet(stage_prefix, tv_prefix):
    """Detectron2 R-50 keys; stage_prefix(stage) gives the prefix of 'stem' / 'res2'..'res5'."""
    rows = _d2_conv(f"{stage_prefix('stem')}stem.conv1", (64, 3, 7, 7), f"{tv_prefix}conv1", f"{tv_prefix}bn1")
    for s, blocks in R50_BLOCKS.items():
        out, mid = C_OUT[s], C_OUT[s] // 4
        for b in range(blocks):
            d2, tv = f"{stage_prefix(s)}res{s}.{b}", f"{tv_prefix}layer{s - 1}.{b}"
            cin = (64 if s == 2 else out // 2) if b == 0 else out
            if b == 0:
                rows += _d2_conv(f"{d2}.shortcut", (out, cin, 1, 1), f"{tv}.downsample.0", f"{tv}.downsample.1")
            rows += _d2_conv(f"{d2}.conv1", (mid, cin, 1, 1), f"{tv}.conv1", f"{tv}.bn1")
            rows += _d2_conv(f"{d2}.conv2", (mid, mid, 3, 3), f"{tv}.conv2", f"{tv}.bn2")
            rows += _d2_conv(f"{d2}.conv3", (out, mid, 1, 1), f"{tv}.conv3", f"{tv}.bn3")
    return rows


def detectron2_fpn_keys():
    """Detectron2 v0.6 Mask R-CNN R50-FPN, pretrained parts: (name, shape, SoCo encoder key)."""
    rows = _d2_resnet(lambda stage: "backbone.bottom_up.", "backbone.body.")
    for s in (2, 3, 4, 5):  # fpn.py: stage = log2(stride); torchvision's block i is C(i+2)
        i = s - 2
        rows += _d2_conv(
            f"backbone.fpn_lateral{s}",
            (256, C_OUT[s], 1, 1),
            f"backbone.fpn.inner_blocks.{i}.0",
            f"backbone.fpn.inner_blocks.{i}.1",
        )
        rows += _d2_conv(
            f"backbone.fpn_output{s}",
            (256, 256, 3, 3),
            f"backbone.fpn.layer_blocks.{i}.0",
            f"backbone.fpn.layer_blocks.{i}.1",
        )
    for k in (1, 2, 3, 4):  # box_head.py: conv1..conv4 (NUM_CONV 4), fc1 (NUM_FC 1, FC_DIM 1024)
        rows += _d2_conv(f"roi_heads.box_head.conv{k}", (256, 256, 3, 3), f"box_head.{k - 1}.0", f"box_head.{k - 1}.1")
    rows += [
        ("roi_heads.box_head.fc1.weight", (1024, 256 * 7 * 7), "box_head.5.weight"),
        ("roi_heads.box_head.fc1.bias", (1024,), "box_head.5.bias"),
    ]
    return rows


def detectron2_c4_keys():
    """Detectron2 v0.6 Mask R-CNN R50-C4: backbone stem/res2-4, roi_heads.res5 (Res5ROIHeads)."""
    return _d2_resnet(lambda stage: "roi_heads." if stage == 5 else "backbone.", "backbone.")


def _check_detectron2(report, ckpt, expected_rows):
    with open(report.out, "rb") as f:
        payload = pickle.load(f)
    assert payload["__author__"] == "soco-pretrain"
    assert payload["matching_heuristics"] is True
    weights = payload["model"]
    expected = {name: (shape, source) for name, shape, source in expected_rows}
    assert len(expected) == len(expected_rows)
    assert set(weights) == set(expected)
    for name, (shape, source) in expected.items():
        value = weights[name]
        assert isinstance(value, np.ndarray) and value.dtype == np.float32, name
        assert value.shape == shape, name
        _assert_same(torch.from_numpy(value), ckpt[f"encoder.{source}"], name)


def test_detectron2_fpn_key_list_is_complete_and_values_equal(exports, fpn_run):
    rows = detectron2_fpn_keys()
    assert len(rows) == 265 + 40 + 22  # R-50 (53 convs x 5), FPN (8 x 5), head (4 x 5 + 2)
    report = exports("detectron2", "fpn")
    _check_detectron2(report, fpn_run[1], rows)
    unused = {r.module: r.unused for r in report.checkpoint_unused}
    assert unused["encoder"] == 53 + 8 + 4  # num_batches_tracked of every BN
    assert {r.module for r in report.detector if r.missing} == {
        "proposal_generator.rpn_head",
        "roi_heads.box_predictor",
        "roi_heads.mask_head",
    }


def test_detectron2_c4_key_list_is_complete_and_values_equal(exports, c4_run):
    report = exports("detectron2", "c4")
    _check_detectron2(report, c4_run[1], detectron2_c4_keys())
    names = {r.module for r in report.detector if r.loaded}
    assert names == {"backbone", "roi_heads.res5"}


def test_detectron2_config_has_the_released_fine_tune_settings(exports):
    for arch in ("fpn", "c4"):
        report = exports("detectron2", arch)
        assert report.config_out == report.out.with_suffix(".yaml")
        cfg = yaml.safe_load(report.config_out.read_text())
        model = cfg["MODEL"]
        assert model["WEIGHTS"] == str(report.out.resolve())
        assert model["MASK_ON"] is True
        assert model["PIXEL_MEAN"] == [123.675, 116.28, 103.53]
        assert model["PIXEL_STD"] == [58.395, 57.12, 57.375]
        assert model["RESNETS"]["STRIDE_IN_1X1"] is False
        assert model["RESNETS"]["NORM"] == "SyncBN"
        assert model["RESNETS"]["DEPTH"] == 50
        assert model["BACKBONE"]["FREEZE_AT"] == 0
        assert model["ROI_MASK_HEAD"]["NORM"] == "SyncBN"
        assert cfg["INPUT"]["FORMAT"] == "RGB"
        assert cfg["SOLVER"]["WEIGHT_DECAY"] == pytest.approx(2.5e-5)
        assert cfg["SOLVER"]["BASE_LR"] == pytest.approx(0.02) and cfg["SOLVER"]["IMS_PER_BATCH"] == 16
    fpn = yaml.safe_load(exports("detectron2", "fpn").config_out.read_text())["MODEL"]
    assert fpn["FPN"]["NORM"] == "SyncBN"
    assert fpn["ROI_BOX_HEAD"] == {
        "NAME": "FastRCNNConvFCHead",
        "NUM_CONV": 4,
        "NUM_FC": 1,
        "NORM": "SyncBN",
        "POOLER_RESOLUTION": 7,
    }
    c4 = yaml.safe_load(exports("detectron2", "c4").config_out.read_text())["MODEL"]
    assert c4["ROI_HEADS"]["NAME"] == "Res5ROIHeads"


# ---------------------------------------------------------------- MMDetection v3.3.0 key lists

MM_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _mm_norm(name, channels, source):
    return [(f"{name}.{p}", (channels,) if p != "num_batches_tracked" else (), f"{source}.{p}") for p in MM_NORM]


def _mm_resnet(prefix, tv_prefix, stages, stem=True):
    """mmdet ResNet-50 keys (conv1/bn1, layerN.i.convK/bnK, downsample.0/.1) for the given stages."""
    rows = []
    if stem:
        rows += [(f"{prefix}conv1.weight", (64, 3, 7, 7), f"{tv_prefix}conv1.weight")]
        rows += _mm_norm(f"{prefix}bn1", 64, f"{tv_prefix}bn1")
    for s in stages:  # s = 2..5 -> layer1..layer4
        out, mid = C_OUT[s], C_OUT[s] // 4
        for b in range(R50_BLOCKS[s]):
            mm, tv = f"{prefix}layer{s - 1}.{b}", f"{tv_prefix}layer{s - 1}.{b}"
            cin = (64 if s == 2 else out // 2) if b == 0 else out
            for k, shape, c in ((1, (mid, cin, 1, 1), mid), (2, (mid, mid, 3, 3), mid), (3, (out, mid, 1, 1), out)):
                rows.append((f"{mm}.conv{k}.weight", shape, f"{tv}.conv{k}.weight"))
                rows += _mm_norm(f"{mm}.bn{k}", c, f"{tv}.bn{k}")
            if b == 0:
                rows.append((f"{mm}.downsample.0.weight", (out, cin, 1, 1), f"{tv}.downsample.0.weight"))
                rows += _mm_norm(f"{mm}.downsample.1", out, f"{tv}.downsample.1")
    return rows


def _mm_conv_module(name, shape, source_conv, source_bn):
    return [(f"{name}.conv.weight", shape, f"{source_conv}.weight")] + _mm_norm(f"{name}.bn", shape[0], source_bn)


def mmdet_fpn_keys():
    """MMDetection v3.3.0 Mask R-CNN R50-FPN with BN/SyncBN neck and Shared4Conv1FCBBoxHead."""
    rows = _mm_resnet("backbone.", "backbone.body.", (2, 3, 4, 5))
    for i, s in enumerate((2, 3, 4, 5)):  # FPN start_level 0: lateral_convs.i / fpn_convs.i on C(i+2)
        rows += _mm_conv_module(
            f"neck.lateral_convs.{i}",
            (256, C_OUT[s], 1, 1),
            f"backbone.fpn.inner_blocks.{i}.0",
            f"backbone.fpn.inner_blocks.{i}.1",
        )
        rows += _mm_conv_module(
            f"neck.fpn_convs.{i}",
            (256, 256, 3, 3),
            f"backbone.fpn.layer_blocks.{i}.0",
            f"backbone.fpn.layer_blocks.{i}.1",
        )
    for i in range(4):
        rows += _mm_conv_module(
            f"roi_head.bbox_head.shared_convs.{i}", (256, 256, 3, 3), f"box_head.{i}.0", f"box_head.{i}.1"
        )
    rows += [
        ("roi_head.bbox_head.shared_fcs.0.weight", (1024, 256 * 7 * 7), "box_head.5.weight"),
        ("roi_head.bbox_head.shared_fcs.0.bias", (1024,), "box_head.5.bias"),
    ]
    return rows


def mmdet_c4_keys():
    """MMDetection v3.3.0 Mask R-CNN R50-C4: backbone stages 1-3, roi_head.shared_head.layer4."""
    return _mm_resnet("backbone.", "backbone.", (2, 3, 4)) + _mm_resnet(
        "roi_head.shared_head.", "backbone.", (5,), stem=False
    )


def _check_mmdet(report, ckpt, expected_rows):
    payload = torch.load(report.out, weights_only=True)
    assert set(payload) == {"state_dict", "meta"}
    assert payload["meta"]["author"] == "soco-pretrain"
    state = payload["state_dict"]
    expected = {name: (shape, source) for name, shape, source in expected_rows}
    assert len(expected) == len(expected_rows)
    assert set(state) == set(expected)
    for name, (shape, source) in expected.items():
        assert tuple(state[name].shape) == shape, name
        _assert_same(state[name], ckpt[f"encoder.{source}"], name)


def test_mmdet_fpn_key_list_is_complete_and_values_equal(exports, fpn_run):
    rows = mmdet_fpn_keys()
    assert len(rows) == 392  # every encoder tensor, BN buffers included
    _check_mmdet(exports("mmdet", "fpn"), fpn_run[1], rows)


def test_mmdet_c4_key_list_is_complete_and_values_equal(exports, c4_run):
    rows = mmdet_c4_keys()
    assert any(name.startswith("roi_head.shared_head.layer4.2.") for name, _, _ in rows)
    assert not any(name.startswith("backbone.layer4") for name, _, _ in rows)
    _check_mmdet(exports("mmdet", "c4"), c4_run[1], rows)


def test_mmdet_config_is_valid_python_with_the_fine_tune_settings(exports):
    for arch, base in (("fpn", "mask-rcnn_r50_fpn_1x_coco.py"), ("c4", "mask-rcnn_r50-caffe-c4_1x_coco.py")):
        report = exports("mmdet", arch)
        assert report.config_out == report.out.with_suffix(".py")
        namespace: dict = {}
        exec(compile(report.config_out.read_text(), str(report.config_out), "exec"), namespace)  # noqa: S102 - our own file
        assert namespace["_base_"] == f"mmdet::mask_rcnn/{base}"
        model = namespace["model"]
        assert model["init_cfg"] == {"type": "Pretrained", "checkpoint": str(report.out.resolve())}
        assert model["data_preprocessor"]["mean"] == [123.675, 116.28, 103.53]
        assert model["data_preprocessor"]["std"] == [58.395, 57.12, 57.375]
        assert model["data_preprocessor"]["bgr_to_rgb"] is True
        assert model["backbone"]["norm_cfg"]["type"] == "SyncBN"
        assert model["backbone"]["style"] == "pytorch" and model["backbone"]["init_cfg"] is None
        assert namespace["optim_wrapper"]["optimizer"]["weight_decay"] == pytest.approx(2.5e-5)
        if arch == "fpn":
            assert model["roi_head"]["bbox_head"]["type"] == "Shared4Conv1FCBBoxHead"
            assert model["roi_head"]["bbox_head"]["norm_cfg"]["type"] == "SyncBN"
            assert model["neck"]["norm_cfg"]["type"] == "SyncBN"
            assert model["roi_head"]["mask_head"]["norm_cfg"]["type"] == "SyncBN"
        else:
            assert model["roi_head"]["shared_head"]["norm_cfg"]["type"] == "SyncBN"


# ---------------------------------------------------------------- CLI


def test_help_has_examples(capsys):
    status, out, _ = call(["export", "--help"], capsys)
    assert status == 0
    assert "soco export" in out.split("examples:")[1]


def test_cli_export_end_to_end(fpn_run, tmp_path, capsys):
    run, ckpt = fpn_run
    out = tmp_path / "w" / "soco.pkl"
    status, stdout, err = call(
        [
            "export",
            str(run),
            "--to",
            "detectron2",
            "--soco-weights",
            "target",
            "-o",
            str(out),
            "--config-out",
            str(tmp_path / "ft.yaml"),
        ],
        capsys,
    )
    assert status == 0, err
    assert out.is_file() and (tmp_path / "ft.yaml").is_file()
    for word in ("loaded", "missing", "unused", "backbone.bottom_up", "target_encoder", "encoder"):
        assert word in stdout
    with open(out, "rb") as f:
        weights = pickle.load(f)["model"]
    _assert_same(
        torch.from_numpy(weights["backbone.bottom_up.stem.conv1.weight"]),
        ckpt["target_encoder.backbone.body.conv1.weight"],
        "stem",
    )


def test_cli_export_accepts_a_checkpoint_file(fpn_run, tmp_path, capsys):
    run, _ = fpn_run
    out = tmp_path / "tv.pth"
    status, stdout, err = call(
        ["export", str(run / "checkpoints" / "last.pt"), "--to", "torchvision", "-o", str(out)], capsys
    )
    assert status == 0, err
    assert "roi_heads.box_head" in stdout and out.is_file()


def _bad_inputs(root: Path, run: Path) -> dict[str, tuple[list[str], str]]:
    (root / "empty_run").mkdir()
    (root / "notes.pt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(2)}, root / "other.pt")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["model"]["arch"] = "vit"
    save_checkpoint(root / "vit.pt", state)
    (root / "a_dir").mkdir()
    ok = str(run)
    return {
        "missing": ([str(root / "nothing"), "--to", "torchvision", "-o", str(root / "x.pth")], "no such"),
        "no checkpoint": ([str(root / "empty_run"), "--to", "torchvision", "-o", str(root / "x.pth")], "no checkpoint"),
        "not a checkpoint": (
            [str(root / "notes.pt"), "--to", "mmdet", "-o", str(root / "x.pth")],
            "not a SoCo checkpoint",
        ),
        "not SoCo": (
            [str(root / "other.pt"), "--to", "detectron2", "-o", str(root / "x.pkl")],
            "not a SoCo checkpoint",
        ),
        "unknown arch": (
            [str(root / "vit.pt"), "--to", "torchvision", "-o", str(root / "x.pth")],
            "unknown model.arch 'vit'",
        ),
        "unknown target": ([ok, "--to", "onnx", "-o", str(root / "x")], "invalid choice"),
        "bad weights": ([ok, "--to", "mmdet", "--soco-weights", "ema", "-o", str(root / "x")], "invalid choice"),
        "config for torchvision": (
            [ok, "--to", "torchvision", "-o", str(root / "x.pth"), "--config-out", str(root / "c.yaml")],
            "--config-out",
        ),
        "output is a directory": ([ok, "--to", "torchvision", "-o", str(root / "a_dir")], "is a directory"),
    }


def test_bad_inputs_are_one_line_errors(fpn_run, tmp_path, capsys):
    for case, (args, words) in _bad_inputs(tmp_path, fpn_run[0]).items():
        status, _, err = call(["export", *args], capsys)
        assert status == 2, case
        assert err.startswith("soco: error:") and err.strip().count("\n") == 0, (case, err)
        assert words in err, (case, err)
    assert not (tmp_path / "x.pth").exists()


def test_an_output_that_would_overwrite_training_state_is_refused(tmp_path, capsys):
    """-o the checkpoint being exported (by its path, a symlink or a hard link) or any file in a
    run's checkpoints folder: one line, exit 2, nothing written, the checkpoint intact."""
    import hashlib
    import os

    cfg = PretrainConfig()
    cfg.model.backbone = "resnet18"  # the check does not depend on the backbone; R18 is cheap
    run = tmp_path / "run"
    last = save_checkpoint(
        run / "checkpoints" / "last.pt", {"model": SoCoModel(cfg).state_dict(), "config": to_dict(cfg), "step": 1}
    )
    loose = tmp_path / "ck.pt"  # a checkpoint file outside any run
    loose.write_bytes(last.read_bytes())
    (tmp_path / "sym.pt").symlink_to(loose)
    os.link(loose, tmp_path / "hard.pt")
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (last, loose)}
    before = {p: sorted(q.name for q in p.iterdir()) for p in (run / "checkpoints", tmp_path)}
    exported, inside = "is the checkpoint being exported", "inside the run's checkpoints folder"
    for source, out, config, words in [
        (run, last, None, exported),
        (run / "checkpoints" / "last.pt", run / "checkpoints" / "soco.pth", None, inside),
        (loose, loose, None, exported),
        (loose, tmp_path / "sym.pt", None, exported),
        (loose, tmp_path / "hard.pt", None, exported),
        (loose, tmp_path / "d2.pkl", last, inside),  # the config file is checked too
    ]:
        extra = ["--config-out", str(config)] if config else []
        status, _, err = call(["export", str(source), "--to", "detectron2", "-o", str(out), *extra], capsys)
        assert status == 2 and err.startswith("soco: error:") and err.strip().count("\n") == 0, (out, err)
        assert words in err and str(config or out) in err, (out, err)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (last, loose)} == digests
    assert {p: sorted(q.name for q in p.iterdir()) for p in (run / "checkpoints", tmp_path)} == before


# ---------------------------------------------------------------- the reader and the package data


def test_python_api_raises_export_error_for_what_the_reader_refuses(tmp_path):
    from soco_pretrain.errors import UserError

    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    for source, words in (
        (tmp_path / "notes.pt", "not a SoCo checkpoint"),
        (tmp_path / "other.pt", "not a SoCo checkpoint"),
        (tmp_path, "no checkpoint in"),
        (tmp_path / "nowhere", "no such run folder"),
    ):
        with pytest.raises(UserError) as err:  # the export's own class, from the shared reader's message
            export(source, "torchvision", out=tmp_path / "x.pth")
        assert words in str(err.value) and str(source) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.pth").exists()


def test_config_templates_are_package_data():
    """Every target with a config has one template per arch, and pyproject's package data ships it."""
    import fnmatch
    from importlib import resources

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from soco_pretrain.transfer.export import ARCHS, EXPORTERS, render_template

    folder = resources.files("soco_pretrain.transfer.export").joinpath("templates")
    expected = {
        f"{name}_{arch}{e.config_suffix}.tmpl" for name, e in EXPORTERS.items() if e.config_suffix for arch in ARCHS
    }
    assert {p.name for p in folder.iterdir() if p.name.endswith(".tmpl")} == expected
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["soco_pretrain"]
    for name in expected:
        assert any(fnmatch.fnmatch(f"transfer/export/templates/{name}", p) for p in patterns), name
    with pytest.raises(KeyError):  # every placeholder must be given
        render_template("mmdet_fpn.py.tmpl", weights="online")


def test_written_configs_have_no_placeholder_left(exports):
    for target in ("detectron2", "mmdet"):
        for arch in ("fpn", "c4"):
            text = exports(target, arch).config_out.read_text()
            assert "$" not in text and "network of " in text and str(exports(target, arch).out.resolve()) in text


def test_missing_counts_match_the_detector_heads(exports):
    """Keys SoCo does not pretrain, listed from the detectors' head definitions (module docstring):
    convs/linears with bias 2 keys; a normed conv 1 + 4 norm keys (Detectron2) or 1 + 5 (mmdet)."""
    from soco_pretrain.transfer.export.to_detectron2 import not_pretrained as d2
    from soco_pretrain.transfer.export.to_mmdet import not_pretrained as mm

    d2_fpn = d2("fpn")
    assert d2_fpn["proposal_generator.rpn_head"] == [
        f"proposal_generator.rpn_head.{n}.{p}"
        for n in ("conv", "objectness_logits", "anchor_deltas")
        for p in ("weight", "bias")
    ]
    assert set(d2_fpn["roi_heads.box_predictor"]) == {
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.bbox_pred.bias",
    }
    assert "roi_heads.mask_head.mask_fcn4.norm.running_var" in d2_fpn["roi_heads.mask_head"]
    assert len(d2_fpn["roi_heads.mask_head"]) == 4 * (1 + len(D2_NORM)) + 4
    assert sorted(d2("c4")["roi_heads.mask_head"]) == sorted(
        f"roi_heads.mask_head.{n}.{p}" for n in ("deconv", "predictor") for p in ("weight", "bias")
    )
    mm_fpn = mm("fpn")
    assert "roi_head.mask_head.convs.3.bn.num_batches_tracked" in mm_fpn["roi_head.mask_head"]
    assert len(mm_fpn["roi_head.mask_head"]) == 4 * (1 + len(MM_NORM)) + 4
    assert len(mm("c4")["roi_head.mask_head"]) == 4 and len(mm_fpn["rpn_head"]) == 6
    for target, listed in (("detectron2", d2), ("mmdet", mm)):  # the report counts exactly these
        for arch in ("fpn", "c4"):
            report = exports(target, arch)
            assert {r.module: r.missing for r in report.detector if r.missing} == {
                module: len(keys) for module, keys in listed(arch).items()
            }
