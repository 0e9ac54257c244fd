"""images.py: listing folders and list files; decoding every odd input to RGB or ImageError."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BAD_KINDS, small_photo
from PIL import Image
from png_bomb import png_bomb

from soco_pretrain.images import DEFAULT_MAX_PIXELS, ImageError, bounded_size, list_images, load_rgb, load_rgb_bounded


def test_list_folder_recursive_sorted_skips_hidden_and_non_images(photo_dir):
    images = list_images(photo_dir)
    assert images.paths == [
        "camera.png",
        "cls_a/astronaut.png",
        "cls_a/coffee.JPEG",
        "cls_b/chelsea.png",
        "cls_b/rocket.jpg",
    ]
    assert images.ignored == ["README.txt"]
    assert images.root == photo_dir.resolve()
    assert images.abspath(2) == photo_dir.resolve() / "cls_a" / "coffee.JPEG"


def test_list_file_relative_absolute_comments_duplicates(tmp_path, photo_dir):
    (tmp_path / "sub").mkdir()
    lst = tmp_path / "list.txt"
    outside = photo_dir / "camera.png"
    lst.write_text(f"# comment\n\nsub/b.jpg\n  sub/a.png  \nsub/b.jpg\n{outside}\n{tmp_path / 'sub' / 'c.png'}\n")
    images = list_images(lst)
    assert images.root == tmp_path.resolve()
    assert images.paths == sorted(["sub/a.png", "sub/b.jpg", "sub/c.png", outside.as_posix()])
    assert images.abspath(images.paths.index(outside.as_posix())) == outside


def deny_listing(monkeypatch, *names):
    """os.scandir of a folder with one of these names fails as on a chmod 000 folder (tests may
    run as root, which reads any folder)."""
    import os

    real = os.scandir

    def scandir(path="."):
        if isinstance(path, (str, os.PathLike)) and Path(path).name in names:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_subfolder_is_reported_not_silently_omitted(tmp_path, monkeypatch):
    for sub in ("ok", "locked"):
        (tmp_path / sub).mkdir()
        small_photo("camera", 16).save(tmp_path / sub / "x.png")
    deny_listing(monkeypatch, "locked")
    images = list_images(tmp_path)
    assert images.paths == ["ok/x.png"]
    assert images.unreadable == [("locked", "cannot list folder: permission denied")]
    assert list_images(tmp_path / "ok").unreadable == []


def test_missing_source_raises_image_error(tmp_path, photo_dir):
    with pytest.raises(ImageError, match="no such folder"):
        list_images(tmp_path / "nope")
    with pytest.raises(ImageError, match="is an image"):
        list_images(photo_dir / "camera.png")


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_every_odd_input_decodes_to_rgb_or_raises_image_error(bad_inputs, kind):
    root, _ = bad_inputs
    name, expected = BAD_KINDS[kind]
    path = root / name
    if expected is None:
        arr = load_rgb(path)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
        with Image.open(path) as im:
            assert arr.shape[:2] == (im.height, im.width)
    else:
        with pytest.raises(ImageError) as info:
            load_rgb(path)
        err = info.value
        assert expected in err.reason
        assert err.path == str(path)
        assert str(err) == f"{path}: {err.reason}" and "\n" not in str(err)
        # The bounded loader reports the same way.
        with pytest.raises(ImageError, match=expected):
            load_rgb_bounded(path, 32)


def test_conversions_keep_the_pixels(bad_inputs):
    root, _ = bad_inputs
    rgb = load_rgb(root / "png_named.JPEG")
    assert np.array_equal(load_rgb(root / "rgba.png"), rgb)  # alpha dropped, colour kept
    gray = load_rgb(root / "gray.png")
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    assert load_rgb(root / "one_pixel.png").tolist() == [[[200, 10, 10]]]
    cmyk = load_rgb(root / "cmyk.jpg").astype(int)
    assert np.abs(cmyk - rgb).mean() < 20  # lossy JPEG + CMYK round trip, same picture
    # 16-bit grey (the fixture stores 8-bit grey * 256) is rescaled, not clipped to white.
    gray16 = load_rgb(root / "gray16.png").astype(int)
    assert np.abs(gray16 - gray).max() <= 1


def test_float_grey_in_unit_range_is_scaled(tmp_path):
    values = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(values, "F").save(tmp_path / "float.tif")
    rgb = load_rgb(tmp_path / "float.tif")
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and rgb[32, 0, 0] in (127, 128)


def test_image_error_pickles():
    err = pickle.loads(pickle.dumps(ImageError("a/b.jpg", "empty\nfile")))
    assert (err.path, err.reason, str(err)) == ("a/b.jpg", "empty file", "a/b.jpg: empty file")


@pytest.mark.parametrize(
    "size,max_side,expected",
    [
        ((4000, 3000), 1000, (1000, 750)),
        ((3000, 4000), 1000, (750, 1000)),
        ((1000, 999), 1000, (1000, 999)),
        ((1001, 10), 1000, (1000, 10)),
        ((5000, 1), 1000, (1000, 1)),
        ((4000, 3000), None, (4000, 3000)),
        ((4000, 3000), 0, (4000, 3000)),
    ],
)
def test_bounded_size(size, max_side, expected):
    assert bounded_size(*size, max_side) == expected


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory) -> Path:
    """A 4000x3000 photo (upscaled chelsea) saved as JPEG."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    small_photo("chelsea", 400).resize((4000, 3000), Image.BILINEAR).save(path, quality=90)
    return path


