"""The one atomic writer (files.py): content, permissions, nothing half-written on failure."""

from __future__ import annotations

import json
import os
import stat

import pytest

from soco_pretrain.files import atomic_write, atomic_write_json


def test_writes_content_with_the_usual_permissions(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "a.json", {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def explode(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, explode)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
