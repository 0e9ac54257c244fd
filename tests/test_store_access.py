"""The proposal store's public accessors (per image and whole-store), and the two stages that
used to read its files behind its back: the dataset's join and viz's statistics."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from data_fixtures import make_photos, make_store

from soco_pretrain.data.dataset import join_store
from soco_pretrain.errors import PathError
from soco_pretrain.images import list_images
from soco_pretrain.proposals.filters import RULE_FAILED, RULE_PAPER, RULE_WHOLE_IMAGE
from soco_pretrain.proposals.store import load, write_store
from soco_pretrain.viz import proposal_stats

PER_IMAGE = (3, 0, 5, 0, 2)
STATUS = (RULE_PAPER, RULE_WHOLE_IMAGE, RULE_PAPER, RULE_FAILED, RULE_PAPER)


@pytest.fixture
def written(tmp_path):
    rng = np.random.default_rng(4)
    paths = ["a/1.jpg", "a/2.jpg", "b/3.png", "bad.jpg", "c/4.jpg"]
    per_image = [np.sort(rng.integers(0, 900, (k, 4)), axis=1) for k in PER_IMAGE]
    offsets = np.concatenate([[0], np.cumsum(PER_IMAGE)])
    sizes = np.array([[640, 480], [20, 10], [900, 300], [0, 0], [33, 44]])
    write_store(tmp_path / "s", paths, np.concatenate(per_image), offsets, sizes, STATUS, [9, 1, 9, 0, 9], {})
    return tmp_path / "s", per_image, sizes


def test_per_image_and_whole_store_accessors_agree_with_what_was_written(written):
    directory, per_image, sizes = written
    st = load(directory)
    assert [st.count(i) for i in range(len(st))] == list(PER_IMAGE)
    assert st.count(-1) == PER_IMAGE[-1]
    with pytest.raises(IndexError):
        st.count(len(st))
    assert st.counts().tolist() == list(PER_IMAGE) and st.counts().dtype == np.int64
    assert st.statuses().tolist() == list(STATUS) and st.statuses().dtype == np.uint8
    assert st.sizes().tolist() == sizes.tolist()
    assert st.num_boxes == sum(PER_IMAGE)
    for i in range(len(st)):
        assert st.statuses()[i] == st.status(i) and tuple(st.sizes()[i]) == st.image_size(i)


@pytest.mark.parametrize("rows", [1, 3, 4, 10, 1000])
def test_box_chunks_cover_every_box_in_order(written, rows):
    directory, per_image, _ = written
    st = load(directory)
    chunks = list(st.box_chunks(rows))
    assert all(len(c) <= rows and c.dtype == np.int32 for c in chunks)
    assert len(chunks) == -(-sum(PER_IMAGE) // rows)
    np.testing.assert_array_equal(np.concatenate(chunks), np.concatenate(per_image))
    with pytest.raises(ValueError):
        next(st.box_chunks(0))


def test_accessors_return_copies_and_work_after_pickling(written):
    directory, per_image, _ = written
    st = load(directory)
    status = st.statuses()
    status[:] = RULE_FAILED
    chunk = next(st.box_chunks(2))
    chunk[:] = -1
    assert st.statuses().tolist() == list(STATUS)
    np.testing.assert_array_equal(next(st.box_chunks(2)), np.concatenate(per_image)[:2])
    again = pickle.loads(pickle.dumps(st))
    assert again.counts().tolist() == list(PER_IMAGE) and again.num_boxes == st.num_boxes


def test_empty_store_accessors(tmp_path):
    write_store(tmp_path / "e", [], np.zeros((0, 4)), [0], np.zeros((0, 2)), [], [], {})
    st = load(tmp_path / "e")
    assert st.counts().shape == (0,) and st.statuses().shape == (0,) and st.sizes().shape == (0, 2)
    assert st.num_boxes == 0 and list(st.box_chunks(5)) == []


def test_dataset_join_reads_status_and_counts_through_the_store(tmp_path):
    rel = make_photos(tmp_path / "imgs", names=("astronaut", "coffee", "chelsea", "rocket"), side=48)
    store = load(
        make_store(tmp_path / "s", tmp_path / "imgs", rel[:3], boxes_per_image=2, failed=(rel[1],), empty=(rel[2],))
    )
    join = join_store(list_images(tmp_path / "imgs"), store)
    images = list_images(tmp_path / "imgs").paths
    by_path = dict(zip(images, join.missing.tolist()))
    assert by_path == {rel[0]: False, rel[1]: True, rel[2]: True, rel[3]: True}
    assert join.reasons == {"not in the store": 1, "failed": 1, "0 boxes": 1}


def test_viz_statistics_open_the_store_with_its_checks(written, tmp_path):
    directory, per_image, _ = written
    stats = proposal_stats(directory)  # a directory is opened as a store
    assert stats["images"] == 5 and stats["failed"] == 1 and stats["boxes"] == sum(PER_IMAGE)
    assert stats["_per_image"].tolist() == [3, 0, 5, 2]
    # A folder of the store's arrays without its manifest is not a store: refused, not read.
    copy = tmp_path / "arrays_only"
    shutil.copytree(directory, copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(PathError, match="no manifest.json"):
        proposal_stats(copy)
    # A boxes file that no longer matches the manifest is caught by the store's size check.
    np.save(directory / "boxes.npy", np.zeros((1, 4), np.int16))
    with pytest.raises(PathError, match="boxes.npy has"):
        proposal_stats(directory)
