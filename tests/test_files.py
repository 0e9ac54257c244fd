"""The one atomic writer (files.py): content, permissions, one-line errors, nothing half-written
on failure."""

from __future__ import annotations

import errno
import json
import os
import pickle
import stat
import subprocess
import sys
from collections import namedtuple

import pytest

from soco_pretrain import files
from soco_pretrain.errors import UserError
from soco_pretrain.files import WriteError, atomic_write, atomic_write_bytes, atomic_write_json


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

    with pytest.raises(WriteError, match="disk full"):
        atomic_write(path, explode)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


@pytest.mark.parametrize(
    "broken, error",
    [
        ("fsync", OSError(errno.ENOSPC, "No space left on device")),
        ("replace", PermissionError(errno.EACCES, "Permission denied")),
        ("fdopen", OSError(errno.EROFS, "Read-only file system")),
        ("mkstemp", PermissionError(errno.EACCES, "Permission denied")),  # a folder we may not write
    ],
)
def test_os_errors_become_one_line_naming_the_file(tmp_path, monkeypatch, broken, error):
    path = tmp_path / "store" / "manifest.json"
    atomic_write_json(path, {"version": 1})

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(files.tempfile if broken == "mkstemp" else files.os, broken, fail)
    with pytest.raises(WriteError) as info:
        atomic_write_json(path, {"version": 2})
    monkeypatch.undo()
    message = str(info.value)
    assert message == f"{path}: cannot write ({errno.errorcode[error.errno]}: {error.strerror})"
    assert isinstance(info.value, UserError) and info.value.__cause__ is error
    assert json.loads(path.read_text()) == {"version": 1}  # the previous file is intact
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]  # and no temporary is left


def test_a_disk_full_inside_the_writer_is_a_write_error(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def fills_the_disk(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"a\.bin: cannot write \(ENOSPC: No space left on device\)"):
        atomic_write(path, fills_the_disk)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_torch_saves_zip_writer_failure_is_a_write_error(tmp_path):
    # What torch.save does on a full disk: the file's OSError is raised inside write_record, then
    # the zip writer's __exit__ raises a RuntimeError over it (the OSError is only its context).
    path = tmp_path / "a.pt"
    path.write_bytes(b"old")

    def like_torch_save(f):
        try:
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    with pytest.raises(WriteError) as info:
        atomic_write(path, like_torch_save)
    assert str(info.value) == f"{path}: cannot write (ENOSPC: No space left on device)"
    assert isinstance(info.value.__cause__, OSError)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.pt"]

    def writer_failed(f):  # the C++ writer's own write failing (no Python OSError)
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    with pytest.raises(WriteError, match=r"a\.pt: cannot write \(torch.save's writer failed: Pytorch.* free there\)"):
        atomic_write(path, writer_failed)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_other_runtime_errors_pass_through(tmp_path):
    def bug(f):
        raise RuntimeError("a bug, not a write failure")

    with pytest.raises(RuntimeError, match="a bug"):
        atomic_write(tmp_path / "a.bin", bug)
    assert list(tmp_path.iterdir()) == []


Usage = namedtuple("Usage", "total used free")


def test_check_free_space_names_the_folder_and_both_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda folder: Usage(10**12, 0, 3 << 20))
    files.check_free_space(tmp_path / "new" / "folder", 3 << 20, "x")  # just fits
    with pytest.raises(WriteError) as info:
        files.check_free_space(tmp_path, (3 << 20) + 1, "a.bin")
    assert str(info.value) == (
        f"{tmp_path}: cannot write a.bin: 3.0 MiB free, about 3.0 MiB needed "
        "(ENOSPC: free some space or write elsewhere)"
    )

    def unknown(folder):
        raise OSError(errno.ENOSYS, "no statvfs")

    monkeypatch.setattr(files.shutil, "disk_usage", unknown)
    files.check_free_space(tmp_path, 1 << 60, "a.bin")  # cannot tell: the write itself will


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    atomic_write_bytes(folder / "a.bin", b"old")
    folder.chmod(0o555)
    try:
        with pytest.raises(WriteError, match=r"a\.bin: cannot write \(EACCES"):
            atomic_write_bytes(folder / "a.bin", b"new")
    finally:
        folder.chmod(0o755)
    assert (folder / "a.bin").read_bytes() == b"old"


def test_write_error_pickles_and_stays_one_line():
    error = WriteError("/x/y.pt", "cannot write (ENOSPC: No\nspace)")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is WriteError and str(again) == str(error) == "/x/y.pt: cannot write (ENOSPC: No space)"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_get_the_mode_the_umask_allows(tmp_path, umask, mode):
    # A fresh process: the umask is read once, when soco_pretrain.files is imported.
    path = tmp_path / "a.json"
    code = (
        f"import os; os.umask({umask}); from soco_pretrain.files import atomic_write_json; "
        f"atomic_write_json({str(path)!r}, 1)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_writing_never_changes_the_umask(tmp_path, monkeypatch):
    # os.umask can only be read by setting it; doing that per write would hand other threads'
    # new files mode 0666 meanwhile. The writer uses the value read at import.
    def no_umask(*args):
        raise AssertionError("os.umask called during a write")

    monkeypatch.setattr(os, "umask", no_umask)
    path = atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert stat.S_IMODE(path.stat().st_mode) == files.FILE_MODE


def test_ctrl_c_passes_through_and_removes_the_temporary(tmp_path):
    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "a.bin", interrupted)
    assert list(tmp_path.iterdir()) == []
