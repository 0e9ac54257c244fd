"""Shared fixtures: small real photos (skimage's bundled data) and every kind of bad input."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data


def small_photo(name: str, long_side: int = 120) -> Image.Image:
    """One of skimage's bundled photos, resized so its long side is ``long_side`` px."""
    im = Image.fromarray(getattr(data, name)())
    scale = long_side / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    On 2 shared cores OpenMP's threads spin against other processes: a ResNet-50 step got ~15x
    slower and small per-image tensor ops ~5x. Restored after the module.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Five real photos of about 120 px in ImageNet-style class folders, plus noise to skip.

    Mixed formats and an upper-case ``.JPEG`` on purpose; ``camera`` is greyscale.
    """
    root = tmp_path_factory.mktemp("photos")
    (root / "cls_a").mkdir()
    (root / "cls_b").mkdir()
    small_photo("astronaut").save(root / "cls_a" / "astronaut.png")
    small_photo("coffee").save(root / "cls_a" / "coffee.JPEG", quality=95)
    small_photo("chelsea", 100).save(root / "cls_b" / "chelsea.png")
    small_photo("rocket").save(root / "cls_b" / "rocket.jpg", quality=95)
    small_photo("camera", 110).save(root / "camera.png")
    (root / "README.txt").write_text("not an image\n")  # skipped: extension
    (root / ".hidden.png").write_bytes(b"x")  # skipped: hidden
    return root


# kind -> (file name, expected: None = decodes to RGB, else a substring of the failure reason)
BAD_KINDS = {
    "directory": ("a_directory.jpg", "is a directory"),
    "dangling_symlink": ("dangling.jpg", "dangling symbolic link"),
    "empty": ("empty.jpg", "empty file"),
    "truncated_jpeg": ("truncated.jpg", "truncated image file"),
    "truncated_png": ("truncated.png", "truncated image file"),
    "random_bytes": ("random.jpg", "not a recognised image format"),
    "text": ("notes.jpg", "not a recognised image format"),
    "cmyk": ("cmyk.jpg", None),
    "palette": ("palette.png", None),
    "rgba": ("rgba.png", None),
    "grayscale": ("gray.png", None),
    "gray16": ("gray16.png", None),
    "one_pixel": ("one_pixel.png", None),
    "png_named_jpeg": ("png_named.JPEG", None),
}


@pytest.fixture
def bad_inputs(tmp_path) -> tuple[Path, Path]:
    """A folder with one file of every bad-input kind and a list file naming all of them.

    Returns (folder, list_file). The directory named ``a_directory.jpg`` is only reachable
    through the list file (a folder walk descends into it). See BAD_KINDS for expectations.
    """
    root = tmp_path / "bad"
    root.mkdir()
    photo = small_photo("astronaut", 64)
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG", quality=90)
    png = io.BytesIO()
    photo.save(png, "PNG")
    (root / "a_directory.jpg").mkdir()
    os.symlink(root / "does-not-exist.jpg", root / "dangling.jpg")
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    (root / "notes.jpg").write_text("these are my notes, not a photo\n" * 20)
    photo.convert("CMYK").save(root / "cmyk.jpg", "JPEG")
    photo.convert("P", palette=Image.ADAPTIVE).save(root / "palette.png")
    photo.convert("RGBA").save(root / "rgba.png")
    photo.convert("L").save(root / "gray.png")
    gray16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 256).astype(np.uint16)
    Image.fromarray(gray16).save(root / "gray16.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    (root / "png_named.JPEG").write_bytes(png.getvalue())
    list_file = tmp_path / "bad.txt"
    list_file.write_text("# every bad kind\n\n" + "\n".join(f"bad/{n}" for n, _ in BAD_KINDS.values()) + "\n")
    return root, list_file
