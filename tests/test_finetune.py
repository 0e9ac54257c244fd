"""soco finetune: COCO data, recipe, weight loading, evaluation and the fine-tune run (stage 5).

The labelled set is made here: coloured rectangles and ellipses painted on skimage's photos
(about 144 px) with their polygons as masks, one crowd region (compressed RLE), categories 3
and 7. Runs use tiny inputs (short side 128, long side <= 160), batch 1-2, 32 RoIs per image
and few test proposals, so an iteration of the full R50-FPN Mask R-CNN takes a few seconds on
one core.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_photo

from soco_pretrain.cli import main
from soco_pretrain.config import PretrainConfig, to_dict
from soco_pretrain.engine.checkpoint import load_checkpoint, save_checkpoint
from soco_pretrain.errors import PathError, UserError
from soco_pretrain.model import SoCoModel
from soco_pretrain.train.loop import save_config
from soco_pretrain.transfer.coco import (
    CocoDetection,
    TrainStream,
    load_coco,
    make_target,
    segmentation_to_mask,
    select_fraction,
    trainable_images,
)
from soco_pretrain.transfer.coco_eval import coco_evaluate, to_coco_results
from soco_pretrain.transfer.detector import WeightsError, build_detector, load_weights
from soco_pretrain.transfer.finetune import FinetuneOptions, finetune, lr_at, make_plan
from soco_pretrain.transfer.shapes import make_shapes_set

# Tiny detector settings shared by the runs (see module docstring).
TINY = {
    "batch_size": 2,
    "train_sizes": (128,),
    "max_size": 160,
    "roi_batch": 32,
    "test_proposals": 30,
    "detections": 10,
    "workers": 0,
    "progress": False,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Train: 4 photos (camera is grey) with shapes + a crowd region; val: 2 other photos."""
    root = tmp_path_factory.mktemp("shapes")
    train = make_shapes_set(
        {n: small_photo(n, 144) for n in ("astronaut", "coffee", "camera", "chelsea")}, root / "train", seed=0
    )
    val = make_shapes_set({n: small_photo(n, 144) for n in ("rocket", "coins")}, root / "val", crowd=False, seed=1)
    return {
        "train_json": train,
        "train_images": root / "train" / "images",
        "val_json": val,
        "val_images": root / "val" / "images",
    }


def _run_args(data) -> tuple:
    return data["train_json"], data["train_images"], data["val_json"], data["val_images"]


@pytest.fixture(scope="module")
def soco_run(tmp_path_factory):
    """A SoCo FPN run folder: default init plus independent noise on online and target (no training)."""
    cfg = PretrainConfig()
    torch.manual_seed(0)
    model = SoCoModel(cfg)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, value in state.items():
            if value.is_floating_point():
                value.add_(0.01 * torch.randn(value.shape, generator=gen))
                if key.endswith("running_var"):
                    value.abs_()
    run = tmp_path_factory.mktemp("soco") / "run"
    save_checkpoint(run / "checkpoints" / "last.pt", {"model": state, "config": to_dict(cfg), "step": 0})
    save_config(cfg, run)
    return run, state


# ---------------------------------------------------------------- data


def test_coco_parsing_boxes_masks_and_category_mapping(data):
    coco = load_coco(data["train_json"], data["train_images"])
    assert coco.cat_ids == [3, 7] and coco.cat_to_label == {3: 1, 7: 2} and coco.label_to_cat == {1: 3, 2: 7}
    assert coco.num_classes == 3 and coco.has_masks
    raw = json.loads(Path(data["train_json"]).read_text())
    for image in coco.images:
        anns = [a for a in raw["annotations"] if a["image_id"] == image["id"] and not a["iscrowd"]]
        target = make_target(coco, image, masks=True)
        assert len(target["labels"]) == len(anns)  # the crowd region is not a training target
        for k, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            assert target["boxes"][k].tolist() == pytest.approx([x, y, x + w, y + h], abs=1e-4)
            assert int(target["labels"][k]) == coco.cat_to_label[a["category_id"]]
            ys, xs = np.nonzero(target["masks"][k].numpy())  # the painted polygon's mask fits its box
            assert abs(xs.min() - x) <= 1.5 and abs(xs.max() + 1 - (x + w)) <= 1.5
            assert abs(ys.min() - y) <= 1.5 and abs(ys.max() + 1 - (y + h)) <= 1.5
        assert target["masks"].shape[1:] == (image["height"], image["width"])

    # grey photo -> RGB; a flip mirrors image, boxes and masks
    ds = CocoDetection(coco, coco.images, masks=True)
    camera = next(i for i, im in enumerate(coco.images) if im["file_name"] == "camera.png")
    item, flipped = ds[camera], ds[(camera, True)]
    assert item["image"].shape[0] == 3 and item["error"] is None
    assert torch.equal(flipped["image"], item["image"].flip(-1))
    assert torch.equal(flipped["target"]["masks"], item["target"]["masks"].flip(-1))
    w = coco.images[camera]["width"]
    assert torch.allclose(flipped["target"]["boxes"][:, [0, 2]], w - item["target"]["boxes"][:, [2, 0]])


