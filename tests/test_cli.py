"""The ``soco`` command line: help, exit statuses, one-line errors, shard + merge."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from soco_pretrain.cli import main, parse_shard

PHOTOS = ("astronaut", "coffee", "chelsea")


def run_cli(*args, cwd=None):
    """``python -m soco_pretrain ARGS`` in a fresh process (real exit status and output)."""
    return subprocess.run(
        [sys.executable, "-m", "soco_pretrain", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )


def make_images(folder, names=PHOTOS, side=100):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        im = Image.fromarray(getattr(skimage.data, name)())
        im.thumbnail((side, side))
        im.save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("cli") / "images")


@pytest.fixture(scope="module")
def store(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-store") / "store"
    assert main(["proposals", str(images), "-o", str(out), "--workers", "1", "--no-progress"]) == 0
    return out


def call(argv, capsys):
    """main(argv) in-process -> (exit status, stdout, stderr); argparse exits become statuses."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["", "proposals", "proposals merge", "show", "show proposals", "demo", "knn",
                                     "compare"])
def test_help_of_every_command_has_an_example(command, capsys):
    status, out, _ = call([*command.split(), "--help"], capsys)
    assert status == 0
    assert "examples:" in out
    assert f"soco {command}".strip() in out.split("examples:")[1]


def test_help_runs_as_a_module_without_heavy_imports():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "proposals" in result.stdout and "demo" in result.stdout
    # --help must stay fast: the parser alone imports none of the heavy libraries.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys, soco_pretrain.cli as c; c.build_parser(); "
         "print(sorted(m for m in ('numpy', 'numba', 'torch', 'matplotlib', 'skimage') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "[]"


def test_no_command_prints_help_and_exits_2(capsys):
    status, _, err = call([], capsys)
    assert status == 2
    assert "usage: soco" in err


# ---------------------------------------------------------------- shard strings


