"""The object probe of ``soco knn --objects crop`` (evaluate/crops.py, evaluate/readout.py and the
probe parts of evaluate/knn.py): crop geometry and pixels, centring, the class filter, the metrics
against hand-worked values, the logistic readout, the whole report on a coloured-squares set, bad
input and the monitor. Every oracle is worked by hand or computed here independently."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import call
from test_knn import OPTS, SMALL, _data_args, make_coloured_set

from soco_pretrain.config import ModelConfig
from soco_pretrain.errors import UserError
from soco_pretrain.evaluate.crops import FILL, CropSet, crop_square, cut_crop
from soco_pretrain.evaluate.knn import KnnOptions, knn_eval, load_objects
from soco_pretrain.evaluate.readout import (
    auroc,
    centre_normalise,
    class_metrics,
    keep_frequent,
    logistic_scores,
    majority,
)

pytestmark = pytest.mark.usefixtures("one_thread")

R18 = dict(OPTS, backbone="resnet18")  # size 64, min_box 8, no workers, no progress


@pytest.fixture(scope="module")
def coloured(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    train = make_coloured_set(root, "train", 16, seed=1)
    val = make_coloured_set(root, "val", 12, seed=2)
    return root, train, val


def balanced_accuracy(pred, labels) -> float:
    """Mean per-class recall in percent, over the classes present in ``labels`` (the oracle)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    return 100.0 * float(np.mean([(pred[labels == c] == c).mean() for c in np.unique(labels)]))


def expected_square(box, width, height, context):
    """The crop square worked out independently: a side of ceil(longer side x context) px placed
    at floor(centre - exact side / 2), with exact rational arithmetic; clipped = reaches outside."""
    from fractions import Fraction

    x1, y1, x2, y2 = (Fraction(str(v)) for v in box)
    side = max(x2 - x1, y2 - y1, Fraction(1)) * Fraction(str(context))
    x0, y0 = math.floor((x1 + x2) / 2 - side / 2), math.floor((y1 + y2) / 2 - side / 2)
    n = max(1, math.ceil(side))
    return (x0, y0, x0 + n, y0 + n), x0 < 0 or y0 < 0 or x0 + n > width or y0 + n > height