def test_crowd_degenerate_and_empty_images_leave_training(data, tmp_path):
    raw = json.loads(Path(data["train_json"]).read_text())
    crowd = next(a for a in raw["annotations"] if a["iscrowd"])
    raw["images"] += [
        {"id": 50, "file_name": "coffee.png", "width": 144, "height": 96},
        {"id": 51, "file_name": "chelsea.png", "width": 144, "height": 96},
    ]
    raw["annotations"] += [
        {**crowd, "id": 900, "image_id": 50},  # only a crowd region
        {
            "id": 901,
            "image_id": 51,
            "category_id": 7,
            "bbox": [10, 10, 0, 20],
            "iscrowd": 0,  # zero width
            "segmentation": [[10, 10, 10, 30, 10, 20]],
        },
        {
            "id": 902,
            "image_id": 51,
            "category_id": 7,
            "bbox": [200, 10, 30, 20],
            "iscrowd": 0,  # outside
            "segmentation": [[200, 10, 230, 10, 230, 30]],
        },
    ]
    path = tmp_path / "more.json"
    path.write_text(json.dumps(raw))
    coco = load_coco(path, data["train_images"])
    assert {im["id"] for im in trainable_images(coco, masks=True)} == {1, 2, 3, 4}
    empty = make_target(coco, next(im for im in coco.images if im["id"] == 51), masks=True)
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 96, 144)
    # uncompressed RLE and short polygons
    mask = np.zeros((6, 5), np.uint8)
    mask[1:3, 2:4] = 1
    counts, flat, value, run = [], mask.flatten(order="F"), 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    assert np.array_equal(segmentation_to_mask({"size": [6, 5], "counts": counts}, 6, 5), mask)
    assert segmentation_to_mask([[1, 1, 3, 3]], 6, 5) is None  # fewer than 3 points
    assert segmentation_to_mask({"size": [7, 5], "counts": counts}, 6, 5) is None  # wrong size


def test_fraction_subset_is_seeded_and_reproducible():
    images = [{"id": i} for i in range(1, 201)]
    a, b = select_fraction(images, 0.05, seed=3), select_fraction(images, 0.05, seed=3)
    assert a == b and len(a) == 10 and [im["id"] for im in a] == sorted(im["id"] for im in a)
    assert {im["id"] for im in select_fraction(images, 0.05, seed=4)} != {im["id"] for im in a}
    assert len(select_fraction(images, 0.10, seed=0)) == 20
    assert select_fraction(images, 1.0, seed=0) == images
    assert len(select_fraction(images[:3], 0.01, seed=0)) == 1  # at least one image
    with pytest.raises(ValueError):
        select_fraction(images, 0.0, seed=0)


def test_train_stream_is_reproducible_and_split_across_ranks():
    one = TrainStream(5, per_rank_batch=4, rank=0, world=1, seed=0)
    keys = [one.keys_for(i) for i in range(5)]
    flat = [k for it in keys for k in it]
    assert sorted(i for i, _ in flat[:5]) == list(range(5))  # an epoch is a permutation
    assert {f for _, f in flat} == {True, False}  # flips drawn per position
    two = [TrainStream(5, 2, rank=r, world=2, seed=0) for r in range(2)]
    assert [two[0].keys_for(i) + two[1].keys_for(i) for i in range(5)] == keys  # same global stream
    resumed = iter(TrainStream(5, 4, seed=0, start_iter=3))
    assert [next(resumed) for _ in range(8)] == keys[3] + keys[4]
    assert TrainStream(5, 4, seed=1).keys_for(0) != keys[0]


