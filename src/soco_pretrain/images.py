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

# PIL's own bomb check is off: it counts the header's pixels, so it would refuse a legitimate
# big JPEG that load_rgb_bounded decodes at 1/2 to 1/8 scale. Our bound (max_pixels below) counts
# the pixels that will actually be decoded, after that reduction, and is checked from the header
# before decoding.
Image.MAX_IMAGE_PIXELS = None
# Default bound on decoded pixels: PIL's own error threshold (2 x its MAX_IMAGE_PIXELS of
# 89,478,485, about 13,400 x 13,400). A decode at the bound costs about 540 MB as RGB. A
# 20000x20000 PNG of 1.2 MB on disk would take over 3 GB in a worker; it becomes one failure.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
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
    # Folders under root that could not be listed (relative POSIX path, reason): their images
    # are missing from ``paths``, so callers report them instead of silently omitting them.
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def abspath(self, i: int) -> Path:
        """Absolute path of image ``i``."""
        return self.root / self.paths[i]  # an absolute paths[i] replaces root

    def __len__(self) -> int:
        return len(self.paths)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_folder(root: Path) -> ImageList:
    paths, ignored, unreadable = [], [], []

    def onerror(exc: OSError):  # os.walk skips a folder it cannot list unless told so here
        where = Path(exc.filename) if exc.filename else root
        try:
            rel = where.relative_to(root).as_posix()
        except ValueError:
            rel = where.as_posix()
        why = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        unreadable.append((rel, f"cannot list folder: {why}"))

    seen_dirs = set()
    # followlinks: datasets are often folders of symlinks; seen_dirs breaks symlink cycles.
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
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
    return ImageList(root=root, paths=sorted(paths), ignored=sorted(ignored), unreadable=sorted(unreadable))


def _read_list_file(list_file: Path) -> ImageList:
    root = list_file.parent.resolve()
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(list_file, f"cannot read image list: {exc.__class__.__name__}: {exc}") from exc
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
    Subfolders that cannot be listed (permissions, I/O errors) are returned in ``unreadable``.
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
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not a recognised image format") from exc
    except PermissionError as exc:
        raise ImageError(path, "permission denied") from exc
    except Exception as exc:  # anything PIL or the OS throws at a bad file
        raise ImageError(path, f"cannot open: {exc.__class__.__name__}: {exc}") from exc


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


def _too_many_pixels(path: Path, im: Image.Image, header: tuple[int, int], max_pixels: int | None):
    """ImageError if decoding ``im`` (its size after any draft reduction) exceeds ``max_pixels``."""
    if max_pixels and im.width * im.height > max_pixels:
        w, h = header
        reduced = f", {im.width}x{im.height} after JPEG reduction" if (im.width, im.height) != header else ""
        raise ImageError(
            path,
            f"{w}x{h} pixels{reduced} exceeds the limit of {max_pixels} decoded pixels "
            "(a decompression bomb? soco proposals --max-pixels sets the limit)",
        )


def _decode(
    path: Path, im: Image.Image, size: tuple[int, int] | None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode ``im`` to RGB uint8, optionally resized to ``size`` = (width, height).

    ``max_pixels`` bounds the pixels decoded, checked from the header before decoding.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = (im.width, im.height)
            if size is not None and im.format == "JPEG":
                # JPEG can decode at 1/2, 1/4 or 1/8 scale (never below `size`): a 4000x3000
                # photo then costs a quarter or less of the memory and time. Deterministic.
                # draft() only configures the decoder (im.size becomes the reduced size).
                im.draft("RGB", size)
            _too_many_pixels(path, im, header, max_pixels)
            im.load()
            if im.width == 0 or im.height == 0:
                raise ImageError(path, "zero-size image")
            rgb = _to_rgb(im)
            if size is not None and rgb.size != size:
                rgb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
            arr = np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as exc:
        text = str(exc)
        if "truncated" in text.lower():
            raise ImageError(path, "truncated image file") from exc
        raise ImageError(path, f"cannot decode: {exc.__class__.__name__}: {text}") from exc
    finally:
        im.close()
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise ImageError(path, f"decoded to unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


def load_rgb(path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array (no EXIF rotation).

    Raises :class:`ImageError` (and nothing else) for missing, unreadable, empty, truncated or
    non-image files, and for images of more than ``max_pixels`` pixels (None/0: no bound).
    """
    path = Path(path)
    return _decode(path, _open(path), None, max_pixels)


# JPEGs whose bytes torchvision.io.decode_jpeg(mode=RGB) turns into the pixels load_rgb gives
# (both libjpeg-turbo, no EXIF rotation): RGB (YCbCr) and grey ones. "MPO" is a camera JPEG with
# extra pictures appended; both decoders read its first (main) picture. CMYK/YCCK JPEGs are
# left to PIL: the CUDA decoder does not take them.
DEVICE_DECODABLE = {("JPEG", "RGB"), ("JPEG", "L"), ("MPO", "RGB"), ("MPO", "L")}


def load_encoded(
    path, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray | None, np.ndarray | None, tuple[int, int]]:
    """The file's bytes for decoding elsewhere, or its pixels, and its (width, height):
    ``(data, None, size)`` for a JPEG that ``torchvision.io.decode_jpeg`` decodes like
    :func:`load_rgb` (``DEVICE_DECODABLE``), ``data`` being the whole file as a uint8 1-D array,
    undecoded; ``(None, image, size)`` for any other image, decoded by :func:`load_rgb`'s code.

    Only the header of a JPEG is parsed here, with load_rgb's checks and messages (missing,
    empty, not an image, zero size, more than ``max_pixels`` pixels); corrupt data after the
    header is found by whoever decodes the bytes. Raises :class:`ImageError` only.
    """
    path = Path(path)
    im = _open(path)
    if (im.format, im.mode) not in DEVICE_DECODABLE:
        image = _decode(path, im, None, max_pixels)  # _decode closes im
        return None, image, (image.shape[1], image.shape[0])
    try:
        header = (im.width, im.height)
        if 0 in header:
            raise ImageError(path, "zero-size image")
        _too_many_pixels(path, im, header, max_pixels)
        fp = im.fp  # type: ignore[attr-defined]  # the file PIL opened (not in its stubs): read it whole
        fp.seek(0)
        data = np.frombuffer(bytearray(fp.read()), dtype=np.uint8)  # writable: torch takes it as is
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(path, f"cannot read: {exc.__class__.__name__}: {exc}") from exc
    finally:
        im.close()
    if data.size == 0:
        raise ImageError(path, "empty file")
    return data, None, header


def bounded_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) after shrinking so the long side is at most ``max_side`` (None/0: as is)."""
    long_side = max(width, height)
    if not max_side or long_side <= max_side:
        return width, height
    if width >= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


def load_rgb_bounded(path, max_side: int | None, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Decode like :func:`load_rgb`, shrinking images whose long side exceeds ``max_side``.

    Returns ``(image, (orig_width, orig_height), factor)`` where ``factor`` =
    original long side / returned long side (1.0 when not resized). ``max_pixels`` bounds the
    pixels actually decoded: a big JPEG decoded at reduced scale counts its reduced size.
    """
    path = Path(path)
    im = _open(path)
    orig = (im.width, im.height)
    size = bounded_size(*orig, max_side)
    if size == orig:
        return _decode(path, im, None, max_pixels), orig, 1.0
    arr = _decode(path, im, size, max_pixels)
    return arr, orig, max(orig) / max(size)