def json_boxes(path: Path):
    """(x1, y1, x2, y2, width, height, category id) of every annotation in a coloured-set JSON."""
    data = json.loads(path.read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    out = []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        out.append((x, y, x + w, y + h, *sizes[a["image_id"]], a["category_id"]))
    return out


# ---------------------------------------------------------------- 1. crop geometry and pixels


@pytest.mark.parametrize(
    "box, width, height, context, square, clipped",
    [
        # 40x20 box centred on (30, 30): side 40 x 1.2 = 48, from 30 - 24 = 6
        ((10, 20, 50, 40), 100, 100, 1.2, (6, 6, 54, 54), False),
        ((10, 20, 50, 40), 50, 100, 1.2, (6, 6, 54, 54), True),  # reaches x = 54 > 50
        ((10, 20, 50, 40), 54, 54, 1.2, (6, 6, 54, 54), False),  # touches the edges, inside
        # fractional box: centre (8.5, 9.75), side 10 -> floor(3.5) = 3, floor(4.75) = 4
        ((3.5, 7.25, 13.5, 12.25), 20, 20, 1.0, (3, 4, 13, 14), False),
        # corner box: side 12.5 from 5 - 6.25 = -1.25 -> -2, 13 px (ceil 12.5)
        ((0, 0, 10, 10), 40, 40, 1.25, (-2, -2, 11, 11), True),
        ((0, 0, 10, 10), 40, 40, 1.0, (0, 0, 10, 10), False),  # at the corner, context 1: inside
        # under 1 px: the side is at least 1 x context = 1.2 -> 2 px from floor(5.25 - 0.6) = 4
        ((5, 5, 5.5, 5.2), 10, 10, 1.2, (4, 4, 6, 6), False),
        # tall box 10x30 at the bottom-right of a 64x64 photo: side 36 from (59 - 18, 49 - 18)
        ((54, 34, 64, 64), 64, 64, 1.2, (41, 31, 77, 67), True),
    ],
)
def test_crop_square_by_hand(box, width, height, context, square, clipped):
    got, got_clipped = crop_square(box, width, height, context)
    assert got == square and got_clipped is clipped
    assert all(isinstance(v, int) for v in got) and got[2] - got[0] == got[3] - got[1]
    assert (got, got_clipped) == expected_square(box, width, height, context)  # the helper agrees


def patch_image():
    """60x60: a 3x3 grid of 20 px patches, each of its own colour; colours[r][c]."""
    colours = [[(30 + 70 * r, 200 - 60 * c, 40 + 25 * (r + c)) for c in range(3)] for r in range(3)]
    image = np.zeros((60, 60, 3), dtype=np.uint8)
    for r in range(3):
        for c in range(3):
            image[20 * r : 20 * r + 20, 20 * c : 20 * c + 20] = colours[r][c]
    return image, colours


def test_cut_crop_of_a_patch_is_that_patch():
    image, colours = patch_image()
    # context 1, no resize: exactly the centre patch
    crop, clipped = cut_crop(image, (20, 20, 40, 40), size=20, context=1.0)
    assert crop.shape == (20, 20, 3) and crop.dtype == np.uint8 and not clipped
    assert (crop == colours[1][1]).all()
    # resized to 48 px: still one colour everywhere (nothing else was cut)
    crop, clipped = cut_crop(image, (20, 20, 40, 40), size=48, context=1.0)
    assert crop.shape == (48, 48, 3) and not clipped
    assert np.abs(crop.astype(int) - colours[1][1]).max() <= 1
    # the caller's image is untouched
    assert (image[20:40, 20:40] == colours[1][1]).all()


def test_cut_crop_with_context_holds_the_neighbours():
    image, colours = patch_image()
    # context 1.5: side 30 from 15 to 45, a 5 px border of the eight neighbours
    crop, clipped = cut_crop(image, (20, 20, 40, 40), size=30, context=1.5)
    assert not clipped
    assert (crop[5:25, 5:25] == colours[1][1]).all()
    assert (crop[:5, :5] == colours[0][0]).all() and (crop[:5, 5:25] == colours[0][1]).all()
    assert (crop[25:, 25:] == colours[2][2]).all() and (crop[5:25, :5] == colours[1][0]).all()
    # resized x2 (60 px): the same layout, with up to 2 px of antialias at each colour edge
    crop, _ = cut_crop(image, (20, 20, 40, 40), size=60, context=1.5)
    assert (crop[12:48, 12:48] == colours[1][1]).all()
    assert (crop[:8, :8] == colours[0][0]).all() and (crop[52:, 52:] == colours[2][2]).all()
    assert (crop[:8, 12:48] == colours[0][1]).all() and (crop[12:48, 52:] == colours[1][2]).all()


def test_cut_crop_at_the_corner_is_filled_outside_the_photo():
    image, colours = patch_image()
    # corner patch, context 1.5: square (-5, -5, 25, 25); 5 px outside the photo on two sides
    crop, clipped = cut_crop(image, (0, 0, 20, 20), size=30, context=1.5)
    assert clipped
    assert (crop[:5] == FILL).all() and (crop[:, :5] == FILL).all()
    assert (crop[5:25, 5:25] == colours[0][0]).all()
    assert (crop[25:, 5:25] == colours[1][0]).all() and (crop[5:25, 25:] == colours[0][1]).all()
    # resized to 60 px: FILL in the outer 10 px, less the antialias border
    crop, clipped = cut_crop(image, (0, 0, 20, 20), size=60, context=1.5)
    assert clipped and (crop[:8] == FILL).all() and (crop[:, :8] == FILL).all()
    assert (crop[12:48, 12:48] == colours[0][0]).all()
    # the bottom-right corner patch the same way, mirrored
    crop, clipped = cut_crop(image, (40, 40, 60, 60), size=30, context=1.5)
    assert clipped and (crop[25:] == FILL).all() and (crop[:, 25:] == FILL).all()
    assert (crop[5:25, 5:25] == colours[2][2]).all() and (crop[:5, :5] == colours[1][1]).all()


def test_crop_set_counts_clipped_crops_as_the_geometry_says(coloured):
    root, train, _ = coloured
    objects = load_objects(train, root / "images", min_box=8)
    boxes = json_boxes(train)
    for context in (1.2, 1.5):
        crops = CropSet(objects, 32, context)
        expected = sum(expected_square(b[:4], b[4], b[5], context)[1] for b in boxes)
        assert crops.clipped == expected, context
        assert len(crops) == len(boxes) and tuple(crops.crops.shape[1:]) == (3, 32, 32)
    # at 1.5 the first square (x = 4) always reaches out, the second only when 25 px or wider
    wide = sum(1 for b in boxes if b[0] == 34 and b[2] - b[0] >= 25)
    assert crops.clipped == len(boxes) // 2 + wide


# ---------------------------------------------------------------- 2. centring + L2


def test_centre_normalise_uses_the_train_mean():
    train = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]])  # mean (2, 1)
    val = torch.tensor([[2.0, 2.0], [5.0, 1.0]])  # val's own mean (3.5, 1.5) must not be used
    tn, vn = centre_normalise(train, val)
    r = 1 / math.sqrt(2)
    assert torch.allclose(tn, torch.tensor([[-r, -r], [r, -r], [0.0, 1.0]]), atol=1e-6)
    assert torch.allclose(vn, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), atol=1e-6)


