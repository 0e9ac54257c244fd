"""store.py: round trip, memory maps, dtype choice, pickling into worker processes, bad stores."""

from __future__ import annotations

import json
import multiprocessing
import pickle

import numpy as np
import pytest

from soco_pretrain.cli import main
from soco_pretrain.errors import PathError
from soco_pretrain.proposals import store as store_module
from soco_pretrain.proposals.filters import RULE_FAILED, RULE_PAPER, RULE_WHOLE_IMAGE
from soco_pretrain.proposals.store import load, verify_store, write_store


def make_store(directory, max_coord=500, manifest=None):
    rng = np.random.default_rng(1)
    paths = ["a/1.jpg", "a/2.jpg", "b/3.png", "bad.jpg"]
    per_image = [rng.integers(0, max_coord, (k, 4)) for k in (3, 0, 5, 0)]
    boxes = np.concatenate(per_image)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in per_image])])
    sizes = np.array([[640, 480], [20, 10], [max_coord, 300], [0, 0]])
    status = np.array([RULE_PAPER, RULE_WHOLE_IMAGE, RULE_PAPER, RULE_FAILED])
    raw = np.array([40, 1, 77, 0])
    man = {"preset": "paper", "failures": [{"path": "bad.jpg", "reason": "empty file"}]}
    man.update(manifest or {})
    write_store(directory, paths, boxes, offsets, sizes, status, raw, man)
    return paths, per_image, sizes, status, raw


def test_round_trip(tmp_path):
    paths, per_image, sizes, status, raw = make_store(tmp_path / "s")
    st = load(tmp_path / "s", verify=True)
    assert len(st) == 4 and st.paths == paths
    for i, p in enumerate(paths):
        assert st.index(p) == i
        assert st.boxes(i).tolist() == per_image[i].tolist()
        assert st.boxes(i).shape == (len(per_image[i]), 4)
        assert st.image_size(i) == tuple(sizes[i])
        assert st.status(i) == status[i] and st.raw_count(i) == raw[i]
    assert [st.rule(i) for i in range(4)] == ["paper", "whole_image", "paper", "failed"]
    m = st.manifest
    assert m["counts"] == {
        "images": 4,
        "ok": 3,
        "failed": 1,
        "boxes": 8,
        "rules": {"paper": 2, "ratio_only": 0, "min_side": 0, "whole_image": 1, "empty": 0, "failed": 1},
    }
    assert m["failures"] == [{"path": "bad.jpg", "reason": "empty file"}] and m["preset"] == "paper"
    assert set(m["files"]) == {"boxes.npy", "offsets.npy", "sizes.npy", "status.npy", "raw_counts.npy", "paths.json"}
    assert st.boxes(-1).shape == (0, 4)
    with pytest.raises(IndexError):
        st.boxes(4)
    with pytest.raises(KeyError, match="not in proposals store"):
        st.index("a/9.jpg")


def test_arrays_are_memory_mapped(tmp_path):
    make_store(tmp_path / "s")
    st = load(tmp_path / "s")
    maps = st._maps()
    assert all(isinstance(a, np.memmap) for a in maps.values())
    assert st.boxes(0).flags.writeable  # a private copy, not a view into the map
    assert maps["boxes.npy"].dtype == np.int16 and st.boxes(0).dtype == np.int32  # widened: w*h safe
    assert not list(tmp_path.glob("s/.*"))  # no temp files left behind


@pytest.mark.parametrize("max_coord,dtype", [(32767, np.int16), (32768, np.int32)])
def test_int16_unless_a_coordinate_does_not_fit(tmp_path, max_coord, dtype):
    d = tmp_path / "s"
    boxes = np.array([[0, 0, max_coord, 5]])
    write_store(d, ["x.jpg"], boxes, [0, 1], [[max_coord + 1, 6]], [0], [1], {})
    st = load(d)
    assert st._maps()["boxes.npy"].dtype == dtype and st.manifest["box_dtype"] == np.dtype(dtype).name
    assert st.boxes(0).tolist() == boxes.tolist()


def test_empty_store(tmp_path):
    write_store(tmp_path / "s", [], np.zeros((0, 4)), [0], np.zeros((0, 2)), [], [], {})
    st = load(tmp_path / "s")
    assert len(st) == 0 and st.manifest["counts"]["images"] == 0


