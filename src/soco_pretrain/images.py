"""Finding and decoding images: the one place that turns a path into RGB pixels.

Every decoding problem becomes an :class:`ImageError` naming the file and the reason, so a
run over a million images can report bad files instead of crashing on the first one.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import PathError

# Extensions we treat as images when walking a folder (case-insensitive). Our choice: the
# formats PIL decodes that people actually keep datasets in (ImageNet uses ".JPEG").
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}

# Big photos are legitimate here; their cost is bounded by the caller's max_side instead
# (load_rgb_bounded decodes JPEGs at reduced size), so PIL's bomb check only gets in the way.
Image.MAX_IMAGE_PIXELS = None
# A truncated file is a failure to report, never silently padded with grey: we leave PIL's
# ImageFile.LOAD_TRUNCATED_IMAGES at its default (False) and _decode reports such files.


class ImageError(PathError):
    """An image that cannot be listed or decoded; ``str()`` is one line ``PATH: REASON``."""


@dataclass
class ImageList:
    """Images found under ``root``; ``paths`` are relative POSIX paths (sorted) or absolute
    paths for list-file entries outside ``root``."""

    root: Path
    paths: list[str]
    ignored: list[str] = field(default_factory=list)

    def abspath(self, i: int) -> Path:
        """Absolute path of image ``i``."""
        return self.root / self.paths[i]  # an absolute paths[i] replaces root

    def __len__(self) -> int:
        return len(self.paths)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_folder(root: Path) -> ImageList:
    paths, ignored = [], []
    seen_dirs = set()
    # followlinks: datasets are often folders of symlinks; seen_dirs breaks symlink cycles.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if _is_hidden(name):
                continue
            rel = (rel_dir / name).as_posix()
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(rel)
            else:
                ignored.append(rel)
    return ImageList(root=root, paths=sorted(paths), ignored=sorted(ignored))


def _read_list_file(list_file: Path) -> ImageList:
    root = list_file.parent.resolve()
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(list_file, f"cannot read image list: {exc.__class__.__name__}: {exc}") from None
    paths = set()
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(os.path.normpath(root / entry))  # root / absolute == absolute
        try:
            paths.add(p.relative_to(root).as_posix())
        except ValueError:
            paths.add(p.as_posix())  # outside root: stays absolute
    # Listed entries are taken as given (even odd extensions): the user chose them.
    return ImageList(root=root, paths=sorted(paths), ignored=[])


def list_images(source) -> ImageList:
    """List the images of a folder (recursive, hidden entries skipped) or of a list file.

    A list file has one path per line, relative to the list file's folder or absolute; blank
    lines and lines starting with ``#`` are skipped and duplicates collapse to one entry.
    """
    source = Path(source)
    if source.is_dir():
        return _walk_folder(source.resolve())
    if source.is_file():
        if source.suffix.lower() in IMAGE_EXTENSIONS:
            raise ImageError(source, "is an image; give its folder or a list file of image paths")
        return _read_list_file(source)
    raise ImageError(source, "no such folder or image-list file")


def _open(path: Path) -> Image.Image:
    """Open (not decode) an image, turning every failure into ImageError."""
    try:
        if path.is_dir():
            raise ImageError(path, "is a directory, not an image file")
        if not path.exists():
            why = "dangling symbolic link" if path.is_symlink() else "file not found"
            raise ImageError(path, why)
        if path.stat().st_size == 0:
            raise ImageError(path, "empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. palette-with-transparency notes
            return Image.open(path)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(path, "not a recognised image format") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except Exception as exc:  # anything PIL or the OS throws at a bad file
        raise ImageError(path, f"cannot open: {exc.__class__.__name__}: {exc}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Grey, palette, RGBA, CMYK, ... -> RGB with PIL; 16-bit and float greys rescaled to 8 bits.

    PIL's own ``convert("RGB")`` clips 16-bit values at 255, which turns a typical 16-bit photo
    (medical, scientific, some PNGs) almost entirely white; we scale by 1/257 instead (65535 ->
    255), and float images in [0, 1] by 255.
    """
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        elif im.mode.startswith("I;16") or (arr.size and np.nanmax(arr) > 255):
            arr = arr / 257.0
        grey = np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return im.convert("RGB")


def _decode(path: Path, im: Image.Image, size: tuple[int, int] | None) -> np.ndarray:
    """Decode ``im`` to RGB uint8, optionally resized to ``size`` = (width, height)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if size is not None and im.format == "JPEG":
                # JPEG can decode at 1/2, 1/4 or 1/8 scale (never below `size`): a 4000x3000
                # photo then costs a quarter or less of the memory and time. Deterministic.
                im.draft("RGB", size)
            im.load()
            if im.width == 0 or im.height == 0:
                raise ImageError(path, "zero-size image")
            rgb = _to_rgb(im)
            if size is not None and rgb.size != size:
                rgb = rgb.resize(size, Image.BILINEAR, reducing_gap=3.0)
            arr = np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as exc:
        text = str(exc)
        if "truncated" in text.lower():
            raise ImageError(path, "truncated image file") from None
        raise ImageError(path, f"cannot decode: {exc.__class__.__name__}: {text}") from None
    finally:
        im.close()
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise ImageError(path, f"decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


def load_rgb(path) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array (no EXIF rotation).

    Raises :class:`ImageError` (and nothing else) for missing, unreadable, empty, truncated or
    non-image files.
    """
    path = Path(path)
    return _decode(path, _open(path), None)


def bounded_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) after shrinking so the long side is at most ``max_side`` (None/0: as is)."""
    long_side = max(width, height)
    if not max_side or long_side <= max_side:
        return width, height
    if width >= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


def load_rgb_bounded(path, max_side: int | None):
    """Decode like :func:`load_rgb`, shrinking images whose long side exceeds ``max_side``.

    Returns ``(image, (orig_width, orig_height), factor)`` where ``factor`` =
    original long side / returned long side (1.0 when not resized).
    """
    path = Path(path)
    im = _open(path)
    orig = (im.width, im.height)
    size = bounded_size(*orig, max_side)
    if size == orig:
        return _decode(path, im, None), orig, 1.0
    arr = _decode(path, im, size)
    return arr, orig, max(orig) / max(size)