def test_bounded_load_shrinks_large_images_only(huge_jpeg, photo_dir):
    arr, orig, factor = load_rgb_bounded(huge_jpeg, 1000)
    assert arr.shape == (750, 1000, 3) and orig == (4000, 3000) and factor == 4.0
    again, _, _ = load_rgb_bounded(huge_jpeg, 1000)
    assert np.array_equal(arr, again)  # deterministic
    small = photo_dir / "cls_a" / "astronaut.png"
    arr, orig, factor = load_rgb_bounded(small, 1000)
    assert factor == 1.0 and np.array_equal(arr, load_rgb(small)) and orig == (120, 120)


def test_bounded_load_of_huge_jpeg_uses_little_memory(huge_jpeg):
    # Peak RSS (VmHWM: per process image, unlike ru_maxrss which keeps the forking parent's peak
    # across exec) of a fresh process. Measured here: about 40 MB bounded, 195 MB for a full
    # 4000x3000 decode; the reference search on the full image would take gigabytes.
    code = (
        "import sys; from soco_pretrain.images import load_rgb_bounded;"
        "a, o, f = load_rgb_bounded(sys.argv[1], 1000); assert a.shape == (750, 1000, 3);"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(huge_jpeg)], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) < 120 * 1024  # KiB: no full-size decode happened


def test_decompression_bomb_fails_from_the_header_in_little_memory(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png")  # 20000x20000 (400 M pixels) in about 50 KB
    assert bomb.stat().st_size < 100_000
    for load in (lambda p: load_rgb(p), lambda p: load_rgb_bounded(p, 1000)):
        with pytest.raises(ImageError, match="20000x20000 pixels exceeds the limit of 178956970") as info:
            load(bomb)
        assert "\n" not in str(info.value) and info.value.path == str(bomb)
    # Checked before decoding: a fresh process stays small (a decode would take over 1.2 GB).
    code = (
        "import sys; from soco_pretrain.images import ImageError, load_rgb_bounded\n"
        "try:\n    load_rgb_bounded(sys.argv[1], 1000)\nexcept ImageError:\n    pass\n"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) < 150 * 1024  # KiB
    assert DEFAULT_MAX_PIXELS == 2 * 89_478_485  # PIL's own error threshold


def test_pixel_bound_counts_the_reduced_decode_of_a_big_jpeg(huge_jpeg, tmp_path):
    # 4000x3000 = 12 M pixels; with max_side 1000 the JPEG decodes at 1/4 scale (0.75 M pixels).
    arr, orig, _ = load_rgb_bounded(huge_jpeg, 1000, max_pixels=1_000_000)
    assert arr.shape == (750, 1000, 3) and orig == (4000, 3000)
    with pytest.raises(ImageError, match="4000x3000 pixels exceeds"):
        load_rgb(huge_jpeg, max_pixels=1_000_000)
    with pytest.raises(ImageError, match="4000x3000 pixels, 2000x1500 after JPEG reduction exceeds"):
        load_rgb_bounded(huge_jpeg, 2000, max_pixels=1_000_000)
    png = tmp_path / "big.png"  # PNG has no reduced decode: its full size counts
    Image.new("RGB", (1200, 1000)).save(png)
    with pytest.raises(ImageError, match="1200x1000 pixels exceeds"):
        load_rgb_bounded(png, 100, max_pixels=1_000_000)
    assert load_rgb_bounded(png, 100, max_pixels=None)[0].shape == (83, 100, 3)
    assert load_rgb_bounded(png, 100, max_pixels=0)[1] == (1200, 1000)