@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 1/2", (1, 2))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("bad", ["4/4", "-1/2", "1/0", "x", "1", "1/2/3", "a/b", ""])
def test_bad_shard_is_a_one_line_error(bad, images, tmp_path, capsys):
    status, _, err = call(["proposals", str(images), "-o", str(tmp_path / "s"), "--shard", bad], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soco: error:") and "shard" in lines[0]
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- proposals


def test_proposals_writes_a_loadable_store(store, images):
    from soco_pretrain.proposals import load

    loaded = load(store)
    assert sorted(loaded.paths) == sorted(f"{n}.png" for n in PHOTOS)
    assert all(loaded.rule(i) != "failed" for i in range(len(loaded)))


def test_bad_image_exits_1_and_names_the_file(tmp_path):
    folder = make_images(tmp_path / "images", names=("chelsea",))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = run_cli("proposals", folder, "-o", tmp_path / "store", "--workers", "1", "--no-progress")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "broken.jpg" in result.stdout
    assert "Traceback" not in result.stderr
    assert (tmp_path / "store" / "manifest.json").is_file()  # the good image is still stored


def test_missing_folder_exits_2_with_one_line(tmp_path):
    result = run_cli("proposals", tmp_path / "nowhere", "-o", tmp_path / "store")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soco: error:") and "nowhere" in lines[0]


@pytest.mark.parametrize("argv, words", [
    (["--preset", "nope"], ["unknown preset", "paper"]),
    (["--workers", "0"], ["--workers"]),
    (["--scale", "-3"], ["--scale"]),
])
def test_bad_options_are_one_line_errors(argv, words, images, tmp_path, capsys):
    status, _, err = call(["proposals", str(images), "-o", str(tmp_path / "s"), *argv], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soco: error:")
    assert all(w in lines[0] for w in words)


def test_output_used_by_something_else_is_a_one_line_error(images, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    status, _, err = call(["proposals", str(images), "-o", str(tmp_path / "taken")], capsys)
    assert status == 2
    assert err.startswith("soco: error:") and len(err.strip().splitlines()) == 1


def test_shards_merged_through_the_cli_equal_one_run(store, images, tmp_path, capsys):
    from soco_pretrain.proposals import load

    shards = []
    for i in range(2):
        shards.append(tmp_path / f"shard{i}")
        status, _, err = call(["proposals", str(images), "-o", str(shards[-1]), "--shard", f"{i}/2",
                               "--workers", "1", "--no-progress"], capsys)
        assert status == 0, err
    status, out, err = call(["proposals", "merge", *map(str, shards), "-o", str(tmp_path / "merged")], capsys)
    assert status == 0, err
    assert "merged" in out
    whole, merged = load(store).arrays(), load(tmp_path / "merged").arrays()
    assert whole.keys() == merged.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], merged[name], err_msg=name)
    assert load(tmp_path / "merged").paths == load(store).paths


def test_merge_of_a_missing_or_non_store_is_a_one_line_error(store, tmp_path, capsys):
    status, _, err = call(["proposals", "merge", str(store), str(tmp_path / "nope"), "-o", str(tmp_path / "m")],
                          capsys)
    assert status == 2 and err.startswith("soco: error:") and "nope" in err
    (tmp_path / "empty").mkdir()
    status, _, err = call(["proposals", "merge", str(store), str(tmp_path / "empty"), "-o", str(tmp_path / "m")],
                          capsys)
    assert status == 2 and err.startswith("soco: error:") and "empty" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- show proposals


def test_show_proposals_through_the_cli(store, images, tmp_path, capsys):
    out_dir = tmp_path / "pictures"
    status, out, err = call(["show", "proposals", str(store), "--images", str(images), "-o", str(out_dir),
                             "--num", "2", "--per-image", "3"], capsys)
    assert status == 0, err
    assert len(list(out_dir.glob("proposals_*.png"))) == 2
    for name in ("contact_sheet.png", "stats.png", "stats.json"):
        assert (out_dir / name).is_file()
        assert name in out


def test_show_proposals_of_a_missing_store_exits_2(images, tmp_path):
    result = run_cli("show", "proposals", tmp_path / "nostore", "--images", images, "-o", tmp_path / "p")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("soco: error:") and "nostore" in result.stderr


def test_show_proposals_of_a_non_store_folder_exits_2(images, tmp_path, capsys):
    status, _, err = call(["show", "proposals", str(images), "--images", str(images), "-o", str(tmp_path / "p")],
                          capsys)
    assert status == 2
    assert err.startswith("soco: error:") and "manifest" in err


# ---------------------------------------------------------------- show views


@pytest.fixture(scope="module")
def views_data(tmp_path_factory):
    """(images folder, store): four photos and a store written directly (known boxes)."""
    from data_fixtures import make_photos, make_store

    root = tmp_path_factory.mktemp("views")
    images = root / "images"
    paths = make_photos(images, ("astronaut", "coffee", "chelsea", "rocket"), side=150)
    return images, make_store(root / "store", images, paths)


def test_show_views_help_has_an_example(capsys):
    status, out, _ = call(["show", "views", "--help"], capsys)
    assert status == 0 and "soco show views" in out.split("examples:")[1]


@pytest.mark.parametrize("extra, panels", [([], 4), (["--set", "views.soco_star=true", "--augment"], 5)])
def test_show_views_writes_one_picture_per_image(views_data, tmp_path, capsys, extra, panels):
    images, store = views_data
    out_dir = tmp_path / "pictures"
    status, out, err = call(["show", "views", "--images", str(images), "--proposals", str(store),
                             "-o", str(out_dir), "--num", "2", "--seed", "1", *extra], capsys)
    assert status == 0, err
    written = sorted(out_dir.glob("views_*.png"))
    assert len(written) == 2 and all(p.name in out for p in written)
    with Image.open(written[0]) as im:
        picture = np.asarray(im.convert("RGB"))
    # Panels (image, V1, V2, V3[, V4]) on white, each separated by a white gap column.
    content = (picture < 250).any(axis=(0, 2))
    starts = np.flatnonzero(content[1:] & ~content[:-1])
    assert len(starts) == panels
    assert picture.shape[0] >= 2 * 224  # views drawn enlarged 2x


def test_show_views_from_a_coco_json(views_data, tmp_path, capsys):
    images, store = views_data
    ann = tmp_path / "instances.json"
    ann.write_text('{"images": [{"id": 1, "file_name": "coffee.png"}]}')
    status, out, err = call(["show", "views", "--images", str(ann), "--image-root", str(images),
                             "--proposals", str(store), "-o", str(tmp_path / "p")], capsys)
    assert status == 0, err
    assert [p.name for p in (tmp_path / "p").glob("*.png")] == ["views_00_coffee.png"]


def test_show_views_errors_are_one_line(views_data, tmp_path, capsys):
    images, store = views_data
    out = str(tmp_path / "p")
    (images.parent / "more").mkdir(exist_ok=True)
    extra = images.parent / "more"
    Image.new("RGB", (40, 30)).save(extra / "new.png")
    cases = [
        (["--images", str(extra), "--proposals", str(store)], "1 of 1 images have no proposals"),
        (["--images", str(images), "--proposals", str(store), "--set", "views.nope=1"], "views.nope"),
        (["--images", str(images), "--proposals", str(tmp_path / "nostore")], "nostore"),
        (["--images", str(images), "--proposals", str(store), "--set", "views.pad=zeros"], "views.pad"),
    ]
    for args, expected in cases:
        status, _, err = call(["show", "views", *args, "-o", out], capsys)
        assert status == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("soco: error:") and expected in lines[0], err