def test_centre_normalise_centres_then_gives_unit_rows():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(40, 6, generator=g) * 3 + 50  # far from the origin: every cosine near 1
    val = torch.randn(10, 6, generator=g) + 50
    tn, vn = centre_normalise(train, val)
    assert torch.allclose(tn.norm(dim=1), torch.ones(40), atol=1e-5)
    assert torch.allclose(vn.norm(dim=1), torch.ones(10), atol=1e-5)
    # normalised rows x their pre-normalisation (centred) norms = the centred rows: they sum to 0
    centred_norms = (train.double() - train.double().mean(0)).norm(dim=1)
    assert (tn.double() * centred_norms[:, None]).sum(0).abs().max() < 1e-4
    # without centring they would not: the raw rows all point the same way
    assert (torch.nn.functional.normalize(train, dim=1).sum(0)).norm() > 30


# ---------------------------------------------------------------- 3. the class filter


def test_keep_frequent_by_hand():
    cats = ["a", "b", "c", "d"]
    train = torch.tensor([0, 0, 0, 1, 1, 2, 0, 1])  # a 4, b 3, c 1, d 0
    val = torch.tensor([2, 0, 3, 1, 1])
    tk, vk, kept, dropped = keep_frequent(train, val, cats, 2)
    assert kept == ["a", "b"] and dropped == {"c": 1}  # d has no train object: neither kept nor listed
    assert tk.tolist() == [True, True, True, True, True, False, True, True]
    assert vk.tolist() == [False, True, False, True, True]
    tk, vk, kept, dropped = keep_frequent(train, val, cats, 4)
    assert kept == ["a"] and dropped == {"b": 3, "c": 1} and int(tk.sum()) == 4 and vk.tolist()[1]
    for m in (0, 1):  # every class with a train object
        tk, vk, kept, dropped = keep_frequent(train, val, cats, m)
        assert kept == ["a", "b", "c"] and dropped == {} and tk.all()
        assert vk.tolist() == [True, True, False, True, True]


def test_too_few_classes_is_one_line(coloured, tmp_path, capsys):
    root, train, val = coloured
    images = root / "images"
    with pytest.raises(UserError) as info:
        knn_eval(
            "none",
            train,
            images,
            val,
            images,
            tmp_path / "o",
            KnnOptions(**R18, objects="crop", features=("c5",), baselines=False, min_instances=1000),
        )
    message = str(info.value)
    assert "\n" not in message and "1000" in message and "train.json" in message
    args = ["--weights", "none", *_data_args(train, val, images, tmp_path / "cli")]
    status, _, err = call(
        [
            "knn",
            *args,
            "--objects",
            "crop",
            "--features",
            "c5",
            "--min-instances",
            "1000",
            "--set",
            "backbone=resnet18",
        ],
        capsys,
    )
    assert status == 2 and err.count("\n") == 1 and "--min-instances" in err, err


