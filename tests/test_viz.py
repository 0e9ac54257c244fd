"""Pictures: boxes drawn where they belong, show_proposals' files and statistics, the demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
from PIL import Image

from soco_pretrain import viz
from soco_pretrain.viz import distinct_colours, draw_proposals, proposal_stats, show_proposals

GREY = (128, 128, 128)


def grey_image(height=60, width=80):
    return np.full((height, width, 3), GREY[0], dtype=np.uint8)


def test_draw_proposals_colours_the_box_edges_only():
    box = [10, 10, 50, 40]  # x1, y1, x2, y2 with x2/y2 inclusive
    picture = np.asarray(draw_proposals(grey_image(), np.array([box]), max_boxes=5, seed=0, line_width=1))
    colour = distinct_colours(1)[0]
    for x, y in [(10, 25), (50, 25), (30, 10), (30, 40), (10, 10), (50, 40)]:  # on the four edges
        assert tuple(picture[y, x]) == colour, (x, y)
    for x, y in [(30, 25), (11, 25), (49, 25), (9, 25), (51, 25), (30, 41), (0, 0)]:  # inside / outside
        assert tuple(picture[y, x]) == GREY, (x, y)


def test_draw_proposals_draws_a_random_subset_in_distinct_colours():
    rng = np.random.default_rng(1)
    x1 = rng.integers(0, 70, 30)
    y1 = rng.integers(0, 50, 30)
    boxes = np.stack([x1, y1, x1 + 9, y1 + 9], axis=1)
    picture = np.asarray(draw_proposals(grey_image(), boxes, max_boxes=6, seed=3))
    seen = {tuple(c) for c in picture.reshape(-1, 3).tolist()} - {GREY}
    palette = set(distinct_colours(6))
    assert len(palette) == 6
    assert seen <= palette and len(seen) >= 4  # later boxes may hide an earlier one
    again = np.asarray(draw_proposals(grey_image(), boxes, max_boxes=6, seed=3))
    np.testing.assert_array_equal(picture, again)  # same seed, same picture


def test_draw_proposals_accepts_grey_images_and_no_boxes():
    picture = draw_proposals(np.zeros((20, 30), np.uint8), np.zeros((0, 4), np.int16))
    assert picture.mode == "RGB" and picture.size == (30, 20)
    assert not np.asarray(picture).any()


def test_draw_proposals_does_not_touch_the_input():
    image = grey_image()
    draw_proposals(image, np.array([[0, 0, 20, 20]]))
    assert (image == GREY[0]).all()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A store made by generate() from three small photos."""
    from soco_pretrain.proposals import generate, load

    root = tmp_path_factory.mktemp("viz")
    images = root / "images"
    images.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        im = Image.fromarray(getattr(skimage.data, name)())
        im.thumbnail((100, 100))
        im.save(images / f"{name}.png")
    (images / "junk.jpg").write_bytes(b"junk")  # a failed image in the store
    generate(images, root / "store", workers=1, progress=False)
    return images, load(root / "store")


def test_show_proposals_writes_pictures_sheet_and_stats(made, tmp_path):
    images, store = made
    written = show_proposals(store, images, tmp_path / "out", num=8, per_image=4)
    names = sorted(p.name for p in written)
    assert len([n for n in names if n.startswith("proposals_")]) == 3  # the failed image is not drawn
    assert {"contact_sheet.png", "stats.png", "stats.json"} <= set(names)
    for path in written:
        assert path.is_file() and path.stat().st_size > 0
    with Image.open(tmp_path / "out" / "stats.png") as im:
        assert im.size[0] > 500

    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    ok = [i for i in range(len(store)) if store.rule(i) != "failed"]
    counts = [len(store.boxes(i)) for i in ok]
    assert stats["images"] == 4 and stats["failed"] == 1
    assert stats["boxes"] == sum(counts)
    assert stats["proposals_per_image"]["max"] == max(counts)
    all_boxes = np.concatenate([store.boxes(i) for i in ok]).astype(float)
    sizes = np.sqrt((all_boxes[:, 2] - all_boxes[:, 0]) * (all_boxes[:, 3] - all_boxes[:, 1]))
    assert stats["proposal_size_px"]["mean"] == pytest.approx(sizes.mean())
    assert stats["proposal_size_px"]["max"] == int(sizes.max())


