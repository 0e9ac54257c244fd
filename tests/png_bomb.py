"""A decompression bomb for tests: a valid PNG that is huge in pixels and tiny on disk."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, side: int = 20000) -> Path:
    """Write a ``side`` x ``side`` 1-bit greyscale PNG of zeros (about 50 KB for 20000 px).

    Built row by row with zlib, so writing it takes little memory; PIL would decode it into
    ``side**2`` bytes, and 3x that once converted to RGB.
    """
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    row = bytes(1 + (side + 7) // 8)  # filter byte 0 + the packed row
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    signature = b"\x89PNG\r\n\x1a\n"
    path.write_bytes(signature + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path