# ---------------------------------------------------------------- recipe


def test_lr_schedule_follows_the_paper_recipe():
    plan = make_plan(FinetuneOptions())  # 1x at batch 16
    assert (plan.max_iters, plan.steps, plan.warmup_iters, plan.lr) == (90_000, (60_000, 80_000), 1000, 0.02)
    assert lr_at(0, plan) == pytest.approx(0.02 * 0.001)
    assert lr_at(500, plan) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lr_at(1000, plan) == pytest.approx(0.02) and lr_at(59_999, plan) == pytest.approx(0.02)
    assert lr_at(60_000, plan) == pytest.approx(0.002) and lr_at(79_999, plan) == pytest.approx(0.002)
    assert lr_at(80_000, plan) == pytest.approx(0.0002) and lr_at(89_999, plan) == pytest.approx(0.0002)
    plan = make_plan(FinetuneOptions(schedule="2x", batch_size=8))  # iterations scale by 16 / batch
    assert (plan.max_iters, plan.steps, plan.warmup_iters, plan.lr) == (360_000, (240_000, 320_000), 2000, 0.01)
    plan = make_plan(FinetuneOptions(max_iters=90, batch_size=2))  # short run: warm-up ends at the first drop
    assert (plan.max_iters, plan.steps, plan.warmup_iters, plan.lr) == (90, (60, 80), 60, 0.0025)
    assert lr_at(60, plan) == pytest.approx(0.00025)


# ---------------------------------------------------------------- weights


