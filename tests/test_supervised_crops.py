"""benchmarks/supervised_crops.py, the probe's positive control: a ResNet trained with labels on the
object crops, written as a torchvision state dict that ``soco knn --objects crop`` reads, and seen
by that probe as clearly better than random init; seeded, bad input in one line."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from test_cli import call
from test_knn import COLOURS, make_coloured_set

from soco_pretrain.evaluate.knn import KnnOptions, knn_eval

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "supervised_crops.py"
_spec = importlib.util.spec_from_file_location("supervised_crops", SCRIPT)
assert _spec is not None and _spec.loader is not None
sc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sc)


def train_args(json_path: Path, out: Path, steps: int, size: int = 48, seed: int = 0, lr: float = 0.1) -> list[str]:
    return ["--train-json", str(json_path), "--images", str(json_path.parent / "images"), "--arch", "resnet18",
            "--size", str(size), "--steps", str(steps), "--batch", "8", "--lr", str(lr), "--seed", str(seed),
            "--min-box", "8", "-o", str(out)]  # fmt: skip


def make_dotted_set(root: Path, name: str, num_images: int, seed: int) -> Path:
    """make_coloured_set's boxes and labels, each square repainted a random colour but for a dot of
    its class colour (a third of its side, near the centre). The square's colour, most of the crop,
    is a nuisance a random ResNet's pooled features are full of; the class is a detail a few
    supervised steps learn to look for."""
    path = make_coloured_set(root, name, num_images, seed)
    coco = json.loads(path.read_text())
    rng = np.random.default_rng(seed + 1000)
    for image in coco["images"]:
        file = root / "images" / image["file_name"]
        pixels = np.array(Image.open(file))
        for a in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            x, y, side, _ = a["bbox"]
            pixels[y : y + side, x : x + side] = rng.integers(0, 256, 3)
            dot = side // 3
            at = (side - dot) // 2 + int(rng.integers(-3, 4))
            pixels[y + at : y + at + dot, x + at : x + at + dot] = COLOURS[a["category_id"]]
        Image.fromarray(pixels).save(file)
    return path


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """30 steps of batch 8 at 48 px on the coloured squares: (train JSON, val JSON, file, OUT.json, stdout)."""
    root = tmp_path_factory.mktemp("sup_colour")
    train, val = make_coloured_set(root, "train", 16, seed=1), make_coloured_set(root, "val", 12, seed=2)
    out = root / "sup_r18.pth"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert sc.main(train_args(train, out, steps=30)) == 0
    return train, val, out, json.loads(out.with_suffix(".json").read_text()), printed.getvalue()


def test_writes_a_torchvision_resnet_that_learned_the_colours(colour_run):
    _, _, out, report, printed = colour_run
    state = torch.load(out, weights_only=True)
    assert state["fc.weight"].shape == (3, 512)  # fc included, one row per class
    torchvision.models.resnet18(num_classes=3).load_state_dict(state, strict=True)
    # (b) colour is trivially learnable: chance is a third
    assert report["train_top1_last"] >= 70.0, report
    assert report["steps"] == 30 and report["batch"] == 8 and report["images_seen"] == 240
    assert report["objects"] == 32 and report["classes"] == ["red", "green", "blue"]
    assert report["epochs"] == pytest.approx(7.5)
    assert report["args"]["arch"] == "resnet18" and report["args"]["size"] == 48
    last = printed.strip().splitlines()[-1]
    assert last.startswith("30 steps of batch 8 (240 crops seen") and str(out) in last and "s/step" in last


def test_same_seed_same_file_bit_for_bit(tmp_path):
    train = make_coloured_set(tmp_path, "train", 8, seed=1)
    files = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        files[name] = tmp_path / f"{name}.pth"
        assert sc.main(train_args(train, files[name], steps=4, size=32, seed=seed)) == 0
    a, b, c = (torch.load(files[n], weights_only=True) for n in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])  # another seed, another network


def test_soco_knn_reads_the_file_as_a_resnet(colour_run, tmp_path, capsys):
    """The command line end to end: a plain ResNet-18 file, crop probe, pooled C5 and C4."""
    train, val, out, _, _ = colour_run
    images = str(train.parent / "images")
    status, printed, err = call(["knn", "--weights", str(out), "--train-json", str(train), "--train-images", images,
                                 "--val-json", str(val), "--val-images", images, "-o", str(tmp_path / "knn"),
                                 "--objects", "crop", "--features", "c5,c4", "--size", "48", "--min-box", "8",
                                 "--workers", "0", "--no-progress", "--set", "baselines=false"], capsys)  # fmt: skip
    assert status == 0, err
    report = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert report["features"]["c5"]["dims"] == 512 and report["features"]["c4"]["dims"] == 256
    # the whole ResNet-18 body (torchvision's keys without fc and the BatchNorm step counters)
    from torchvision.models import resnet18

    body = [k for k in resnet18().state_dict() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    assert report["loaded"] == {"backbone.body": f"{len(body)}/{len(body)}"}


def test_the_probe_sees_supervised_features_beat_random_init(tmp_path):
    """The positive control on a set where random init is weak (the class is a small dot, the
    square's random colour a nuisance): 80 steps with labels, then the same crop probe, c5 features,
    against the random init this very training started from (same seed)."""
    train = make_dotted_set(tmp_path, "train", 16, seed=1)
    val = make_dotted_set(tmp_path, "val", 24, seed=2)
    out = tmp_path / "sup.pth"
    assert sc.main(train_args(train, out, steps=80, size=32, lr=1.0)) == 0
    options = dict(objects="crop", features=("c5",), size=32, min_box=8, batch=8, workers=0, progress=False,
                   baselines=False, seed=0)  # fmt: skip
    images = tmp_path / "images"
    trained = knn_eval(out, train, images, val, images, tmp_path / "k_sup", KnnOptions(**options))
    random = knn_eval(
        "none", train, images, val, images, tmp_path / "k_none", KnnOptions(**options, backbone="resnet18")
    )
    assert trained["logistic_balanced"] >= 75.0, trained["logistic_balanced"]
    assert trained["logistic_balanced"] >= random["logistic_balanced"] + 30.0, (trained, random)


@pytest.mark.parametrize("broken", ["json", "images"])
def test_missing_input_is_one_line_and_status_2(tmp_path, capsys, broken):
    train = make_coloured_set(tmp_path, "train", 2, seed=1)
    args = train_args(train, tmp_path / "out.pth", steps=1)
    args[args.index("--train-json" if broken == "json" else "--images") + 1] = str(tmp_path / "missing")
    assert sc.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("supervised_crops.py: error: ") and "missing" in err
    assert not (tmp_path / "out.pth").exists()


def test_bad_options_and_too_few_classes_are_refused(tmp_path, capsys):
    train = make_coloured_set(tmp_path, "train", 2, seed=1)  # 4 objects
    assert sc.main([*train_args(train, tmp_path / "o.pth", steps=0)]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert sc.main([*train_args(train, tmp_path / "o.pth", steps=1), "--min-instances", "50"]) == 2
    assert "a classifier needs two" in capsys.readouterr().err
