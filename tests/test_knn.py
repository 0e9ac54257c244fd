"""Object-level kNN (evaluate/knn.py): votes, effective rank, a separable set vs shuffled labels,
bad input, the leak guard, and the monitor inside soco pretrain."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import call

from soco_pretrain.evaluate.knn import (
    KnnOptions,
    effective_rank,
    knn_eval,
    knn_metrics,
    knn_scores,
    load_objects,
    resolve_geometry,
    split_by_image,
)

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {1: (220, 30, 30), 2: (30, 200, 40), 3: (40, 60, 230)}  # category id -> square colour


def make_coloured_set(root: Path, name: str, num_images: int, seed: int, shuffle: bool = False) -> Path:
    """64x64 grey-noise images with two squares each; the category is the square's colour.

    ``shuffle``: the same boxes with labels permuted at random (the colour no longer predicts them).
    """
    rng = np.random.default_rng(seed)
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        pixels = rng.integers(90, 160, (64, 64, 3)).astype(np.uint8)
        for corner in ((4, 6), (34, 30)):
            cat = int(rng.integers(1, 4))
            x, y = corner
            side = int(rng.integers(20, 27))
            pixels[y : y + side, x : x + side] = COLOURS[cat]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": cat,
                    "iscrowd": 0,
                    "bbox": [x, y, side, side],
                    "area": side * side,
                }
            )
        file_name = f"{name}_{i}.png"
        Image.fromarray(pixels).save(folder / file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": 64, "height": 64})
    if shuffle:
        labels = [a["category_id"] for a in anns]
        rng.shuffle(labels)
        for a, label in zip(anns, labels):
            a["category_id"] = label
    path = root / f"{name}.json"
    cats = [{"id": c, "name": n} for c, n in ((1, "red"), (2, "green"), (3, "blue"))]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


OPTS = dict(size=64, min_box=8, batch=8, workers=0, progress=False)
# Random init on a ResNet-18 without the floors where a test reads neither: the protocol does not
# depend on the depth, and it is 4x cheaper.
R18 = dict(OPTS, backbone="resnet18", baselines=False)


@pytest.fixture(scope="module")
def coloured(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn")
    train = make_coloured_set(root, "train", 16, seed=1)
    val = make_coloured_set(root, "val", 12, seed=2)
    shuffled = make_coloured_set(root, "shuffled", 16, seed=1, shuffle=True)
    return root, train, val, shuffled


# ---------------------------------------------------------------- the pieces, on known inputs


def test_weighted_votes_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    val = torch.tensor([[2.0, 0.0]])  # cosines 1, 0, 1/sqrt(2)
    scores = knn_scores(train, labels, val, num_classes=2, k=2, temperature=0.5)
    # k=2 neighbours: train 0 (cos 1, class 0) and train 2 (cos 0.7071, class 1); votes
    # exp(cos / T) divided by the nearest one's exp(1 / T)
    assert scores[0, 0].item() == pytest.approx(1.0)
    assert scores[0, 1].item() == pytest.approx(math.exp((0.70710678 - 1) / 0.5))
    # the same file is never its own neighbour: excluding train 0 leaves classes 1 and 1
    scores = knn_scores(
        train, labels, val, 2, k=2, temperature=0.5, train_keys=torch.tensor([7, 8, 9]), val_keys=torch.tensor([7])
    )
    assert scores[0, 0].item() == 0.0
    assert scores[0, 1].item() == pytest.approx(1.0 + math.exp((0.0 - 0.70710678) / 0.5))


def test_tiny_temperature_still_ranks_by_the_nearest_neighbour():
    # exp(cos / 0.005) overflows float32 (exp(200)): the votes used to be inf / nan and every
    # query scored wrong. The nearest neighbour (class 1, cos 0.99) must win over two class-0
    # neighbours at cos 0.98.
    train = torch.tensor(
        [[0.99, math.sqrt(1 - 0.99**2)], [0.98, math.sqrt(1 - 0.98**2)], [0.98, -math.sqrt(1 - 0.98**2)]]
    )
    labels = torch.tensor([1, 0, 0])
    val = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    scores = knn_scores(train, labels, val, num_classes=2, k=3, temperature=0.005)
    assert torch.isfinite(scores).all()
    assert scores.argmax(1).tolist() == [1, 1]
    assert scores[0, 0].item() == pytest.approx(2 * math.exp((0.98 - 0.99) / 0.005), rel=1e-3)


def test_metrics_top5_and_mean_per_class():
    scores = torch.tensor(
        [
            [5.0, 1, 0.5, 0.4, 0.3, 0.2],  # label 0: rank 1
            [0.1, 0.2, 9, 1, 0.5, 0.4],  # label 0: rank 6 (last)
            [1, 3, 2, 0.5, 0.4, 0.3],  # label 2: rank 2
            [0.6, 0.5, 0.4, 0.3, 0.2, 9],
        ]
    )  # label 0: rank 2
    labels = torch.tensor([0, 0, 2, 0])
    result = knn_metrics(scores, labels, torch.tensor([0, 0, 0, 2]), ["a", "b", "c", "d", "e", "f"])
    assert result["top1"] == 25.0
    assert result["top5"] == 75.0
    assert result["per_class"] == {"a": {"count": 3, "top1": 33.33}, "c": {"count": 1, "top1": 0.0}}
    assert result["mean_class_top1"] == pytest.approx((33.33 + 0.0) / 2, abs=0.01)
    assert result["majority_class"] == "a" and result["majority_top1"] == 75.0


def test_effective_rank_of_collapsed_and_spread_features():
    assert effective_rank(torch.ones(50, 8) * torch.arange(1, 51)[:, None]) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.eye(16)) == pytest.approx(16.0, rel=1e-6)
    two = torch.zeros(10, 4)
    two[:5, 0], two[5:, 1] = 1.0, 1.0  # two equal singular values
    assert effective_rank(two) == pytest.approx(2.0, rel=1e-6)


def test_geometry_follows_the_run_then_scales_the_paper_bounds():
    run = {"data": {"views": {"v1_size": 96, "level_bounds": [21, 41, 82]}}}
    assert resolve_geometry(None, None, run) == (96, (21.0, 41.0, 82.0))
    assert resolve_geometry(None, None, None) == (224, (48.0, 96.0, 192.0))
    assert resolve_geometry(112, None, run) == (112, (24.0, 48.0, 96.0))  # paper bounds x 112/224


# ---------------------------------------------------------------- the protocol on data


def test_separable_labels_score_high_and_shuffled_labels_do_not(coloured, tmp_path):
    root, train, val, shuffled = coloured
    images = root / "images"
    good = knn_eval("none", train, images, val, images, tmp_path / "good", KnnOptions(**R18))
    bad = knn_eval("none", shuffled, images, val, images, tmp_path / "bad", KnnOptions(**R18))
    assert good["num_val_objects"] == 24 and good["num_train_objects"] == 32
    assert good["top1"] >= 90.0, good  # colour is what a random ResNet sees best
    assert bad["top1"] <= 60.0, bad  # 3 classes: chance is about 33%
    assert good["top1"] - bad["top1"] >= 40.0
    written = json.loads((tmp_path / "good" / "knn.json").read_text())
    assert written["top1"] == good["top1"] and set(written["per_class"]) <= {"red", "green", "blue"}
    assert 1.0 < written["erank"] <= 24


def test_deterministic_for_a_seed_and_seeded_random_init(coloured, tmp_path):
    root, train, val, _ = coloured
    images = root / "images"
    a = knn_eval("none", train, images, val, images, tmp_path / "a", KnnOptions(**R18, seed=3))
    b = knn_eval("none", train, images, val, images, tmp_path / "b", KnnOptions(**R18, seed=3))
    c = knn_eval("none", train, images, val, images, tmp_path / "c", KnnOptions(**R18, seed=4))
    assert a["erank"] == b["erank"] and a["top1"] == b["top1"]
    assert a["erank"] != c["erank"]  # another random init


def test_crowd_small_and_split(tmp_path):
    path = make_coloured_set(tmp_path, "set", 6, seed=5)
    data = json.loads(path.read_text())
    data["annotations"][0]["iscrowd"] = 1
    data["annotations"][1]["bbox"] = [1, 1, 5, 30]  # 5 px wide
    path.write_text(json.dumps(data))
    objects = load_objects(path, tmp_path / "images", min_box=8)
    assert objects.skipped["crowd"] == 1 and objects.skipped["small"] == 1
    assert objects.num_objects == 10
    train, val = split_by_image(objects, 0.5, seed=0)
    assert len(train) + len(val) == len(objects) == 5
    assert not set(map(str, train.paths)) & set(map(str, val.paths))
    again = split_by_image(objects, 0.5, seed=0)
    assert [str(p) for p in again[1].paths] == [str(p) for p in val.paths]


@pytest.mark.parametrize("objects", ["roi", "crop"])
def test_unreadable_images_are_listed_and_not_counted(tmp_path, objects):
    """knn.json's totals are of what was embedded: an unreadable train or val image adds neither
    its objects nor itself to them, and is listed under skipped.unreadable."""
    train = make_coloured_set(tmp_path, "train", 8, seed=1)
    val = make_coloured_set(tmp_path, "val", 6, seed=2)
    images = tmp_path / "images"
    for broken in ("train_3.png", "val_1.png"):
        (images / broken).write_bytes(b"not a png")
    report = knn_eval("none", train, images, val, images, tmp_path / "o", KnnOptions(**R18, objects=objects))
    assert sorted(Path(p).name for p in report["skipped"]["unreadable"]) == ["train_3.png", "val_1.png"]
    assert report["num_train_images"] == 7 and report["num_val_images"] == 5
    assert report["num_train_objects"] == 14 and report["num_val_objects"] == 10  # two objects an image
    assert sum(c["count"] for c in report["per_class"].values()) == 10
    assert json.loads((tmp_path / "o" / "knn.json").read_text())["num_val_images"] == 5


def test_no_progress_still_prints_the_one_line_result(coloured, tmp_path, capsys):
    root, train, val, _ = coloured
    status, out, err = _cli(["--weights", "none", *_data_args(train, val, root / "images", tmp_path / "o")], capsys)
    assert status == 0, err
    assert out.count("\n") == 1, out  # --no-progress: no bars and no header, but the result
    assert out.startswith("roi probe, head features: balanced accuracy") and f"-> {tmp_path / 'o' / 'knn.json'}" in out


# ---------------------------------------------------------------- bad input: one line, names the file


def _cli(args, capsys):
    return call(["knn", *args], capsys)


def _data_args(train, val, images, out):
    return [
        "--train-json",
        str(train),
        "--train-images",
        str(images),
        "--val-json",
        str(val),
        "--val-images",
        str(images),
        "--out",
        str(out),
        "--size",
        "64",
        "--min-box",
        "8",
        "--workers",
        "0",
        "--no-progress",
    ]


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("no_annotations", "has no annotations"),
        ("outside", "lies outside its image"),
        ("unknown_category", "category id 99"),
    ],
)
def test_bad_json_is_one_line(coloured, tmp_path, capsys, problem, expected):
    root, train, val, _ = coloured
    data = json.loads(val.read_text())
    if problem == "no_annotations":
        data.pop("annotations")
    elif problem == "outside":
        data["annotations"][3]["bbox"] = [500, 500, 20, 20]
    else:
        data["categories"].append({"id": 99, "name": "other"})
        data["annotations"][2]["category_id"] = 99
    bad = tmp_path / "bad_val.json"
    bad.write_text(json.dumps(data))
    status, _, err = _cli(["--weights", "none", *_data_args(train, bad, root / "images", tmp_path / "o")], capsys)
    assert status == 2
    assert err.count("\n") == 1 and expected in err and "bad_val.json" in err, err
    assert not (tmp_path / "o").exists()  # a refused command leaves no folder behind


def test_weights_that_are_not_weights(coloured, tmp_path, capsys):
    root, train, val, _ = coloured
    text = tmp_path / "notes.pth"
    text.write_text("not a state dict")
    status, _, err = _cli(["--weights", str(text), *_data_args(train, val, root / "images", tmp_path / "o")], capsys)
    assert status == 2 and err.count("\n") == 1 and "notes.pth" in err, err
    empty_run = tmp_path / "run"
    (empty_run / "checkpoints").mkdir(parents=True)
    status, _, err = _cli(
        ["--weights", str(empty_run), *_data_args(train, val, root / "images", tmp_path / "o")], capsys
    )
    assert status == 2 and err.count("\n") == 1 and "run" in err and "checkpoint" in err, err
    status, _, err = _cli(
        ["--weights", str(tmp_path / "missing.pth"), *_data_args(train, val, root / "images", tmp_path / "o")], capsys
    )
    assert status == 2 and "missing.pth" in err
    assert not (tmp_path / "o").exists()


def test_torchvision_resnet_state_dict_is_evaluated_as_c4(coloured, tmp_path):
    import torchvision

    root, train, val, _ = coloured
    torch.manual_seed(0)
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    options = KnnOptions(**OPTS, baselines=False)
    result = knn_eval(path, train, root / "images", val, root / "images", tmp_path / "o", options)
    assert result["arch"] == "c4" and result["dims"] == 2048
    assert result["loaded"]["backbone.body"].split("/")[0] == result["loaded"]["backbone.body"].split("/")[1]


# ---------------------------------------------------------------- leak guard and the monitor in pretraining

SMALL = [
    "data.views.v1_size=64",
    "data.views.v2_size=64",
    "data.views.v3_size=32",
    "data.views.level_bounds=[14, 27, 55]",
    "data.views.num_proposals=2",
    "data.views.proposal_source=whole_image",
    "data.augment.enabled=false",
    "train.workers=0",
    "train.per_device_batch=2",
    "train.batch_size=2",
    "train.log_every=2",
    "train.checkpoint_every=1000",
    "train.epochs=1",
    "model.backbone=resnet18",  # the monitor's plumbing does not depend on the backbone; R18 is cheap
    "model.head_dim=256",
    "model.proj_hidden=512",
]


@pytest.fixture(scope="module")
def monitored_run(coloured, tmp_path_factory):
    """2 pretraining steps on the coloured images with the kNN monitor every step, stopped after
    the first and resumed."""
    from soco_pretrain.config import apply_overrides
    from soco_pretrain.evaluate.monitor import monitor_hook
    from soco_pretrain.presets import load_preset
    from soco_pretrain.train.loop import pretrain

    root, train, val, _ = coloured
    pool = tmp_path_factory.mktemp("pool")
    for name in ("train_0.png", "train_1.png", "train_2.png", "train_3.png"):
        shutil.copy(root / "images" / name, pool / name)
    run = tmp_path_factory.mktemp("monitored") / "run"
    cfg = apply_overrides(
        load_preset("tiny"),
        SMALL + [f"monitor.json={train}", f"monitor.images={root / 'images'}", "monitor.every=1", "monitor.min_box=8"],
    )
    pretrain(cfg, pool, None, run, max_steps=1, progress=False, hooks=[monitor_hook])
    pretrain(cfg, pool, None, run, progress=False, hooks=[monitor_hook])  # resumes at step 1
    return run, pool, cfg


def test_monitor_logs_knn_and_rank_from_step_0_across_a_resume(monitored_run):
    from soco_pretrain.engine.metrics import read_metrics

    run, _, _ = monitored_run
    records = read_metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert 0.0 <= r["knn_top1"] <= 100.0 and r["erank_online"] > 1.0 and r["erank_target"] > 1.0
    assert records[0]["erank_online"] == records[0]["erank_target"]  # the target starts as a copy
    assert "loss" in records[2] and "knn_top1" in records[2]  # one record per step, merged
    # step 1 ran at lr 0 (warm-up starts at 0); by step 2 the online network has moved
    assert records[2]["erank_online"] != records[0]["erank_online"]


def test_monitor_leaves_training_unchanged(monitored_run, tmp_path):
    """The same 2 steps without the monitor give the same weights (no RNG or BN buffer touched)."""
    from soco_pretrain.config import apply_overrides
    from soco_pretrain.engine.checkpoint import load_checkpoint
    from soco_pretrain.presets import load_preset
    from soco_pretrain.train.loop import pretrain

    run, pool, _ = monitored_run
    cfg = apply_overrides(load_preset("tiny"), SMALL)
    pretrain(cfg, pool, None, tmp_path / "plain", max_steps=2, progress=False)
    a = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_monitor_curve_is_drawn(monitored_run, capsys):
    run, _, _ = monitored_run
    status, _, _ = call(["show", "curves", str(run)], capsys)
    assert status == 0 and (run / "curves.png").stat().st_size > 10_000


def test_leak_guard_fires_on_a_renamed_copy(monitored_run, coloured, tmp_path, capsys):
    run, pool, _ = monitored_run
    root, train, val, _ = coloured
    # the val JSON points at a renamed copy of an image the run pretrained on
    images = tmp_path / "val_images"
    shutil.copytree(root / "images", images)
    shutil.copy(pool / "train_2.png", images / "val_5.png")
    status, _, err = _cli(["--weights", str(run), *_data_args(train, val, images, tmp_path / "o")], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert "val_5.png" in err and "train_2.png" in err and "--allow-leak" in err
    status, _, err = _cli(
        ["--weights", str(run), "--allow-leak", *_data_args(train, val, images, tmp_path / "o")], capsys
    )
    assert status == 0, err


def test_random_init_of_seed_s_is_where_pretraining_seed_s_starts():
    """`--weights none --seed s` builds the very encoder `soco pretrain` (train.seed=s) starts from,
    so a paired difference against it is the effect of the pretraining alone."""
    from soco_pretrain.evaluate.knn import build_encoder
    from soco_pretrain.model import SoCoModel
    from soco_pretrain.presets import load_preset

    torch.manual_seed(1)  # what the loop does before building the model (train.seed)
    start = SoCoModel(load_preset("tiny")).encoder.state_dict()
    encoder, info = build_encoder("none", seed=1)
    assert info["description"] == "random init (seed 1, resnet50)"
    assert all(torch.equal(start[k], v) for k, v in encoder.state_dict().items())
    other, _ = build_encoder("none", seed=2)
    assert not torch.equal(other.state_dict()["box_head.5.weight"], start["box_head.5.weight"])


def test_bad_monitor_settings_are_one_line(coloured, tmp_path, capsys):
    root, train, _, _ = coloured
    args = [
        "pretrain",
        "--preset",
        "tiny",
        "--images",
        str(root / "images"),
        "--out",
        str(tmp_path / "run"),
        "--set",
        "data.views.proposal_source=whole_image",
        "--set",
        f"monitor.json={train}",
        "--set",
        f"monitor.images={root / 'images'}",
    ]
    status, _, err = call([*args, "--set", "monitor.every=0"], capsys)
    assert status == 2 and err.count("\n") == 1 and "every=0" in err, err
    status, _, err = call([*args[:-4], "--set", f"monitor.json={tmp_path / 'nope.json'}"], capsys)
    assert status == 2 and err.count("\n") == 1 and "nope.json" in err, err
