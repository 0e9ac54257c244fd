"""The data manifest of a pretraining run (which files it saw, by content) and the leak guard."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import make_photos, small_pretrain_config
from PIL import Image

from soco_pretrain.data.manifest import (
    MANIFEST_FILE,
    LeakError,
    build_manifest,
    check_no_leak,
    manifest_for_weights,
    read_manifest,
    record_run_manifest,
    write_manifest,
)
from soco_pretrain.errors import PathError
from soco_pretrain.runfolder import file_digest
from soco_pretrain.train.loop import pretrain
from soco_pretrain.transfer.export import export

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path, seed: int, size: int = 24) -> Path:
    """A small random RGB PNG; different seeds give different bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def train_val(tmp_path):
    """train/ with 4 images, val/ with 3 other images."""
    train = [_png(tmp_path / "train" / f"t{i}.png", seed=i) for i in range(4)]
    val = [_png(tmp_path / "val" / f"v{i}.png", seed=100 + i) for i in range(3)]
    return tmp_path, train, val


# ---------------------------------------------------------------- hashing and the manifest


def test_digest_is_the_sha256_of_the_bytes(tmp_path):
    path = _png(tmp_path / "a.png", seed=0)
    assert file_digest(path) == _sha256(path)
    big = tmp_path / "big.bin"  # more than one 1 MiB chunk
    big.write_bytes(np.random.default_rng(1).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes())
    assert file_digest(big) == _sha256(big)


def test_build_manifest_layout(train_val):
    root, train, _ = train_val
    manifest = build_manifest(list(reversed(train)), root, workers=2, progress=False)
    assert manifest["version"] == 1 and manifest["hash"] == "sha256" and manifest["count"] == 4
    assert manifest["files"] == [[f"train/t{i}.png", _sha256(train[i])] for i in range(4)]
    expected = hashlib.sha256("\n".join(sorted(_sha256(p) for p in train)).encode()).hexdigest()
    assert manifest["set_hash"] == expected
    assert "unreadable" not in manifest
    # no root (or a path outside it): the path as given
    outside = build_manifest([train[0]], root / "elsewhere", progress=False)
    assert outside["files"] == [[train[0].as_posix(), _sha256(train[0])]]


def test_set_hash_follows_content_not_names(train_val):
    root, train, _ = train_val
    before = build_manifest(train, root, progress=False)
    renamed = root / "train" / "renamed.png"
    train[1].rename(renamed)
    after_rename = build_manifest([train[0], renamed, train[2], train[3]], root, progress=False)
    assert after_rename["set_hash"] == before["set_hash"]
    assert [r[0] for r in after_rename["files"]] != [r[0] for r in before["files"]]
    data = bytearray(renamed.read_bytes())
    data[-1] ^= 1  # one bit of one file
    renamed.write_bytes(bytes(data))
    changed = build_manifest([train[0], renamed, train[2], train[3]], root, progress=False)
    assert changed["set_hash"] != before["set_hash"]


def test_unreadable_files_are_recorded_not_dropped(train_val):
    root, train, _ = train_val
    gone = root / "train" / "missing.png"
    manifest = build_manifest([*train, gone], root, progress=False)
    assert manifest["count"] == 5
    assert ["train/missing.png", None] in manifest["files"]
    assert manifest["unreadable"] == ["train/missing.png"]
    assert manifest["set_hash"] == build_manifest(train, root, progress=False)["set_hash"]


def test_write_and_read_from_folder_checkpoint_or_file(train_val, tmp_path):
    root, train, _ = train_val
    run = tmp_path / "run"
    manifest = build_manifest(train, root, progress=False)
    path = write_manifest(run, manifest)
    assert path == run / MANIFEST_FILE
    assert json.loads(path.read_text()) == manifest
    assert read_manifest(run) == manifest
    assert read_manifest(run / "checkpoints" / "last.pt") == manifest  # need not exist yet
    assert read_manifest(path) == manifest
    assert read_manifest(tmp_path / "other_run") is None
    (tmp_path / "other_run").mkdir()
    assert read_manifest(tmp_path / "other_run") is None
    path.write_text("{not json")
    with pytest.raises(PathError, match="cannot read the data manifest"):
        read_manifest(run)


def test_record_reuses_a_manifest_with_the_same_paths(train_val, tmp_path, capsys):
    root, train, _ = train_val
    run = tmp_path / "run"
    first = record_run_manifest(run, train, root, progress=False)
    out = capsys.readouterr().out
    assert out.strip() == (f"data manifest: 4 images, set hash {first['set_hash'][:12]} ({run / MANIFEST_FILE})")
    stamp = (run / MANIFEST_FILE).stat().st_mtime_ns
    again = record_run_manifest(run, list(reversed(train)), root, progress=False)  # a resume
    assert again == first
    assert (run / MANIFEST_FILE).stat().st_mtime_ns == stamp
    assert capsys.readouterr().out == ""
    # other images: rebuilt
    third = record_run_manifest(run, train[:3], root, progress=False)
    assert third["count"] == 3 and read_manifest(run) == third
    assert "data manifest: 3 images" in capsys.readouterr().out


# ---------------------------------------------------------------- the leak guard