def _read_in_worker(args):
    st, i = args
    return st.paths[i], st.boxes(i).tolist(), st.image_size(i)


def test_pickled_store_works_in_worker_processes(tmp_path):
    paths, per_image, sizes, _, _ = make_store(tmp_path / "s")
    st = load(tmp_path / "s")
    st.boxes(0)  # maps open in the parent ...
    state = pickle.dumps(st)
    assert len(state) < 2000  # ... but the pickle carries the directory, not the arrays
    ctx = multiprocessing.get_context("spawn")  # as DataLoader workers on macOS / Windows
    with ctx.Pool(2) as pool:
        got = pool.map(_read_in_worker, [(st, i) for i in range(4)])
    assert got == [(paths[i], per_image[i].tolist(), tuple(sizes[i])) for i in range(4)]


def test_missing_and_corrupt_stores_give_one_line_errors(tmp_path):
    with pytest.raises(PathError, match="no such proposals store"):
        load(tmp_path / "nope")
    d = tmp_path / "s"
    make_store(d)
    manifest = json.loads((d / "manifest.json").read_text())

    (d / "manifest.json").unlink()
    with pytest.raises(PathError, match="no manifest.json"):
        load(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(PathError, match="unreadable manifest.json"):
        load(d)
    (d / "manifest.json").write_text(json.dumps(manifest))

    data = (d / "boxes.npy").read_bytes()
    (d / "boxes.npy").write_bytes(data[:-8])
    with pytest.raises(PathError, match="boxes.npy has .* bytes") as info:
        load(d)
    assert str(d) in str(info.value) and "\n" not in str(info.value)

    flipped = bytearray(data)
    flipped[-1] ^= 1
    (d / "boxes.npy").write_bytes(bytes(flipped))
    # Same size: only the checksum can tell; a small file is hashed in full on every open.
    with pytest.raises(PathError, match="boxes.npy does not match its checksum") as info:
        load(d)
    assert str(d) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(PathError, match="boxes.npy does not match its sha256"):
        load(d, verify=True)
    (d / "boxes.npy").write_bytes(data)

    (d / "sizes.npy").unlink()
    with pytest.raises(PathError, match="sizes.npy is missing"):
        load(d)


def test_rewrite_replaces_store(tmp_path):
    d = tmp_path / "s"
    make_store(d)
    write_store(d, ["only.jpg"], [[1, 2, 3, 4]], [0, 1], [[10, 10]], [0], [1], {})
    st = load(d, verify=True)
    assert st.paths == ["only.jpg"] and st.boxes(0).tolist() == [[1, 2, 3, 4]]


def big_store(directory, monkeypatch, rows=20_000):
    """A store whose boxes.npy (160 KB) counts as big: sampled blocks of 1 KiB are recorded."""
    monkeypatch.setattr(store_module, "QUICK_FULL_BYTES", 64 << 10)
    monkeypatch.setattr(store_module, "SAMPLE_BLOCK", 1 << 10)
    monkeypatch.setattr(store_module, "SAMPLE_BLOCKS", 8)
    boxes = np.random.default_rng(0).integers(0, 1000, (rows, 4))
    write_store(directory, ["a.jpg"], boxes, [0, rows], [[1000, 1000]], [RULE_PAPER], [rows], {})
    return directory / "boxes.npy"


def test_big_file_overwritten_at_the_same_size_is_caught_on_open(tmp_path, monkeypatch):
    boxes = big_store(tmp_path / "s", monkeypatch)
    entry = json.loads((tmp_path / "s" / "manifest.json").read_text())["files"]["boxes.npy"]
    assert entry["sample"] == [1 << 10, 8] and "sample_sha256" in entry and entry["bytes"] > 64 << 10
    assert "sample" not in json.loads((tmp_path / "s" / "manifest.json").read_text())["files"]["offsets.npy"]
    data = boxes.read_bytes()
    load(tmp_path / "s")
    # Another store's boxes of the same size (the same header, other values): caught.
    other = bytearray(data)
    other[128:] = np.random.default_rng(1).integers(0, 1000, (len(data) - 128) // 2).astype(np.int16).tobytes()
    boxes.write_bytes(bytes(other))
    with pytest.raises(PathError, match="boxes.npy does not match its checksum"):
        load(tmp_path / "s")
    # One byte between the sampled blocks: only the full check sees it (the documented trade-off).
    between = bytearray(data)
    between[len(data) // 2 + 5000] ^= 1
    boxes.write_bytes(bytes(between))
    load(tmp_path / "s")
    with pytest.raises(PathError, match="boxes.npy does not match its sha256"):
        verify_store(tmp_path / "s")


def test_store_without_sampled_hashes_is_hashed_in_full_on_open(tmp_path, monkeypatch):
    boxes = big_store(tmp_path / "s", monkeypatch)
    mpath = tmp_path / "s" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for entry in manifest["files"].values():  # as written before sampled hashes existed
        entry.pop("sample", None), entry.pop("sample_sha256", None)
    mpath.write_text(json.dumps(manifest))
    load(tmp_path / "s")
    data = bytearray(boxes.read_bytes())
    data[len(data) // 2 + 5000] ^= 1
    boxes.write_bytes(bytes(data))
    with pytest.raises(PathError, match="boxes.npy does not match its checksum"):
        load(tmp_path / "s")


def test_soco_proposals_verify(tmp_path, capsys):
    d = tmp_path / "s"
    make_store(d)
    assert verify_store(d) == 6
    assert main(["proposals", "verify", str(d)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("ok: 6 files verified")
    data = bytearray((d / "status.npy").read_bytes())
    data[-1] ^= 1
    (d / "status.npy").write_bytes(bytes(data))
    assert main(["proposals", "verify", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("soco: error:") and "status.npy" in err[0] and str(d) in err[0]
    assert main(["proposals", "verify", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_file_keys_round_trip_and_an_older_store_reads_them_as_unknown(tmp_path):
    keys = np.array([[1200, 10**18], [34, 5], [-1, -1], [-1, -1]])
    digests = np.zeros((4, 32), np.uint8)
    digests[0] = np.frombuffer(bytes(range(32)), np.uint8)
    paths, *_ = make_store(tmp_path / "old")
    rng = np.random.default_rng(1)
    per_image = [rng.integers(0, 500, (k, 4)) for k in (3, 0, 5, 0)]
    args = (paths, np.concatenate(per_image), [0, 3, 3, 8, 8], [[640, 480], [20, 10], [500, 300], [0, 0]])
    write_store(tmp_path / "new", *args, [0, 0, 0, RULE_FAILED], [1, 1, 1, 0], {}, keys, digests)
    new = load(tmp_path / "new", verify=True)
    assert new.has_file_keys and {"file_keys.npy", "file_sha256.npy"} <= set(new.manifest["files"])
    assert new.file_key(0) == (1200, 10**18) and new.file_key(2) is None
    assert new.file_sha256(0) == bytes(range(32)).hex() and new.file_sha256(1) is None
    assert np.array_equal(new.file_keys(), keys) and np.array_equal(new.file_digests(), digests)
    assert pickle.loads(pickle.dumps(new)).file_key(1) == (34, 5)
    # A store of an older version: no key files, every key unknown; it loads and verifies as before.
    old = load(tmp_path / "old", verify=True)
    assert not old.has_file_keys and old.file_key(0) is None and old.file_sha256(0) is None
    assert (old.file_keys() == -1).all() and not old.file_digests().any() and "file_keys" not in old.arrays()
    # A rewrite without keys leaves none of the old ones behind.
    write_store(tmp_path / "new", *args, [0, 0, 0, RULE_FAILED], [1, 1, 1, 0], {})
    assert not (tmp_path / "new" / "file_keys.npy").exists() and not load(tmp_path / "new").has_file_keys
    # The key files are checked like the others.
    write_store(tmp_path / "new", *args, [0, 0, 0, RULE_FAILED], [1, 1, 1, 0], {}, keys, digests)
    data = bytearray((tmp_path / "new" / "file_keys.npy").read_bytes())
    data[-1] ^= 1
    (tmp_path / "new" / "file_keys.npy").write_bytes(bytes(data))
    with pytest.raises(PathError, match="file_keys.npy does not match its checksum"):
        load(tmp_path / "new")