def _encoder(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def test_soco_checkpoint_loads_backbone_and_box_head(soco_run, tmp_path):
    run, state = soco_run
    model = build_detector(3, masks=True, train_sizes=(128,), max_size=160)
    report = load_weights(model, run)  # online by default (as soco export)
    own = model.state_dict()
    online = _encoder(state, "encoder.")
    for key, value in online.items():
        target_key = key if key.startswith("backbone.") else "roi_heads." + key
        assert torch.equal(own[target_key], value), key
    assert report.modules["backbone.body"][0] == report.modules["backbone.body"][1] == 265  # R50, counters aside
    # tensors counted without the BN num_batches_tracked counters (loaded, never required)
    assert report.modules["backbone.fpn"][0] == report.modules["backbone.fpn"][1] == 40
    assert report.modules["roi_heads.box_head"][0] == report.modules["roi_heads.box_head"][1] == 22
    for name in ("rpn", "roi_heads.box_predictor", "roi_heads.mask_head", "roi_heads.mask_predictor"):
        assert report.modules[name][0] == 0
    counted = [k for k in online if not k.endswith("num_batches_tracked")]
    assert report.loaded == len(counted) and not report.unused and "online" in report.format()

    load_weights(model, run / "checkpoints" / "last.pt", soco_weights="target")
    target = _encoder(state, "target_encoder.")
    assert torch.equal(model.state_dict()["backbone.body.conv1.weight"], target["backbone.body.conv1.weight"])
    assert not torch.equal(target["backbone.body.conv1.weight"], online["backbone.body.conv1.weight"])

    # a torchvision-format file (what soco export --to torchvision writes) loads the same tensors
    exported = {k: v for k, v in own.items() if k.startswith(("backbone.", "roi_heads.box_head."))}
    torch.save(exported, tmp_path / "tv.pth")
    fresh = build_detector(3, masks=False)
    report = load_weights(fresh, tmp_path / "tv.pth")
    assert torch.equal(fresh.state_dict()["roi_heads.box_head.5.weight"], own["roi_heads.box_head.5.weight"])
    assert report.modules["rpn"] == (0, 8) and "roi_heads.mask_head" not in report.modules

    none = load_weights(fresh, None)
    assert none.loaded == 0 and "random init" in none.format()

    torch.save({"head.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="no tensor matches"):
        load_weights(fresh, tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        load_weights(fresh, tmp_path / "junk.pth")


# ---------------------------------------------------------------- evaluation


def test_ground_truth_as_predictions_scores_100(data):
    coco = load_coco(data["train_json"], data["train_images"])
    results = []
    for image in coco.images:
        target = make_target(coco, image, masks=True)
        n = len(target["labels"])
        output = {
            "boxes": target["boxes"],
            "labels": target["labels"],
            "scores": torch.ones(n),
            "masks": target["masks"][:, None].float(),
        }
        results += to_coco_results(output, image["id"], coco.label_to_cat, masks=True)
    metrics = coco_evaluate(coco.data, results)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(100.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(100.0)
        assert set(metrics[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert coco_evaluate(coco.data, [])["bbox"]["AP"] == 0.0  # no detections: 0, not a crash
    away = [{**r, "bbox": [r["bbox"][0] + 1000, *r["bbox"][1:]]} for r in results]  # nothing overlaps
    assert coco_evaluate(coco.data, away, ("bbox",))["bbox"]["AP"] == 0.0
    half = coco_evaluate(coco.data, results[::2], ("bbox",))["bbox"]["AP"]
    assert 0.0 < half < 100.0


# ---------------------------------------------------------------- runs


def _check_metrics(metrics: dict, iou_types):
    for iou_type in iou_types:
        assert set(metrics[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        for value in metrics[iou_type].values():
            assert isinstance(value, float) and (value == -1.0 or 0.0 <= value <= 100.0)


@pytest.mark.slow  # 10-minute budget: a CLI fine-tune twice (test_resume_continues_exactly covers resume)
def test_finetune_end_to_end_writes_metrics_and_resumes(data, soco_run, tmp_path, capsys):
    run, _ = soco_run
    out = tmp_path / "ft"
    metrics = finetune(run, *_run_args(data), out, max_iters=2, precise_bn=1, **TINY)
    printed = capsys.readouterr().out
    assert "backbone.body" in printed and "roi_heads.box_head" in printed  # the key report
    assert printed.count("bbox  AP") == 1 and printed.count("segm  AP") == 1  # the AP block, once
    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    _check_metrics(written, ("bbox", "segm"))
    assert written["iterations"] == 2 and written["val_images"] == 2 and written["train_images"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and "loss_mask" in records[-1] and "bbox_AP" in records[-1]
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["iteration"] == 2 and state["masks"] and state["num_classes"] == 3
    # rerun: resumes at the end and returns the metrics without training again
    again = finetune(run, *_run_args(data), out, max_iters=2, precise_bn=1, **TINY)
    printed = capsys.readouterr().out
    assert again == written and "already finished" in printed
    assert f"bbox  AP {written['bbox']['AP']:.1f}" in printed  # the stored result, printed again
    # --eval-only scores the saved model again: the same numbers (its BN statistics were saved after precise BN)
    scored = finetune(run, *_run_args(data), tmp_path / "ft", eval_only=True, **TINY)
    assert scored["bbox"] == written["bbox"] and scored["segm"] == written["segm"]


@pytest.mark.slow  # 10-minute budget: the Faster R-CNN layout is checked in tests/test_backbones.py
def test_boxes_only_data_trains_faster_rcnn_via_the_cli(data, tmp_path, capsys):
    raw = json.loads(Path(data["train_json"]).read_text())
    for a in raw["annotations"]:
        a.pop("segmentation")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(raw))
    out = tmp_path / "frcnn"
    code = main(
        [
            "finetune",
            "--weights",
            "none",
            "--train-json",
            str(boxes),
            "--train-images",
            str(data["train_images"]),
            "--val-json",
            str(data["val_json"]),
            "--val-images",
            str(data["val_images"]),
            "--out",
            str(out),
            "--max-iters",
            "1",
            "--batch-size",
            "2",
            "--per-device-batch",  # two passes of one image (gradient accumulation) in the real detector
            "1",
            "--train-sizes",
            "128",
            "--max-size",
            "160",
            "--roi-batch",
            "32",
            "--test-proposals",
            "30",
            "--detections",
            "10",
            "--precise-bn",
            "0",
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    _check_metrics(metrics, ("bbox",))
    assert "segm" not in metrics
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert not state["masks"] and not any("mask" in k for k in state["model"])
    printed = capsys.readouterr().out
    assert "Faster R-CNN" in printed and "at batch 2 (1 x 1 process(es) x 2 accumulation)" in printed
    assert metrics["per_device_batch"] == 1 and metrics["batch"] == 2


def test_a_resume_with_another_recipe_is_refused_unless_accepted(data, tmp_path, capsys):
    opts = dict({**TINY, "batch_size": 1, "train_sizes": (64,), "max_size": 80, "test_proposals": 10, "detections": 5},
                max_iters=1, precise_bn=0)  # fmt: skip
    out = tmp_path / "out"
    finetune(None, *_run_args(data), out, **opts)
    with pytest.raises(UserError, match=r"made with other settings \(weight_decay\)"):
        finetune(None, *_run_args(data), out, **{**opts, "weight_decay": 1e-4})
    # evaluation settings are free: a finished run with its metrics answers at once
    capsys.readouterr()
    finetune(None, *_run_args(data), out, **{**opts, "detections": 7})
    assert "already finished (1 iterations)" in capsys.readouterr().out
    finetune(None, *_run_args(data), out, accept_changes=True, **{**opts, "weight_decay": 1e-4})
    assert "note: the settings differ from the checkpoint's in weight_decay" in capsys.readouterr().out


def test_resume_continues_exactly(data, tmp_path, monkeypatch):
    # Kept fast for CI: batch 1, 64 px short side, 2 iterations (interrupted after the first), 10 test
    # proposals. The interrupted run resumes from its mid-run checkpoint (checkpoint_every=1);
    # model, SGD momentum and the evaluation must equal an uninterrupted run's, bit for bit.
    import soco_pretrain.transfer.finetune as ft

    opts = dict(
        {**TINY, "batch_size": 1, "train_sizes": (64,), "max_size": 80, "test_proposals": 10, "detections": 5},
        max_iters=2,
        precise_bn=0,
        checkpoint_every=1,
        seed=5,
    )
    full_metrics = finetune(None, *_run_args(data), tmp_path / "full", **opts)
    real = ft.lr_at

    def interrupted(iteration, plan):
        if iteration == 1:
            raise KeyboardInterrupt
        return real(iteration, plan)

    monkeypatch.setattr(ft, "lr_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(None, *_run_args(data), tmp_path / "split", **opts)
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["iteration"] == 1
    monkeypatch.setattr(ft, "lr_at", real)
    split_metrics = finetune(None, *_run_args(data), tmp_path / "split", **opts)
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert full["iteration"] == split["iteration"] == 2
    for key in full["model"]:
        assert torch.equal(full["model"][key], split["model"][key]), key
    momentum = [(k, v["momentum_buffer"]) for k, v in full["optimizer"]["state"].items()]
    assert momentum and all(torch.equal(v, split["optimizer"]["state"][k]["momentum_buffer"]) for k, v in momentum)
    assert split_metrics["bbox"] == full_metrics["bbox"] and split_metrics["segm"] == full_metrics["segm"]


# ---------------------------------------------------------------- bad input


def test_non_finite_loss_stops_with_one_line(data, tmp_path, monkeypatch, capsys):
    import soco_pretrain.transfer.finetune as ft

    real = ft.build_detector

    def exploding(*args, **kwargs):
        model = real(*args, **kwargs)
        model.forward = lambda images, targets=None: {"loss_x": torch.tensor(float("nan"), requires_grad=True)}
        return model

    monkeypatch.setattr(ft, "build_detector", exploding)
    code = main(
        [
            "finetune",
            "--weights",
            "none",
            "--train-json",
            str(data["train_json"]),
            "--train-images",
            str(data["train_images"]),
            "--val-json",
            str(data["val_json"]),
            "--val-images",
            str(data["val_images"]),
            "--out",
            str(tmp_path / "nan"),
            "--max-iters",
            "2",
            "--batch-size",
            "1",
            "--train-sizes",
            "64",
            "--max-size",
            "80",
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 1 and "non-finite loss" in _error(capsys)
    assert not (tmp_path / "nan" / "checkpoints" / "last.pt").exists()


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("soco: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors(data, soco_run, tmp_path, capsys):
    base = [
        "finetune",
        "--weights",
        "none",
        "--train-images",
        str(data["train_images"]),
        "--val-json",
        str(data["val_json"]),
        "--val-images",
        str(data["val_images"]),
        "--out",
        str(tmp_path / "o"),
        "--workers",
        "0",
        "--no-progress",
    ]
    assert main([*base, "--train-json", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in _error(capsys)
    bad = tmp_path / "bad.json"
    for text, expected in [
        ("{not json", "cannot read COCO JSON"),
        ('{"images": 3}', "not a COCO instances JSON"),
        ('{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}]}', "width and height"),
        (
            (
                '{"images": [], "categories": [{"id": 1}], "annotations": '
                '[{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]}]}'
            ),
            "unknown image id",
        ),
    ]:
        bad.write_text(text)
        assert main([*base, "--train-json", str(bad)]) == 2
        assert expected in _error(capsys)
    with pytest.raises(PathError):
        load_coco(data["train_json"], tmp_path / "no-such-folder")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    args = [a if a != "none" else str(tmp_path / "junk.pth") for a in base]
    assert main([*args, "--train-json", str(data["train_json"]), "--train-sizes", "64", "--max-size", "80"]) == 2
    assert "junk.pth" in _error(capsys)
    with pytest.raises(SystemExit) as exit_info:  # argparse
        main([*base, "--train-json", str(data["train_json"]), "--fraction", "1.5"])
    assert exit_info.value.code == 2 and "--fraction" in _error(capsys)


def test_undecodable_or_resized_images_are_reported_not_fatal(data, tmp_path):
    coco = load_coco(data["train_json"], data["train_images"])
    images = [dict(coco.images[0], file_name="missing.png"), dict(coco.images[1], width=999)]
    ds = CocoDetection(coco, images, masks=True)
    missing, resized = ds[0], ds[1]
    assert missing["image"] is None and missing["error"][0].endswith("missing.png")
    assert "file not found" in missing["error"][1]
    assert resized["image"] is None and "differs from the JSON" in resized["error"][1]


# ---------------------------------------------------------------- data checked before training


def _cli(data, out, **paths) -> list[str]:
    given = {**dict(zip(("train_json", "train_images", "val_json", "val_images"), _run_args(data))), **paths}
    return [
        "finetune",
        "--weights",
        "none",
        *(a for key, value in given.items() for a in (f"--{key.replace('_', '-')}", str(value))),
        "--out",
        str(out),
        "--max-iters",
        "1",
        "--batch-size",
        "1",
        "--train-sizes",
        "64",
        "--max-size",
        "80",
        "--workers",
        "0",
        "--no-progress",
    ]


def test_missing_or_undecodable_images_stop_before_training(data, tmp_path, monkeypatch, capsys):
    import shutil

    import soco_pretrain.transfer.finetune as ft

    def never(*args, **kwargs):
        raise AssertionError("the detector was built: the data were not checked first")

    monkeypatch.setattr(ft, "build_detector", never)
    # --val-images pointing at the training photos: none of the val JSON's files is there
    assert main(_cli(data, tmp_path / "a", val_images=data["train_images"])) == 2
    err = _error(capsys)
    assert "2 of 2 images" in err and "--val-images" in err and "rocket.png" in err and "coins.png" in err
    # a training folder that lacks one of the JSON's images
    partial = tmp_path / "partial"
    shutil.copytree(data["train_images"], partial)
    (partial / "coffee.png").unlink()
    assert main(_cli(data, tmp_path / "b", train_images=partial)) == 2
    err = _error(capsys)
    assert "1 of 4 images" in err and "--train-images" in err and "coffee.png" in err
    # every file present, but the first val image does not decode
    broken = tmp_path / "broken"
    shutil.copytree(data["val_images"], broken)
    (broken / "rocket.png").write_bytes(b"not a png")
    assert main(_cli(data, tmp_path / "c", val_images=broken)) == 2
    err = _error(capsys)
    assert "rocket.png" in err and "--val-images" in err
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "c" / "checkpoints").exists()


def test_a_val_image_that_was_pretrained_on_is_refused_unless_allow_leak(data, tmp_path, monkeypatch, capsys):
    """The leak guard of soco knn / compare: a renamed copy of a val photo in the pretraining data
    of --weights (a run folder, or its export with FILE.manifest.json) stops soco finetune in one
    line naming both files, before anything is written; --allow-leak goes on."""
    import shutil

    import soco_pretrain.transfer.finetune as ft
    from soco_pretrain.data.manifest import build_manifest, write_manifest
    from soco_pretrain.transfer.export import export

    val = load_coco(data["val_json"], data["val_images"])
    leaked = val.image_path(val.images[0])
    pool = tmp_path / "pool"
    pool.mkdir()
    shutil.copy(leaked, pool / "holiday.png")
    cfg = PretrainConfig()
    cfg.model.backbone = "resnet18"  # the guard does not depend on the backbone; R18 is cheap
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last.pt", {"model": SoCoModel(cfg).state_dict(), "config": to_dict(cfg)})
    write_manifest(run, build_manifest([pool / "holiday.png"], pool, progress=False))
    export(run, "torchvision", out=tmp_path / "soco.pth")  # + soco.pth.manifest.json
    out = tmp_path / "ft"
    for weights in (run, tmp_path / "soco.pth"):
        argv = [a if a != "none" else str(weights) for a in _cli(data, out)]
        assert main(argv) == 2
        err = _error(capsys)
        assert f"e.g. {leaked} = holiday.png" in err and "--allow-leak" in err and not out.exists()

    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(ft, "build_detector", reached)  # past the guard: no need to train
    with pytest.raises(Reached):
        main([*argv, "--allow-leak"])


# ---------------------------------------------------------------- the checkpoint is saved before evaluating


@pytest.mark.slow  # ~25 s: a whole fine-tune; in the slow set to keep the default run under 10 minutes
def test_final_checkpoint_survives_a_failing_evaluation(data, tmp_path, monkeypatch):
    import soco_pretrain.transfer.finetune as ft

    opts = dict(
        {**TINY, "batch_size": 1, "train_sizes": (64,), "max_size": 80, "test_proposals": 10, "detections": 5},
        max_iters=1,
        precise_bn=1,
        seed=2,
    )
    full_metrics = finetune(None, *_run_args(data), tmp_path / "full", **opts)
    real = ft.evaluate

    def failing(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(ft, "evaluate", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        finetune(None, *_run_args(data), tmp_path / "split", **opts)
    saved = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert saved["iteration"] == 1 and not (tmp_path / "split" / "metrics.json").exists()
    # the rerun trains nothing more, evaluates the saved weights and saves them again with the
    # precise-BN statistics: the same checkpoint and metrics as the run that evaluated in one go
    monkeypatch.setattr(ft, "evaluate", real)
    monkeypatch.setattr(ft, "lr_at", lambda *a, **k: pytest.fail("trained again"))
    split_metrics = finetune(None, *_run_args(data), tmp_path / "split", **opts)
    assert split_metrics["iterations"] == 1 and split_metrics["bbox"] == full_metrics["bbox"]
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    for key in full["model"]:
        assert torch.equal(full["model"][key], split["model"][key]), key


# ---------------------------------------------------------------- per-device batch and accumulation


class TinyDetector(torch.nn.Module):
    """Stands in for Mask R-CNN where a loss must be a mean over images: Mask R-CNN's is not (its BN
    statistics, padding and RoI sampling are per forward pass), so only this tells whether
    accumulation adds up exactly to the whole batch. No detections at evaluation."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        from types import SimpleNamespace

        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 4)
        self.transform, self.test_size = SimpleNamespace(min_size=(64,)), 64

    def forward(self, images, targets=None):
        if not self.training:
            return [
                {
                    "boxes": torch.zeros(0, 4),
                    "labels": torch.zeros(0, dtype=torch.int64),
                    "scores": torch.zeros(0),
                    "masks": torch.zeros(0, 1, *im.shape[-2:]),
                }
                for im in images
            ]
        losses = []
        for im, target in zip(images, targets):
            pred = self.head(torch.tanh(self.conv(im[None])).mean((2, 3)))
            losses.append((pred - target["boxes"].mean(0, keepdim=True) / 100).pow(2).sum())
        return {"loss_box": torch.stack(losses).mean(), "loss_weights": 1e-3 * self.head.weight.pow(2).sum()}


def test_accumulation_equals_the_whole_batch_and_resumes_exactly(data, tmp_path, monkeypatch, capsys):
    import soco_pretrain.transfer.finetune as ft

    monkeypatch.setattr(ft, "build_detector", TinyDetector)
    opts = dict(TINY, batch_size=4, max_iters=3, precise_bn=0, seed=3, lr=0.5, warmup_iters=0)
    whole = finetune(None, *_run_args(data), tmp_path / "whole", per_device_batch=4, **opts)
    assert "(4 x 1 process(es) x 1 accumulation)" in capsys.readouterr().out
    finetune(None, *_run_args(data), tmp_path / "accum", per_device_batch=1, **opts)
    assert "(1 x 1 process(es) x 4 accumulation)" in capsys.readouterr().out
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "accum" / "checkpoints" / "last.pt")
    torch.manual_seed(3)
    initial = TinyDetector().state_dict()  # as build_job makes it (seeded)
    for key, value in a["model"].items():
        assert not torch.allclose(value, initial[key]), key  # trained
        assert torch.allclose(value, b["model"][key], rtol=1e-5, atol=1e-6), key
    for k, v in a["optimizer"]["state"].items():
        assert torch.allclose(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"], atol=1e-6)
    assert whole["per_device_batch"] == 4
    # interrupted after iteration 1 with accumulation, then resumed: bit for bit the uninterrupted run
    real = ft.lr_at

    def interrupted(iteration, plan):
        if iteration == 1:
            raise KeyboardInterrupt
        return real(iteration, plan)

    monkeypatch.setattr(ft, "lr_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(None, *_run_args(data), tmp_path / "split", per_device_batch=2, checkpoint_every=1, **opts)
    monkeypatch.setattr(ft, "lr_at", real)
    finetune(None, *_run_args(data), tmp_path / "split", per_device_batch=2, checkpoint_every=1, **opts)
    finetune(None, *_run_args(data), tmp_path / "two", per_device_batch=2, **opts)
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert split["iteration"] == two["iteration"] == 3
    for key, value in two["model"].items():
        assert torch.equal(value, split["model"][key]), key


def test_per_device_batch_must_divide_and_auto_follows_the_memory(data, tmp_path, monkeypatch, capsys):
    import soco_pretrain.transfer.finetune as ft
    from soco_pretrain.errors import UserError
    from soco_pretrain.transfer import detector_memory as memory
    from soco_pretrain.transfer.finetune import resolve_per_device_batch

    with pytest.raises(UserError, match="does not divide"):
        finetune(None, *_run_args(data), tmp_path / "x", **{**TINY, "batch_size": 4, "per_device_batch": 3})
    cpu = torch.device("cpu")
    defaults = FinetuneOptions()  # batch 16 at 640-800 px, long side <= 1333
    monkeypatch.setattr(memory, "cpu_available_gib", lambda: 22.0)  # a 24 GB machine
    chosen, note = resolve_per_device_batch(defaults, 1, cpu)
    assert chosen < 16 and 16 % chosen == 0 and f"per-device batch {chosen} (auto" in note and "22.0 GiB" in note
    assert memory.finetune_estimate_gib(chosen, 800, 1333) <= 22.0 * memory.FINETUNE_HEADROOM
    assert memory.finetune_estimate_gib(16, 800, 1333) > 22.0  # the whole batch at once would not fit
    monkeypatch.setattr(memory, "cpu_available_gib", lambda: 1000.0)
    assert resolve_per_device_batch(defaults, 1, cpu)[0] == 16
    assert resolve_per_device_batch(FinetuneOptions(per_device_batch=8), 2, cpu) == (8, "")
    # the run prints the choice once and trains with it (one image per pass when memory is short)
    monkeypatch.setattr(memory, "cpu_available_gib", lambda: 3.0)
    monkeypatch.setattr(ft, "build_detector", TinyDetector)
    metrics = finetune(None, *_run_args(data), tmp_path / "auto", **dict(TINY, max_iters=1, precise_bn=0))
    printed = capsys.readouterr().out
    assert printed.count("per-device batch 1 (auto: 3.0 GiB available") == 1 and metrics["per_device_batch"] == 1
