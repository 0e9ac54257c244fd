"""Every backbone of model/backbones.py: builds, trains, exports and loads into the detectors.

Pairs: every backbone with ``model.arch=fpn``, the bottleneck ones with ``c4`` too (config.py
refuses C4 on a basic-block ResNet). Structure, key and shape checks run for every pair on the
'meta' device (no memory, no init). Two real optimiser steps (64 px views, batch 2, K = 2, fp32)
run in the default set for one backbone per block kind beside test_train.py's ResNet-50 --
ResNet-18 (basic blocks, FPN) and ResNeXt-50 32x4d (grouped bottlenecks, FPN and C4) -- and for
every pair with ``-m slow`` (the big ones take several seconds a step on a shared core).

Detectron2 / MMDetection key lists for a basic-block ResNet and a ResNeXt are written out below
from their model definitions, not from the exporters:

- Detectron2 v0.6 detectron2/modeling/backbone/resnet.py: BasicBlock (R18/34) = ``conv1``,
  ``conv2`` (3x3) and a ``shortcut`` 1x1 where in != out channels (not res2.0 of R18, whose stem
  already gives 64); BottleneckBlock = ``conv1..3``, ``conv2`` with ``groups`` = NUM_GROUPS over
  NUM_GROUPS x WIDTH_PER_GROUP channels at res2, doubled per stage; every conv has ``.norm``
  (weight, bias, running_mean, running_var). build_resnet_backbone blocks per stage: 18 = 2, 2,
  2, 2; 101 = 3, 4, 23, 3. FPN (backbone/fpn.py): ``fpn_lateral{2..5}`` 1x1 from C2..C5,
  ``fpn_output{2..5}`` 3x3, 256 channels, with norm; box head conv1..4 + fc1.
- MMDetection v3.3.0 mmdet/models/backbones/resnet.py (BasicBlock ``conv1/bn1, conv2/bn2``),
  resnext.py (Bottleneck ``conv1..3/bn1..3``, width = planes x base_width / 64 x groups),
  ``downsample.0/.1``; norms with num_batches_tracked; neck ``lateral_convs.i`` /
  ``fpn_convs.i`` ConvModule (.conv, .bn); Shared4Conv1FCBBoxHead ``shared_convs.0..3``,
  ``shared_fcs.0``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
import yaml
from data_fixtures import small_pretrain_config

from soco_pretrain.config import ModelConfig
from soco_pretrain.data.synthetic import synthetic_batch
from soco_pretrain.engine.skips import SkipLog
from soco_pretrain.errors import UserError
from soco_pretrain.model.backbones import BACKBONES, backbone_of_state
from soco_pretrain.model.encoder import SoCoEncoder
from soco_pretrain.train.fixed_batch import job_for_batch
from soco_pretrain.train.loop import Position, PretrainStep
from soco_pretrain.transfer.detector import build_detector, detector_backbone
from soco_pretrain.transfer.export import EXPORTERS, EncoderWeights, convert
from soco_pretrain.weights import WeightsError

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [(n, a) for n in BACKBONES for a in ("fpn", "c4") if a == "fpn" or BACKBONES[n].bottleneck]
QUICK_TRAIN = {("resnet18", "fpn"), ("resnext50_32x4d", "c4")}  # basic blocks; grouped bottlenecks
# torchvision Mask R-CNN v2 modules SoCo does not pretrain (the detector initialises them)
DETECTOR_ONLY = ("rpn.", "roi_heads.box_predictor.", "roi_heads.mask_head.", "roi_heads.mask_predictor.")
C5 = {"resnet18": 512, "resnet34": 512}  # basic blocks; every bottleneck ResNet/ResNeXt: 2048


def _meta_encoder(name: str, arch: str) -> SoCoEncoder:
    with torch.device("meta"):
        return SoCoEncoder(ModelConfig(arch=arch, backbone=name))


def _source(name: str, arch: str, state=None) -> EncoderWeights:
    """What export() reads from a run (transfer/export/encoder.py), made in memory."""
    return EncoderWeights(state or {}, arch, "online", Path("run/checkpoints/last.pt"), 2, {}, name)


def _load_report(model: torch.nn.Module, state: dict):
    result = model.load_state_dict(state, strict=False)
    return set(result.missing_keys), set(result.unexpected_keys)


# ---------------------------------------------------------------- every pair: build, torchvision export, load


@pytest.mark.filterwarnings("ignore:for .*num_batches_tracked:UserWarning")  # BN fills it in on 'meta'
@pytest.mark.parametrize("name, arch", PAIRS)
def test_every_pair_builds_and_its_torchvision_export_loads(name, arch):
    encoder = _meta_encoder(name, arch)
    assert encoder.out_dim == (1024 if arch == "fpn" else C5.get(name, 2048))
    own = encoder.state_dict()
    state, _, _, dropped = convert(own, arch, "torchvision")
    assert dropped == []  # every encoder tensor is exported
    with torch.device("meta"):
        model = build_detector(3, backbone=name) if arch == "fpn" else getattr(torchvision.models, name)()
    missing, unexpected = _load_report(model, state)  # shapes are checked even on 'meta'
    assert unexpected == set()
    if arch == "fpn":  # missing: exactly the detector-only heads (BN's num_batches_tracked fills itself in)
        heads = {k for k in model.state_dict() if k.startswith(DETECTOR_ONLY)}
        assert missing == {k for k in heads if not k.endswith("num_batches_tracked")}
        assert {k.split(".")[0] for k in state} == {"backbone", "roi_heads"}
        assert state["backbone.fpn.inner_blocks.3.0.weight"].shape == (256, C5.get(name, 2048), 1, 1)
    else:
        assert missing == {"fc.weight", "fc.bias"}
    # the export's report counts the same detector's keys
    from soco_pretrain.transfer.export.to_torchvision import missing_keys

    expected = {"rpn", "roi_heads.box_predictor", "roi_heads.mask_head", "roi_heads.mask_predictor"}
    assert set(missing_keys(arch, set(state), name)) == (expected if arch == "fpn" else {"fc"})


def test_backbone_of_state_names_every_backbone_and_refuses_unknown_ones():
    for name in BACKBONES:
        with torch.device("meta"):
            body = getattr(torchvision.models, name)().state_dict()
        assert backbone_of_state(body) == name
        assert backbone_of_state({f"backbone.body.{k}": v for k, v in body.items()}, "backbone.body.") == name
    assert backbone_of_state({"roi_heads.box_head.5.weight": torch.zeros(1)}) is None
    with torch.device("meta"):
        wide = torchvision.models.wide_resnet50_2().state_dict()  # bottlenecks of width 128: none of ours
    with pytest.raises(ValueError, match="none of the known backbones"):
        backbone_of_state(wide)
    # a config-less soco checkpoint holding such a ResNet: one line naming the file, no silent ResNet-50
    from soco_pretrain.weights import SocoWeights, WeightsError

    online = {f"backbone.body.{k}": v for k, v in wide.items()}
    with pytest.raises(WeightsError, match=r"old\.pt: a ResNet of 50 layers .* none of the known backbones"):
        _ = SocoWeights(path=Path("old.pt"), arch="fpn", online=online, target={}, step=None, config=None).backbone


# ---------------------------------------------------------------- training: 2 optimiser steps


def _trained(name: str, arch: str):
    """(job, losses, tensors before) after two optimiser steps of the real step (train/loop.py)."""
    cfg = small_pretrain_config(f"model.backbone={name}", f"model.arch={arch}")
    job = job_for_batch(cfg, synthetic_batch(cfg.data.views, 2, min_box=8), "cpu")
    model = job.core
    body = model.encoder.backbone.body if arch == "fpn" else model.encoder.backbone
    watched = {"conv1": body.conv1.weight, "last": body.layer4[-1].conv1.weight}
    before = {k: v.detach().clone() for k, v in watched.items()}
    stem = "backbone.conv1.weight" if arch == "c4" else "backbone.body.conv1.weight"
    target_before = model.target_encoder.state_dict()[stem].clone()
    step = PretrainStep(job, Position(), SkipLog())
    model.train()
    losses = [float(sum(t.item() for t in step(i).loss)) for i in range(2)]
    for key, tensor in watched.items():  # the stem and the last block both learnt
        assert not torch.equal(tensor, before[key]), key
    assert not torch.equal(model.target_encoder.state_dict()[stem], target_before)  # the EMA target followed
    return job, losses


@pytest.mark.parametrize(
    "name, arch",
    [pytest.param(n, a, marks=() if (n, a) in QUICK_TRAIN else pytest.mark.slow) for n, a in PAIRS],
)
def test_two_optimiser_steps_and_the_export_loads_with_its_values(name, arch, tmp_path):
    job, losses = _trained(name, arch)
    assert all(np.isfinite(losses)) and len(losses) == 2
    # minimum of the paper's loss: -2 per pair and direction, 2 pairs (FPN) or 1 (C4)
    assert all(-8.0 - 1e-4 <= loss <= 8.0 for loss in losses)
    encoder = {k: v.detach() for k, v in job.core.encoder.state_dict().items()}
    state, _, _, _ = convert(encoder, arch, "torchvision")
    out = tmp_path / "tv.pth"
    written = EXPORTERS["torchvision"].write(state, _source(name, arch), out, None, {})
    assert written.layout.startswith("state dict") and name.split("_")[0] in written.layout
    saved = torch.load(out, weights_only=True)
    model = build_detector(3, backbone=name) if arch == "fpn" else getattr(torchvision.models, name)()
    missing, unexpected = _load_report(model, saved)
    assert unexpected == set() and all(k.startswith(DETECTOR_ONLY) or k.startswith("fc.") for k in missing)
    loaded = model.state_dict()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


# ---------------------------------------------------------------- Detectron2 / MMDetection names

D2_NORM = ("weight", "bias", "running_mean", "running_var")
MM_NORM = (*D2_NORM, "num_batches_tracked")


def _exported(name: str, arch: str, target: str) -> dict:
    state, _, _, _ = convert(_meta_encoder(name, arch).state_dict(), arch, target)
    return {k: tuple(v.shape) for k, v in state.items()}


def test_detectron2_names_of_a_basic_block_resnet():
    keys = _exported("resnet18", "fpn", "detectron2")
    # stem 5 + 8 blocks x (conv1, conv2) x 5 + shortcuts of res3.0, res4.0, res5.0 x 5 = 100;
    # FPN 8 x 5 = 40; box head 4 x 5 + fc1 2 = 22
    assert len(keys) == 100 + 40 + 22
    bu = "backbone.bottom_up"
    assert keys[f"{bu}.stem.conv1.weight"] == (64, 3, 7, 7)
    assert keys[f"{bu}.res2.0.conv1.weight"] == (64, 64, 3, 3)
    assert keys[f"{bu}.res2.1.conv2.norm.running_var"] == (64,)
    assert keys[f"{bu}.res3.0.shortcut.weight"] == (128, 64, 1, 1)
    assert keys[f"{bu}.res3.0.shortcut.norm.bias"] == (128,)
    assert keys[f"{bu}.res5.1.conv2.weight"] == (512, 512, 3, 3)
    assert f"{bu}.res2.0.shortcut.weight" not in keys  # 64 -> 64: no projection
    assert not any(".conv3." in k or ".res2.2." in k for k in keys if k.startswith(bu))  # 2 convs, 2 blocks
    assert not any(k.endswith("num_batches_tracked") for k in keys)
    assert keys["backbone.fpn_lateral2.weight"] == (256, 64, 1, 1)
    assert keys["backbone.fpn_lateral5.weight"] == (256, 512, 1, 1)
    assert keys["backbone.fpn_output5.norm.weight"] == (256,)
    assert keys["roi_heads.box_head.fc1.weight"] == (1024, 256 * 7 * 7)


def test_detectron2_names_of_a_resnext():
    keys = _exported("resnext101_32x8d", "fpn", "detectron2")
    # stem 5 + 33 bottlenecks x 3 convs x 5 + 4 shortcuts x 5 = 520; FPN 40; box head 22
    assert len(keys) == 520 + 40 + 22
    bu = "backbone.bottom_up"
    assert keys[f"{bu}.res2.0.conv1.weight"] == (256, 64, 1, 1)  # 32 groups x 8 = 256 at res2
    assert keys[f"{bu}.res2.0.conv2.weight"] == (256, 8, 3, 3)  # groups = 32: 8 inputs per group
    assert keys[f"{bu}.res2.0.shortcut.weight"] == (256, 64, 1, 1)
    assert keys[f"{bu}.res4.22.conv2.norm.running_mean"] == (1024,)
    assert keys[f"{bu}.res5.2.conv3.weight"] == (2048, 2048, 1, 1)
    assert f"{bu}.res4.23.conv1.weight" not in keys
    assert keys["backbone.fpn_lateral5.weight"] == (256, 2048, 1, 1)
    c4 = _exported("resnext101_32x8d", "c4", "detectron2")
    # backbone: stem 5 + 30 blocks x 15 + 3 shortcuts x 5 = 470; Res5ROIHeads: 3 x 15 + 5 = 50
    assert len(c4) == 470 + 50
    assert c4["roi_heads.res5.0.conv2.weight"] == (2048, 64, 3, 3)
    assert c4["roi_heads.res5.0.shortcut.weight"] == (2048, 1024, 1, 1)
    assert c4["backbone.res4.22.conv3.norm.weight"] == (1024,)
    assert not any(k.startswith("backbone.res5") for k in c4)


def test_mmdet_names_of_a_basic_block_resnet_and_a_resnext():
    keys = _exported("resnet18", "fpn", "mmdet")
    # torchvision resnet18 without fc: 120 (stem 6 + 8 x 12 + 3 downsamples x 6); neck 8 x 6; head 4 x 6 + 2
    assert len(keys) == 120 + 48 + 26
    assert keys["backbone.layer1.0.conv1.weight"] == (64, 64, 3, 3)
    assert keys["backbone.layer1.1.bn2.num_batches_tracked"] == ()
    assert keys["backbone.layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert keys["backbone.layer4.1.bn2.running_var"] == (512,)
    assert "backbone.layer1.0.downsample.0.weight" not in keys
    assert not any(".conv3." in k for k in keys if k.startswith("backbone."))
    assert keys["neck.lateral_convs.0.conv.weight"] == (256, 64, 1, 1)
    assert keys["neck.lateral_convs.3.conv.weight"] == (256, 512, 1, 1)
    assert keys["neck.fpn_convs.3.bn.num_batches_tracked"] == ()
    x101 = _exported("resnext101_32x8d", "fpn", "mmdet")
    # stem 6 + 33 x 18 + 4 downsamples x 6 = 624; neck 48; head 26
    assert len(x101) == 624 + 48 + 26
    assert x101["backbone.layer1.0.conv2.weight"] == (256, 8, 3, 3)
    assert x101["backbone.layer3.22.bn3.weight"] == (1024,)
    assert x101["backbone.layer4.2.conv2.weight"] == (2048, 64, 3, 3)
    assert x101["neck.lateral_convs.3.conv.weight"] == (256, 2048, 1, 1)
    assert x101["roi_head.bbox_head.shared_fcs.0.weight"] == (1024, 256 * 7 * 7)
    c4 = _exported("resnet101", "c4", "mmdet")
    assert c4["roi_head.shared_head.layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert c4["backbone.layer3.22.conv3.weight"] == (1024, 256, 1, 1)


def test_written_configs_describe_the_backbone(tmp_path):
    d2, mm = EXPORTERS["detectron2"], EXPORTERS["mmdet"]
    r18 = yaml.safe_load(d2.config(_source("resnet18", "fpn"), tmp_path / "w.pkl"))["MODEL"]["RESNETS"]
    assert (r18["DEPTH"], r18["NUM_GROUPS"], r18["RES2_OUT_CHANNELS"], r18["STRIDE_IN_1X1"]) == (18, 1, 64, False)
    for arch in ("fpn", "c4"):
        text = d2.config(_source("resnext101_32x8d", arch), tmp_path / "w.pkl")
        x101 = yaml.safe_load(text)["MODEL"]["RESNETS"]
        assert (x101["DEPTH"], x101["NUM_GROUPS"], x101["WIDTH_PER_GROUP"]) == (101, 32, 8)
        assert x101["RES2_OUT_CHANNELS"] == 256 and x101["STRIDE_IN_1X1"] is False
        assert f"X101-32x8d-{arch.upper()}" in text
    for name, backbone, neck in (
        ("resnet18", {"type": "ResNet", "depth": 18}, [64, 128, 256, 512]),
        ("resnext101_64x4d", {"type": "ResNeXt", "depth": 101, "groups": 64, "base_width": 4}, [256, 512, 1024, 2048]),
    ):
        namespace: dict = {}
        exec(mm.config(_source(name, "fpn"), tmp_path / "w.pth"), namespace)  # noqa: S102 - our own template
        model = namespace["model"]
        assert {k: model["backbone"][k] for k in backbone} == backbone
        assert model["backbone"]["style"] == "pytorch" and model["neck"]["in_channels"] == neck
    namespace = {}
    exec(mm.config(_source("resnet152", "c4"), tmp_path / "w.pth"), namespace)  # noqa: S102
    model = namespace["model"]
    assert model["backbone"]["depth"] == model["roi_head"]["shared_head"]["depth"] == 152


def test_a_pair_without_a_model_is_a_one_line_export_error(tmp_path):
    state, _, _, _ = convert(_meta_encoder("resnext50_32x4d", "c4").state_dict(), "c4", "mmdet")
    out = tmp_path / "x.pth"
    refused = r"no mmdet export of X50-32x4d-C4 \(resnext50_32x4d, model.arch=c4\)"
    with pytest.raises(UserError, match=refused) as info:
        EXPORTERS["mmdet"].write(state, _source("resnext50_32x4d", "c4"), out, tmp_path / "x.py", {})
    assert "\n" not in str(info.value) and not out.exists() and not (tmp_path / "x.py").exists()
    # Detectron2's Res5ROIHeads takes groups: the same pair exports there
    zeros = {k: torch.zeros(v.shape) for k, v in _meta_encoder("resnext50_32x4d", "c4").state_dict().items()}
    d2_state, _, _, _ = convert(zeros, "c4", "detectron2")
    source = _source("resnext50_32x4d", "c4")
    written = EXPORTERS["detectron2"].write(d2_state, source, tmp_path / "x.pkl", tmp_path / "x.yaml", {})
    assert "X50-32x4d-C4" in written.layout
    with open(tmp_path / "x.pkl", "rb") as f:
        assert pickle.load(f)["model"]["roi_heads.res5.2.conv2.weight"].shape == (1024, 32, 3, 3)


# ---------------------------------------------------------------- the fine-tune detector


def test_the_r50_detector_is_torchvisions_mask_rcnn_v2():
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2, maskrcnn_resnet50_fpn_v2

    for masks, reference in ((False, fasterrcnn_resnet50_fpn_v2), (True, maskrcnn_resnet50_fpn_v2)):
        with torch.device("meta"):
            ours = build_detector(5, masks).state_dict()
            theirs = reference(weights=None, weights_backbone=None, num_classes=5).state_dict()
        assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    torch.manual_seed(0)
    ours = build_detector(5, True, train_sizes=(64,), max_size=96).state_dict()
    torch.manual_seed(0)
    theirs = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=5).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # the same modules, built in the same order


def test_the_detector_backbone_comes_from_the_weights(tmp_path):
    assert detector_backbone(None) == "resnet50" and detector_backbone("none", "resnet34") == "resnet34"
    r18 = torchvision.models.resnet18().state_dict()
    torch.save(r18, tmp_path / "r18.pth")  # a plain torchvision ResNet state dict
    assert detector_backbone(tmp_path / "r18.pth") == "resnet18"
    assert detector_backbone(tmp_path / "r18.pth", "resnet18") == "resnet18"
    with pytest.raises(WeightsError, match=r"weights of a R18 \(resnet18\), not of the requested R50") as info:
        detector_backbone(tmp_path / "r18.pth", "resnet50")
    assert "\n" not in str(info.value)
    # the linear probe follows the weights' backbone too: 512-d features of a ResNet-18
    from soco_pretrain.transfer.linear import feature_dim, load_backbone

    model, described = load_backbone(tmp_path / "r18.pth")
    assert described["backbone"] == "resnet18" and feature_dim(model) == 512
    assert torch.equal(model.layer4[1].conv2.weight, r18["layer4.1.conv2.weight"])
    # and so does soco knn's encoder (a plain ResNet: the C4 head on its res5)
    from soco_pretrain.evaluate.knn import build_encoder

    encoder, described = build_encoder(tmp_path / "r18.pth")
    assert described["arch"] == "c4" and encoder.out_dim == 512
    assert torch.equal(encoder.backbone.layer4[1].conv2.weight, r18["layer4.1.conv2.weight"])
    # a SoCo checkpoint: its config's model.backbone
    soco = {
        "model": {"encoder.backbone.body.conv1.weight": torch.zeros(1)},
        "config": {"model": {"arch": "fpn", "backbone": "resnet101"}},
        "step": 3,
    }
    torch.save(soco, tmp_path / "soco.pt")
    assert detector_backbone(tmp_path / "soco.pt") == "resnet101"
    with pytest.raises(WeightsError, match="R101"):
        detector_backbone(tmp_path / "soco.pt", "resnet152")


def test_a_fine_tune_resumes_only_with_its_own_backbone(tmp_path):
    from soco_pretrain.transfer.finetune import check_same_detector

    path = tmp_path / "last.pt"
    checkpoint = {"model": {}, "optimizer": {}, "iteration": 3, "backbone": "resnet18"}
    job = SimpleNamespace(device=torch.device("cpu"), backbone="resnet50")
    with pytest.raises(UserError, match="a fine-tune of a resnet18 detector, this run builds resnet50"):
        check_same_detector(checkpoint, path, job)


def test_the_config_lists_of_backbones_are_the_table():
    """config.py imports no torch, so it writes the names out; they must be BACKBONES' (the one
    table), in its order, and every option naming a backbone must offer exactly them."""
    from typing import get_args

    from soco_pretrain.config import (
        BASIC_BLOCK_BACKBONES,
        BackboneName,
        FinetuneOptions,
        KnnOptions,
        field_types,
        literal_choices,
    )

    assert get_args(BackboneName) == tuple(BACKBONES)
    assert set(BASIC_BLOCK_BACKBONES) == {name for name, b in BACKBONES.items() if not b.bottleneck}
    for cls in (ModelConfig, FinetuneOptions, KnnOptions):
        assert literal_choices(field_types(cls)["backbone"]) == tuple(BACKBONES), cls.__name__