def test_leak_guard_catches_a_renamed_copy(train_val):
    root, train, val = train_val
    copy = root / "train" / "copy.png"
    shutil.copyfile(val[1], copy)
    manifest = build_manifest([*train, copy], root, progress=False)
    with pytest.raises(LeakError) as info:
        check_no_leak(val, {"runs/soco": manifest})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("1 evaluation image was in the pretraining set of runs/soco (a byte-identical file)")
    assert f"{val[1]} = train/copy.png" in message and "--allow-leak" in message
    assert info.value.pairs == [(str(val[1]), "runs/soco", "train/copy.png")]
    # several, several runs, another word for the images
    shutil.copyfile(val[2], root / "train" / "copy2.png")
    other = build_manifest([root / "train" / "copy2.png"], root, progress=False)
    with pytest.raises(LeakError, match=r"^2 k-NN images were in the pretraining set of a and b "):
        check_no_leak(val, {"a": manifest, "b": other}, what="k-NN")


def test_leak_guard_passes_distinct_images(train_val):
    root, train, val = train_val
    manifest = build_manifest(train, root, progress=False)
    check_no_leak(val, {"runs/soco": manifest})  # no error
    check_no_leak([*val, root / "val" / "missing.png"], {"runs/soco": manifest})  # unreadable: skipped
    check_no_leak(val, {})


def test_manifest_for_weights(train_val, tmp_path):
    root, train, _ = train_val
    run = tmp_path / "runs" / "soco"
    manifest = build_manifest(train, root, progress=False)
    write_manifest(run, manifest)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    assert manifest_for_weights(run) == (str(run), manifest)
    assert manifest_for_weights(str(run / "checkpoints" / "last.pt")) == (str(run), manifest)
    exported = tmp_path / "soco.pth"
    exported.write_bytes(b"x")
    assert manifest_for_weights(exported) is None  # no sidecar
    (tmp_path / "soco.pth.manifest.json").write_text(json.dumps(manifest))
    assert manifest_for_weights(exported) == (str(exported), manifest)
    assert manifest_for_weights("none") is None and manifest_for_weights(None) is None
    bare = tmp_path / "bare_run"
    (bare / "checkpoints").mkdir(parents=True)
    (bare / "checkpoints" / "last.pt").write_bytes(b"x")
    assert manifest_for_weights(bare) is None
    assert manifest_for_weights(bare / "checkpoints" / "last.pt") is None


# ---------------------------------------------------------------- a real run and its export


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One optimiser step on 2 photos; returns (run folder, image folder, relative names, config)."""
    root = tmp_path_factory.mktemp("manifest_run")
    rel = make_photos(root / "images", names=("astronaut", "coffee"), side=64)
    run = root / "run"
    cfg = small_pretrain_config("data.views.proposal_source=whole_image")  # no proposal store needed
    pretrain(cfg, root / "images", None, run, max_steps=1, progress=False)
    return run, root / "images", rel, cfg


def test_pretrain_writes_the_manifest_and_resume_reuses_it(tiny_run, capsys):
    run, images, rel, cfg = tiny_run
    manifest = read_manifest(run)
    assert manifest["count"] == 2
    assert manifest["files"] == [[name, _sha256(images / name)] for name in sorted(rel)]
    stamp = (run / MANIFEST_FILE).stat().st_mtime_ns
    pretrain(cfg, images, None, run, max_steps=1, progress=False)  # resumes at step 1: nothing to do
    assert "data manifest:" not in capsys.readouterr().out
    assert (run / MANIFEST_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(LeakError, match="coffee.png"):
        check_no_leak([images / "coffee.png"], dict([manifest_for_weights(run)]))


@pytest.mark.parametrize("target", ["torchvision", "mmdet", "detectron2"])
def test_export_carries_the_manifest(tiny_run, tmp_path, target):
    run, images, _, _ = tiny_run
    manifest = read_manifest(run)
    out = tmp_path / f"soco_{target}.pth"
    report = export(run, target, out=out)
    sidecar = tmp_path / f"soco_{target}.pth.manifest.json"
    assert json.loads(sidecar.read_text()) == manifest
    text = report.format()
    assert f"2 images, set hash {manifest['set_hash'][:12]}" in text and str(sidecar) in text
    assert manifest_for_weights(out) == (str(out), manifest)
    if target == "torchvision":  # still a plain state dict of tensors
        state = torch.load(out, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    elif target == "mmdet":
        meta = torch.load(out, weights_only=True)["meta"]
        assert meta["data_manifest_hash"] == manifest["set_hash"] and meta["data_manifest_count"] == 2
    else:
        with open(out, "rb") as f:
            payload = pickle.load(f)
        assert payload["data_manifest_hash"] == manifest["set_hash"] and payload["data_manifest_count"] == 2
    with pytest.raises(LeakError):
        check_no_leak([images / "astronaut.png"], dict([manifest_for_weights(out)]))


def test_export_of_a_run_without_manifest_removes_a_stale_sidecar(tiny_run, tmp_path):
    run, _, _, _ = tiny_run
    bare = tmp_path / "bare"
    shutil.copytree(run / "checkpoints", bare / "checkpoints")
    out = tmp_path / "soco.pth"
    stale = tmp_path / "soco.pth.manifest.json"
    stale.write_text("{}")
    report = export(bare, "torchvision", out=out)
    assert not stale.exists() and report.manifest_hash is None
    assert "data manifest" not in report.format()