# ---------------------------------------------------------------- 4. metrics by hand


def test_class_metrics_balanced_differs_from_top1():
    cats = ["person", "car", "dog"]
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    # person always right, car once out of two, dog never: top-1 7/10, balanced (100 + 50 + 0) / 3
    pred = [0, 0, 0, 0, 0, 0, 1, 0, 0, 1]
    scores = torch.full((10, 3), 0.1)
    scores[torch.arange(10), torch.tensor(pred)] = 0.8
    m = class_metrics(scores, labels, cats)
    assert m["top1"] == 70.0 and m["top5"] == 100.0
    assert m["balanced"] == pytest.approx(50.0) == pytest.approx(balanced_accuracy(pred, labels))
    assert m["per_class"] == {
        "person": {"count": 6, "top1": 100.0},
        "car": {"count": 2, "top1": 50.0},
        "dog": {"count": 2, "top1": 0.0},
    }
    assert list(m["per_class"]) == ["person", "car", "dog"]  # most frequent first
    # person-vs-rest AUROC of the person share (0.8 where person is predicted, else 0.1): every person
    # 0.8; the non-persons (predicted car, person, person, car) 0.1, 0.8, 0.8, 0.1 -> of the 6 x 4
    # pairs 12 won, 12 tied: (12 + 0.5 x 12) / 24
    assert m["person_auroc"] == pytest.approx(100.0 * (12 + 6) / 24, abs=0.01)
    assert class_metrics(scores, labels, ["a", "b", "c"])["person_auroc"] is None


def test_auroc_with_ties_by_hand():
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.8, 0.1])
    positive = np.array([True, True, False, False, True, False])
    # positives 0.9, 0.8, 0.8 vs negatives 0.8, 0.3, 0.1: 3 + (0.5 + 2) + (0.5 + 2) = 8 of 9 pairs
    assert auroc(scores, positive) == pytest.approx(8 / 9)
    assert auroc(-scores, positive) == pytest.approx(1 / 9)
    assert auroc(np.ones(4), np.array([True, False, True, False])) == pytest.approx(0.5)
    assert auroc(scores, np.ones(6, dtype=bool)) is None and auroc(scores, np.zeros(6, dtype=bool)) is None


def test_majority_by_hand():
    cats = ["a", "b", "c"]
    train = torch.tensor([0, 0, 1, 1, 1, 2])  # b is the most frequent
    assert majority(train, torch.tensor([0, 1, 1, 2]), cats) == {"class": "b", "top1": 50.0, "balanced": 33.33}
    assert majority(train, torch.tensor([1, 1, 1, 0]), cats) == {"class": "b", "top1": 75.0, "balanced": 50.0}
    assert majority(train, torch.tensor([0, 2]), cats) == {"class": "b", "top1": 0.0, "balanced": 0.0}


# ---------------------------------------------------------------- 5. the logistic readout


