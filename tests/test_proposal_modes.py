"""Proposal sources for the paper's ablations (Table 4 row 1, Table 5c): the whole image, random
boxes, a COCO JSON's boxes; none of them needs a proposal store."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from data_fixtures import SMALL_PRETRAIN, make_photos, make_store
from PIL import Image

from soco_pretrain.cli import main
from soco_pretrain.config import DataConfig, apply_overrides
from soco_pretrain.data import DatasetError, SoCoDataset
from soco_pretrain.data.proposal_sources import (
    PAPER_RATIO,
    PAPER_REL_SIZE,
    passes_paper_filter,
    random_boxes,
    read_coco_boxes,
)
from soco_pretrain.engine.metrics import read_metrics
from soco_pretrain.errors import PathError, UserError
from soco_pretrain.presets import load_preset
from soco_pretrain.train.loop import pretrain

SMALL = SMALL_PRETRAIN  # tests/data_fixtures.py


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    rel = make_photos(root / "images", names=("astronaut", "coffee", "chelsea", "rocket"), side=96)
    sizes = {}
    for p in rel:
        with Image.open(root / "images" / p) as im:
            sizes[p] = im.size
    return {"root": root, "images": root / "images", "rel": rel, "sizes": sizes}


def _config(*overrides, seed=0) -> DataConfig:
    cfg = DataConfig(seed=seed)
    cfg.augment.enabled = False
    return apply_overrides(cfg, ["views.v1_size=64", "views.v2_size=64", "views.v3_size=32", *overrides])


def _write_coco(path, photos, boxes_per_image, extra_images=()):
    images, annotations = [], []
    for k, rel in enumerate(photos["rel"]):
        w, h = photos["sizes"][rel]
        images.append({"id": k + 1, "file_name": rel, "width": w, "height": h})
        for box in boxes_per_image(rel, w, h):
            box = dict(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": k + 1,
                    "category_id": 1,
                    "bbox": box.pop("bbox"),
                    "iscrowd": box.pop("iscrowd", 0),
                }
            )
    for k, name in enumerate(extra_images):
        images.append({"id": 1000 + k, "file_name": name, "width": 10, "height": 10})
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]})
    )
    return path


# ---------------------------------------------------------------- random boxes


def test_random_boxes_follow_the_paper_filter_and_stay_inside():
    rng = np.random.default_rng(0)
    for width, height in [(96, 72), (500, 375), (64, 64), (40, 110)]:
        boxes = random_boxes(rng, width, height, 16)
        assert boxes.shape == (16, 4)
        assert (boxes[:, :2] >= 0).all()
        assert (boxes[:, 2] <= width + 1e-9).all() and (boxes[:, 3] <= height + 1e-9).all()
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert ((w / h >= PAPER_RATIO[0] - 1e-9) & (w / h <= PAPER_RATIO[1] + 1e-9)).all()
        rel = np.sqrt(w * h) / math.sqrt(width * height)
        assert ((rel >= PAPER_REL_SIZE[0] - 1e-9) & (rel <= PAPER_REL_SIZE[1] + 1e-9)).all()
        assert passes_paper_filter(boxes, width, height).all()
    # Same seed, same boxes; another seed, others.
    a = random_boxes(np.random.default_rng(5), 96, 72, 4)
    assert np.array_equal(a, random_boxes(np.random.default_rng(5), 96, 72, 4))
    assert not np.array_equal(a, random_boxes(np.random.default_rng(6), 96, 72, 4))


def test_random_boxes_on_an_impossible_aspect_are_clamped_inside():
    boxes = random_boxes(np.random.default_rng(0), 3000, 10, 3)  # 300:1, the rules cannot hold
    assert boxes.shape == (3, 4)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 3000).all() and (boxes[:, 3] <= 10).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) > 0).all()


def test_random_mode_draws_k_new_boxes_per_sample_deterministically(photos):
    cfg = _config("views.proposal_source=random", "views.num_proposals=3")
    ds = SoCoDataset(photos["images"], None, cfg)
    for i, rel in enumerate(photos["rel"]):
        raw = ds.raw(i)
        w, h = photos["sizes"][rel]
        assert raw.boxes.shape == (3, 4) and passes_paper_filter(raw.boxes, w, h).all()
        sample = ds[i]
        assert 1 <= int(sample["valid"].sum()) <= 3
        for v, size in enumerate((64, 64, 32)):
            b = sample["boxes"][v]
            assert (b >= 0).all() and (b <= size).all()
    # Different between epochs and images; the same for the same seed (a fresh dataset).
    assert not np.array_equal(ds.raw(0, epoch=0).boxes, ds.raw(0, epoch=1).boxes)
    again = SoCoDataset(photos["images"], None, cfg)
    assert np.array_equal(ds.raw(2, epoch=1).boxes, again.raw(2, epoch=1).boxes)
    assert all(np.array_equal(x, y) for x, y in zip(ds[(1, 2)]["boxes"], again[(1, 2)]["boxes"]))
    other_seed = SoCoDataset(photos["images"], None, _config("views.proposal_source=random", seed=1))
    assert not np.array_equal(ds.raw(0).boxes[:2], other_seed.raw(0).boxes)


# ---------------------------------------------------------------- the whole image


def test_whole_image_mode_has_one_valid_slot_covering_v1(photos):
    cfg = _config("views.proposal_source=whole_image", "views.jitter=none", "views.num_proposals=4")
    ds = SoCoDataset(photos["images"], None, cfg)
    assert ds.without_proposals == []
    for i, rel in enumerate(photos["rel"]):
        raw = ds.raw(i)
        w, h = photos["sizes"][rel]
        assert np.array_equal(raw.boxes, [[0, 0, w, h]])
        sample = ds[i]
        assert sample["valid"].tolist() == [True, False, False, False]
        assert sample["proposal_ids"].tolist() == [0, -1, -1, -1]
        assert sample["boxes"][0][0].tolist() == [0, 0, 64, 64]  # all of V1
        # V2 is a crop of V1, so the image's box covers all of V2 (and V3, V2 downsampled).
        assert sample["boxes"][1][0].tolist() == [0, 0, 64, 64]
        assert sample["boxes"][2][0].tolist() == [0, 0, 32, 32]


# ---------------------------------------------------------------- COCO JSON boxes


def _gt_boxes(rel, w, h):
    return [
        {"bbox": [2.5, 3.0, w * 0.5, h * 0.4]},  # kept
        {"bbox": [1.0, 1.0, w * 0.9, h * 0.9]},  # kept, fails the paper filter (rel size 0.9)
        {"bbox": [0.0, 0.0, 5.0, 5.0], "iscrowd": 1},  # skipped: crowd
        {"bbox": [4.0, 4.0, 0.0, 7.0]},
    ]  # skipped: empty


def test_coco_boxes_are_read_xywh_to_corners_crowd_skipped(photos, tmp_path):
    path = _write_coco(tmp_path / "gt.json", photos, _gt_boxes)
    boxes = read_coco_boxes(path, photos["rel"])
    for i, rel in enumerate(photos["rel"]):
        w, h = photos["sizes"][rel]
        expected = [[2.5, 3.0, 2.5 + w * 0.5, 3.0 + h * 0.4], [1.0, 1.0, 1.0 + w * 0.9, 1.0 + h * 0.9]]
        assert np.allclose(boxes.of(i), expected)
        assert tuple(boxes.sizes[i]) == (w, h)
    filtered = read_coco_boxes(path, photos["rel"], apply_filter=True)
    assert all(len(filtered.of(i)) == 1 for i in range(len(photos["rel"])))


def test_coco_mode_samples_use_the_annotation_boxes(photos, tmp_path):
    path = _write_coco(tmp_path / "gt.json", photos, _gt_boxes)
    cfg = _config(
        "views.proposal_source=coco",
        f"views.proposal_json={path}",
        "views.jitter=none",
        "views.num_proposals=2",
        "views.min_visible=0.0",
        "views.hflip_p=0.0",
    )
    ds = SoCoDataset(photos["images"], None, cfg)
    for i, rel in enumerate(photos["rel"]):
        w, h = photos["sizes"][rel]
        raw = ds.raw(i)
        assert np.allclose(raw.boxes[0], [2.5, 3.0, 2.5 + w * 0.5, 3.0 + h * 0.4])
        sample = ds[i]
        valid = sample["valid"].numpy()
        ids = sample["proposal_ids"].numpy()[valid]
        # V1 boxes: the annotation boxes squashed to 64 x 64.
        scale = np.array([64 / w, 64 / h, 64 / w, 64 / h])
        expected = np.minimum(raw.boxes[ids] * scale, 64)
        assert np.allclose(sample["boxes"][0].numpy()[valid], expected, atol=1e-4)
    assert "coco" in repr(ds)


def test_coco_mode_images_without_boxes_error_or_use_the_whole_image(photos, tmp_path):
    def some(rel, w, h):
        return [] if rel == photos["rel"][0] else [{"bbox": [0, 0, w / 2, h / 2]}]

    path = _write_coco(tmp_path / "some.json", photos, some)
    cfg = _config("views.proposal_source=coco", f"views.proposal_json={path}")
    with pytest.raises(DatasetError) as err:
        SoCoDataset(photos["images"], None, cfg)
    message = str(err.value)
    assert "\n" not in message and "1 of 4 images have no boxes" in message and photos["rel"][0] in message
    ds = SoCoDataset(photos["images"], None, apply_overrides(cfg, ["views.no_proposals=whole_image"]))
    w, h = photos["sizes"][photos["rel"][0]]
    assert ds.without_proposals == [photos["rel"][0]]
    assert np.array_equal(ds.raw(0).boxes, [[0, 0, w, h]])


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "cannot read the proposal JSON"),
        ('{"images": []}', "needs 'images' and 'annotations'"),
        (
            '{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 2, "bbox": [0, 0, 1, 1]}]}',
            "known 'image_id'",
        ),
    ],
)
def test_bad_box_json_is_a_one_line_error(photos, tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PathError) as err:
        SoCoDataset(photos["images"], None, _config("views.proposal_source=coco", f"views.proposal_json={path}"))
    assert problem in str(err.value) and "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "overrides, problem",
    [
        ((), "needs a proposal store"),
        (("views.proposal_source=coco",), "needs views.proposal_json"),
        (("views.proposal_source=boxes",), "expected one of selective_search, whole_image, random, coco"),
    ],
)
def test_missing_store_or_json_or_unknown_source_is_one_line(photos, overrides, problem):
    # an unknown source is refused by the config's type check (ConfigError) before the dataset sees it
    with pytest.raises(UserError) as err:
        SoCoDataset(photos["images"], None, _config(*overrides))
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_selective_search_default_is_unchanged_and_ablation_modes_ignore_a_store(photos, tmp_path):
    store = make_store(tmp_path / "store", photos["images"], photos["rel"], boxes_per_image=5)
    ds = SoCoDataset(photos["images"], store, _config())
    assert ds.raw(0).boxes.shape == (5, 4)
    whole = SoCoDataset(photos["images"], store, _config("views.proposal_source=whole_image"))
    assert len(whole.raw(0).boxes) == 1


# ---------------------------------------------------------------- training smoke (one step per mode)


# About 8 s each (one R50-FPN build and step on one thread); random runs through the command line below.
@pytest.mark.parametrize("mode", ["whole_image", "coco"])
def test_pretrain_one_step_without_a_store(photos, tmp_path, mode):
    overrides = [*SMALL, f"data.views.proposal_source={mode}"]
    if mode == "coco":
        path = _write_coco(tmp_path / "gt.json", photos, _gt_boxes)
        overrides.append(f"data.views.proposal_json={path}")
    cfg = apply_overrides(load_preset("tiny"), overrides)
    summary = pretrain(cfg, photos["images"], None, tmp_path / "run", max_steps=1, progress=False)
    assert summary.step == 1 and math.isfinite(summary.loss)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_cli_pretrain_needs_proposals_only_for_selective_search(photos, tmp_path, capsys):
    base = ["pretrain", "--preset", "tiny", "--images", str(photos["images"]), "--out", str(tmp_path / "run")]
    for item in SMALL:
        base += ["--set", item]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("soco: error: --proposals STORE is required") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    assert (
        main(
            [
                *base,
                "--set",
                "data.views.proposal_source=coco",
                "--set",
                f"data.views.proposal_json={tmp_path / 'none.json'}",
            ]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    assert main([*base, "--set", "data.views.proposal_source=random", "--max-steps", "1"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1]


def test_cli_show_views_needs_proposals_only_for_selective_search(photos, tmp_path, capsys):
    base = ["show", "views", "--images", str(photos["images"]), "-o", str(tmp_path / "pics"), "--num", "2"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("soco: error: --proposals STORE is required") and err.count("\n") == 1
    assert main([*base, "--set", "views.proposal_source=random"]) == 0
    assert len(list((tmp_path / "pics").glob("views_*.png"))) == 2