def test_show_proposals_accepts_a_store_directory(made, tmp_path):
    images, store = made
    written = show_proposals(store.directory, images, tmp_path / "out", num=1)
    assert len([p for p in written if p.name.startswith("proposals_")]) == 1


def test_show_proposals_skips_and_reports_missing_images(made, tmp_path, capsys):
    _, store = made
    elsewhere = tmp_path / "images"
    elsewhere.mkdir()
    Image.open(made[0] / "coffee.png").save(elsewhere / "coffee.png")
    written = show_proposals(store, elsewhere, tmp_path / "out", num=8)
    out = capsys.readouterr().out
    assert "astronaut.png" in out and "chelsea.png" in out
    drawn = [p.name for p in written if p.name.startswith("proposals_")]
    assert len(drawn) == 1 and drawn[0].endswith("_coffee.png")
    assert (tmp_path / "out" / "stats.json").is_file()


def test_proposal_stats_is_the_same_in_small_chunks(made, monkeypatch):
    _, store = made
    whole = proposal_stats(store)
    monkeypatch.setattr(viz, "CHUNK_ROWS", 3)
    chunked = proposal_stats(store)
    np.testing.assert_array_equal(whole["_size_hist"], chunked["_size_hist"])
    assert whole["proposal_size_px"] == pytest.approx(chunked["proposal_size_px"])


@pytest.mark.usefixtures("one_thread")  # it pretrains and fine-tunes
def test_demo_runs_on_small_photos(tmp_path, capsys):
    from soco_pretrain.demo import PHOTOS, run_demo
    from soco_pretrain.proposals import load
    from soco_pretrain.transfer.coco_eval import METRIC_NAMES

    paths = run_demo(tmp_path / "demo", workers=1, max_side=80, pretrain_steps=2, finetune_iters=1)
    out = capsys.readouterr().out
    assert len(list(paths["images"].glob("*.png"))) == len(PHOTOS) == 7
    assert len(load(paths["proposals"])) == 7
    assert len(list(paths["pictures"].glob("proposals_*.png"))) == 7
    assert (paths["pictures"] / "contact_sheet.png").is_file()
    assert str(paths["pictures"]) in out
    assert len(list(paths["views"].glob("views_*.png"))) == 3  # step 4: the training views
    assert (paths["run"] / "checkpoints" / "last.pt").is_file()  # step 5: tiny pretraining
    assert (paths["run"] / "metrics.jsonl").is_file()
    assert paths["export"].is_file() and "loaded" in out  # step 7: export + key report
    metrics = json.loads((paths["finetune"] / "metrics.json").read_text())  # step 8: fine-tune + COCO AP
    assert {"bbox", "segm"} <= set(metrics)
    for kind in ("bbox", "segm"):
        assert tuple(metrics[kind]) == METRIC_NAMES
        # The painted shapes are ground truth in every image: pycocotools found them (its -1 means
        # "no ground truth"), whatever the (about 0) AP of a 1-iteration model.
        assert metrics[kind]["AP"] >= 0 and metrics[kind]["AP50"] >= 0
    # The summary line reports the numbers of metrics.json, not others.
    assert f"bbox AP {metrics['bbox']['AP']:.1f}  segm AP {metrics['segm']['AP']:.1f}" in out


def test_proposal_pictures_carry_a_title_strip():
    from soco_pretrain.viz import _titled

    picture = Image.new("RGB", (320, 200), (10, 200, 30))
    titled = _titled(picture, "a/b.jpg: 3 of 17 boxes shown")
    strip = titled.height - picture.height
    assert titled.width == 320 and 12 < strip < 60
    pixels = np.asarray(titled)
    assert (pixels[strip:] == np.asarray(picture)).all()  # the picture itself is untouched, below the strip
    top = pixels[:strip]
    assert (top == 0).all(axis=2).any() and (top == 255).all(axis=2).mean() > 0.5  # black text on white