def gaussian_set(seed: int, per_class: int = 60, dims: int = 8, spread: float = 1.0):
    """Three Gaussian classes with means 4 sd apart along three axes (linearly separable in practice)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(3, dims)
    means[0, 0], means[1, 1], means[2, 2] = 4.0, 4.0, 4.0
    y = torch.arange(3).repeat_interleave(per_class)
    x = means[y] + spread * torch.randn(len(y), dims, generator=g) + 10.0  # offset: standardising matters
    return x, y


def test_logistic_separates_gaussians_and_not_shuffled_labels():
    tx, ty = gaussian_set(0)
    vx, vy = gaussian_set(1)
    probs = logistic_scores(tx, ty, vx, 3, seed=0)
    assert probs.shape == (180, 3) and torch.allclose(probs.sum(1), torch.ones(180, dtype=probs.dtype))
    assert balanced_accuracy(probs.argmax(1).numpy(), vy.numpy()) >= 95.0
    shuffled = ty[torch.randperm(len(ty), generator=torch.Generator().manual_seed(0))]
    chance = balanced_accuracy(logistic_scores(tx, shuffled, vx, 3, seed=0).argmax(1).numpy(), vy.numpy())
    assert chance <= 60.0, chance
    # the same seed gives the same probabilities
    assert torch.equal(probs, logistic_scores(tx, ty, vx, 3, seed=0))


def test_logistic_leaves_absent_classes_at_zero():
    tx, ty = gaussian_set(0, per_class=20)
    keep = ty != 1  # class 1 never seen in train
    probs = logistic_scores(tx[keep], ty[keep], tx, 4, seed=0)
    assert (probs[:, 1] == 0).all() and (probs[:, 3] == 0).all()
    assert torch.allclose(probs.sum(1), torch.ones(len(tx), dtype=probs.dtype))
    one = logistic_scores(tx[ty == 2], ty[ty == 2], tx[:5], 3)  # one class: it is every answer
    assert one[:, 2].tolist() == [1.0] * 5


# ---------------------------------------------------------------- 6. the whole report


def test_crop_probe_end_to_end(coloured, tmp_path):
    root, train, val = coloured
    images = root / "images"
    report = knn_eval("none", train, images, val, images, tmp_path / "o", KnnOptions(**R18, objects="crop"))
    assert report["objects"] == "crop" and report["primary_feature"] == "c5"
    assert set(report["features"]) == {"c5", "head"}
    assert report["features"]["c5"]["dims"] == 512  # ResNet-18's C5 channels
    assert report["features"]["head"]["dims"] == ModelConfig().head_dim  # the box head's output
    # colour decides the class: a random ResNet-18 reads it
    assert report["logistic_balanced"] >= 90.0, report
    assert report["mean_class_top1"] >= 90.0, report
    # the floors
    assert report["baselines"]["shuffled"]["logistic"]["balanced"] <= 60.0, report["baselines"]
    assert report["baselines"]["shuffled"]["knn"]["balanced"] <= 60.0, report["baselines"]
    hand = report["baselines"]["handmade"]
    assert set(hand) == {"knn", "logistic"} and 0.0 <= hand["logistic"]["balanced"] <= 100.0
    # counts from the JSONs
    train_boxes, val_boxes = json_boxes(train), json_boxes(val)
    assert report["num_train_objects"] == len(train_boxes) and report["num_val_objects"] == len(val_boxes)
    clipped = sum(expected_square(b[:4], b[4], b[5], 1.2)[1] for b in train_boxes + val_boxes)
    assert report["crops_clipped"] == clipped
    assert report["classes"] == {"kept": ["red", "green", "blue"], "dropped": {}}
    majority_id, majority_n = Counter(b[6] for b in train_boxes).most_common(1)[0]
    names = {1: "red", 2: "green", 3: "blue"}
    assert report["majority_class"] == names[majority_id]
    val_share = 100.0 * sum(b[6] == majority_id for b in val_boxes) / len(val_boxes)
    assert report["majority_top1"] == pytest.approx(val_share, abs=0.01)
    written = json.loads((tmp_path / "o" / "knn.json").read_text())
    assert written["crops_clipped"] == clipped and written["logistic_balanced"] == report["logistic_balanced"]


def test_crop_probe_class_filter_counts(coloured, tmp_path):
    root, train, val = coloured
    images = root / "images"
    train_counts = Counter(b[6] for b in json_boxes(train))
    val_counts = Counter(b[6] for b in json_boxes(val))
    names = {1: "red", 2: "green", 3: "blue"}
    rarest = min(train_counts, key=train_counts.get)
    m = train_counts[rarest] + 1
    dropped = {c for c, n in train_counts.items() if n < m}
    assert len(dropped) == 1  # the set is built so that one class is the rarest
    report = knn_eval(
        "none",
        train,
        images,
        val,
        images,
        tmp_path / "o",
        KnnOptions(**R18, objects="crop", features=("c5",), baselines=False, min_instances=m),
    )
    assert report["classes"]["kept"] == [names[c] for c in (1, 2, 3) if c not in dropped]
    assert report["classes"]["dropped"] == {names[rarest]: train_counts[rarest]}
    assert report["skipped"]["dropped_classes"] == {
        "train_objects": train_counts[rarest],
        "val_objects": val_counts[rarest],
    }
    assert report["num_train_objects"] == sum(train_counts.values()) - train_counts[rarest]
    assert report["num_val_objects"] == sum(val_counts.values()) - val_counts[rarest]
    assert set(report["features"]) == {"c5"} and report["baselines"] == {}


# ---------------------------------------------------------------- 7. bad input, one line each


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--objects", "bogus"], ["--objects", "roi", "crop", "bogus"]),
        (["--objects", "crop", "--features", "c5,c6"], ["--features", "c5", "c4", "head"]),
        (["--objects", "roi", "--features", "c5"], ["--objects roi", "head", "--objects crop"]),
    ],
)
def test_bad_probe_options_are_one_line(coloured, tmp_path, capsys, extra, expected):
    root, train, val = coloured
    args = ["--weights", "none", *_data_args(train, val, root / "images", tmp_path / "o")]
    status, _, err = call(["knn", *args, *extra, "--set", "backbone=resnet18"], capsys)
    assert status == 2 and err.count("\n") == 1, err
    for word in expected:
        assert word in err, err
    assert not (tmp_path / "o" / "knn.json").exists()


def test_val_categories_that_name_other_classes_are_refused(coloured, tmp_path, capsys):
    root, train, val = coloured
    data = json.loads(val.read_text())
    data["categories"] = [{"id": 1, "name": "green"}, {"id": 2, "name": "red"}, {"id": 3, "name": "blue"}]
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(data))
    args = ["--weights", "none", *_data_args(train, swapped, root / "images", tmp_path / "o")]
    status, _, err = call(["knn", *args, "--objects", "crop", "--set", "backbone=resnet18"], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert "swapped.json" in err and "category id 1" in err and "'green'" in err and "'red'" in err, err


def test_backbone_that_contradicts_the_weights_is_refused(coloured, tmp_path, capsys):
    import torchvision

    root, train, val = coloured
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    args = ["--weights", str(weights), *_data_args(train, val, root / "images", tmp_path / "o")]
    status, _, err = call(["knn", *args, "--objects", "crop", "--set", "backbone=resnet34"], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert "r18.pth" in err and "resnet18" in err and "resnet34" in err, err


# ---------------------------------------------------------------- 8. the monitor


def test_monitor_with_crops_reports_the_probe(coloured):
    """The monitor's crop probe on a model built from the config (no pretraining step needed)."""
    from soco_pretrain.config import apply_overrides
    from soco_pretrain.evaluate.knn import ObjectMonitor
    from soco_pretrain.model import SoCoModel
    from soco_pretrain.presets import load_preset

    root, train, _ = coloured
    cfg = apply_overrides(
        load_preset("tiny"),
        SMALL
        + [
            f"monitor.json={train}",
            f"monitor.images={root / 'images'}",
            "monitor.min_box=8",
            "monitor.objects=crop",
            "monitor.batch=16",
        ],
    )
    torch.manual_seed(0)
    model = SoCoModel(cfg)
    monitor = ObjectMonitor(cfg, torch.device("cpu"))
    state = torch.get_rng_state()
    result = monitor(model)
    assert torch.equal(state, torch.get_rng_state())  # the training RNG did not move
    assert set(result) >= {"probe_balanced", "probe_target_balanced", "knn_top1", "erank_online"}
    assert 0.0 <= result["probe_balanced"] <= 100.0
    assert result["probe_balanced"] == result["probe_target_balanced"]  # the target starts as a copy
    assert result["probe_balanced"] >= 80.0, result  # colour is still the class
    assert monitor(model) == result  # crops cached, same figures
