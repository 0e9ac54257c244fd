"""SoCoDataset: sources (folder, list file, COCO JSON), joining with the store, images without
proposals, sample fields, per-sample seeding and decode failures."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from data_fixtures import PHOTOS, corrupt, make_photos, make_store

from soco_pretrain.config import AugmentConfig, DataConfig, ViewsConfig
from soco_pretrain.data.boxes import from_store
from soco_pretrain.data.dataset import DatasetError, SoCoDataset, read_coco_images
from soco_pretrain.errors import PathError, UserError
from soco_pretrain.images import list_images
from soco_pretrain.proposals.store import load


def config(**views) -> DataConfig:
    """Paper defaults with the photometric augmentation off (views as plain uint8 is "gpu")."""
    return DataConfig(views=ViewsConfig(**views), augment=AugmentConfig(enabled=False))


def raw_config(**views) -> DataConfig:
    """Workers only crop and resize: uint8 views (the GPU-augmentation path)."""
    return DataConfig(views=ViewsConfig(**views), augment=AugmentConfig(device="gpu"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(images folder, store dir): six photos in two subfolders, a store for all of them."""
    root = tmp_path_factory.mktemp("ds")
    images = root / "images"
    paths = make_photos(images, PHOTOS[:3], subdir="a") + make_photos(images, PHOTOS[3:], subdir="b")
    store = make_store(root / "store", images, paths)
    return images, store


# ---------------------------------------------------------------- sample fields


@pytest.mark.parametrize("soco_star", [False, True])
def test_sample_fields_shapes_and_dtypes(data, soco_star):
    images, store = data
    ds = SoCoDataset(images, store, config(soco_star=soco_star))
    sizes = [224, 224, 112] + ([192] if soco_star else [])
    assert len(ds) == len(PHOTOS)
    s = ds[2]
    assert len(s["views"]) == len(s["boxes"]) == len(s["levels"]) == len(sizes)
    for view, boxes, levels, size in zip(s["views"], s["boxes"], s["levels"], sizes):
        assert view.shape == (3, size, size) and view.dtype == torch.float32
        assert boxes.shape == (4, 4) and boxes.dtype == torch.float32
        assert levels.shape == (4,) and levels.dtype == torch.int64
        # Continuous boxes inside the view, non-empty.
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert ((levels >= 0) & (levels <= 3)).all()
    assert s["valid"].dtype == torch.bool and s["valid"].shape == (4,) and s["valid"].all()
    assert s["proposal_ids"].dtype == torch.int64 and ((s["proposal_ids"] >= 0) & (s["proposal_ids"] < 6)).all()
    assert s["index"] == 2 and s["path"] == ds.images.paths[2] and s["skipped"] == []


def test_augmentation_off_gives_normalised_plain_pixels(data):
    images, store = data
    cfg = config()
    plain = SoCoDataset(images, store, cfg)[0]
    raw = SoCoDataset(images, store, dataclasses.replace(cfg, augment=AugmentConfig(enabled=False, device="gpu")))[0]
    mean = torch.tensor(cfg.augment.mean).view(3, 1, 1)
    std = torch.tensor(cfg.augment.std).view(3, 1, 1)
    for p, r in zip(plain["views"], raw["views"]):
        assert r.dtype == torch.uint8
        torch.testing.assert_close(p, (r.float() / 255 - mean) / std, atol=1e-5, rtol=0)


def test_gpu_device_returns_uint8_views_with_the_same_geometry(data):
    images, store = data
    a = SoCoDataset(images, store, config())[3]
    b = SoCoDataset(images, store, raw_config())[3]
    assert all(v.dtype == torch.uint8 for v in b["views"])
    for x, y in zip(a["boxes"], b["boxes"]):
        assert torch.equal(x, y)
    assert torch.equal(a["valid"], b["valid"])


def test_boxes_come_from_the_right_image(data):
    images, store_dir = data
    store = load(store_dir)
    ds = SoCoDataset(images, store, config())
    for i, path in enumerate(ds.images.paths):
        raw = ds.raw(i)
        np.testing.assert_array_equal(raw.boxes, from_store(store.boxes(store.index(path))))
        assert raw.image.shape[1::-1] == store.image_size(store.index(path))


# ---------------------------------------------------------------- sources


def test_list_file_source_joins_by_relative_path(data):
    images, store = data
    listing = images / "subset.txt"
    listing.write_text("b/rocket.png\n# comment\n./a/coffee.png\n")
    ds = SoCoDataset(listing, store, config())
    assert ds.images.paths == ["a/coffee.png", "b/rocket.png"]
    assert [load(store).paths[r] for r in ds.rows] == ds.images.paths


def test_coco_json_source_joins_with_the_store(data, tmp_path):
    images, store_dir = data
    store = load(store_dir)
    ann = tmp_path / "annotations" / "instances.json"
    ann.parent.mkdir()
    ann.write_text(
        json.dumps(
            {
                "images": [
                    {"id": 7, "file_name": "b/coins.png", "width": 1, "height": 1},
                    {"id": 3, "file_name": "./a/chelsea.png"},
                ],
                "annotations": [{"id": 1, "image_id": 7, "bbox": [0, 0, 1, 1]}],
            }
        )
    )
    ds = SoCoDataset(ann, store, config(), image_root=images)
    assert ds.images.paths == ["a/chelsea.png", "b/coins.png"]
    assert ds.images.root == images.resolve()
    for i, path in enumerate(ds.images.paths):
        assert ds.rows[i] == store.index(path)
        np.testing.assert_array_equal(ds.raw(i).boxes, from_store(store.boxes(store.index(path))))


def test_coco_json_file_names_default_to_the_json_folder(data):
    images, store = data
    ann = images / "a" / "few.json"
    ann.write_text(json.dumps({"images": [{"file_name": "coffee.png"}]}))
    listed = read_coco_images(ann)
    assert listed.root == (images / "a").resolve() and listed.paths == ["coffee.png"]
    # Relative to images/a, "coffee.png" is not a store path (the store has "a/coffee.png").
    with pytest.raises(DatasetError, match="1 of 1 images have no proposals"):
        SoCoDataset(ann, store, config())


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "cannot read COCO JSON"),
        (json.dumps({"annotations": []}), "no 'images' list"),
        (json.dumps({"images": [{"id": 1}]}), "images[0] has no 'file_name'"),
    ],
)
def test_bad_coco_json_is_a_one_line_error_naming_the_file(tmp_path, content, problem):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(PathError) as exc:
        read_coco_images(bad)
    assert str(bad) in str(exc.value) and problem in str(exc.value) and "\n" not in str(exc.value)


def test_image_root_with_a_folder_source_is_an_error(data):
    images, store = data
    with pytest.raises(UserError, match="COCO JSON sources only"):
        SoCoDataset(images, store, config(), image_root=images)


def test_an_image_list_object_is_accepted(data):
    images, store = data
    ds = SoCoDataset(list_images(images), store, config())
    assert len(ds) == len(PHOTOS)


# ---------------------------------------------------------------- images without proposals


@pytest.fixture
def partial(tmp_path):
    """A folder of 6 photos whose store lacks 2, has 1 failed and 1 with 0 boxes."""
    images = tmp_path / "images"
    paths = sorted(make_photos(images, PHOTOS, side=120))
    store = make_store(tmp_path / "store", images, paths[2:], failed={paths[2]}, empty={paths[3]})
    return images, store, paths


def test_missing_proposals_error_counts_and_names_them(partial):
    images, store, paths = partial
    with pytest.raises(DatasetError) as exc:
        SoCoDataset(images, store, config())
    message = str(exc.value)
    assert "\n" not in message
    assert "4 of 6 images have no proposals (not in store: 2, failed: 1, empty: 1)" in message
    assert all(p in message for p in paths[:4]) and "views.no_proposals=whole_image" in message
    assert sorted(exc.value.paths) == sorted(paths[:4])


def test_missing_proposals_error_lists_the_first_few(tmp_path):
    images = tmp_path / "images"
    paths = make_photos(images, PHOTOS, side=80)
    store = make_store(tmp_path / "store", images, paths[:1])
    for k in range(4):  # 4 more images not in the store, 9 without proposals in all
        (images / f"copy{k}.png").write_bytes((images / paths[0]).read_bytes())
    with pytest.raises(DatasetError, match=r"9 of 10 images .* and 4 more;") as exc:
        SoCoDataset(images, store, config())
    assert len(exc.value.paths) == 9


def test_most_images_not_in_the_store_is_refused_whatever_no_proposals(tmp_path):
    # A store made from other images: with no_proposals=whole_image, training would silently
    # run on whole images only. Refused; whole-image training is views.proposal_source=whole_image.
    images = tmp_path / "images"
    paths = sorted(make_photos(images, PHOTOS[:3], side=80))
    store = make_store(tmp_path / "store", images, paths[:1])  # 2 of 3 images are not in it
    for no_proposals in ("error", "whole_image"):
        with pytest.raises(DatasetError) as exc:
            SoCoDataset(images, store, config(no_proposals=no_proposals))
        message = str(exc.value)
        assert (
            "\n" not in message and "2 of 3 images have no proposals (not in store: 2, failed: 0, empty: 0)" in message
        )
        assert "make a store for these images" in message and "views.proposal_source=whole_image" in message
        assert sorted(exc.value.paths) == paths[1:]
    assert len(SoCoDataset(images, store, config(proposal_source="whole_image"))) == 3
    # One of 3 not in the store (not most) is still served with whole_image.
    store = make_store(tmp_path / "store2", images, paths[:1] + paths[2:])
    assert len(SoCoDataset(images, store, config(no_proposals="whole_image"))) == 3


def test_whole_image_option_uses_the_image_as_the_single_proposal(partial, capsys):
    images, store, paths = partial
    ds = SoCoDataset(images, store, config(no_proposals="whole_image", jitter="none"))
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "have no proposals" in line] == [
        "4 of 6 images have no proposals (not in store: 2, failed: 1, empty: 1): "
        "they use the whole image (views.no_proposals=whole_image)"
    ]
    assert sorted(ds.without_proposals) == sorted(paths[:4])
    for i in range(len(ds)):
        s = ds[i]
        if ds.images.paths[i] in ds.without_proposals:
            assert s["valid"].tolist() == [True, False, False, False]
            assert s["proposal_ids"].tolist() == [0, -1, -1, -1]
            # V1 is the whole image squashed: the whole-image proposal is the whole of V1.
            assert s["boxes"][0][0].tolist() == [0, 0, 224, 224]
            assert s["levels"][0][0] == 3  # 224^2 > 192^2 -> P5
        else:  # real proposals: the first slot is always one (padding comes last)
            assert s["valid"][0] and (s["proposal_ids"][s["valid"]] >= 0).all()


# ---------------------------------------------------------------- seeding


def test_same_seed_same_sample_and_epoch_or_seed_change_it(data):
    images, store = data
    ds = SoCoDataset(images, store, DataConfig())  # photometric augmentation on
    a, b = ds[1], ds[1]
    for x, y in zip(a["views"] + a["boxes"], b["views"] + b["boxes"]):
        assert torch.equal(x, y)
    ds.set_epoch(1)
    c = ds[1]
    assert not torch.equal(a["views"][1], c["views"][1])
    assert not all(torch.equal(x, y) for x, y in zip(a["boxes"], c["boxes"]))
    # The loader's (epoch, index) keys give exactly ds[index] at that epoch.
    d = ds[(0, 1)]
    assert all(torch.equal(x, y) for x, y in zip(a["views"], d["views"]))
    other = SoCoDataset(images, store, dataclasses.replace(DataConfig(), seed=5))[1]
    assert not torch.equal(a["views"][0], other["views"][0])


def test_samples_do_not_depend_on_access_order(data):
    images, store = data
    ds = SoCoDataset(images, store, raw_config())
    forward = [ds[i]["boxes"][1] for i in range(len(ds))]
    backward = [ds[i]["boxes"][1] for i in reversed(range(len(ds)))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(forward, backward))


# ---------------------------------------------------------------- decode failures


@pytest.fixture
def broken(tmp_path):
    """Six photos with a store; then one file truncated and one replaced by a resized copy."""
    images = tmp_path / "images"
    paths = sorted(make_photos(images, PHOTOS, side=120))  # dataset order
    store = make_store(tmp_path / "store", images, paths)
    corrupt(images / paths[1])
    make_photos(images, [paths[3][:-4]], side=90)  # same name, other size: stale proposals
    return images, store, paths


def test_unreadable_image_is_replaced_recorded_and_logged(broken, caplog):
    images, store, paths = broken
    ds = SoCoDataset(images, store, config())
    with caplog.at_level(logging.WARNING, logger="soco_pretrain.data"):
        s = ds[1]
    assert s["index"] == 2 and s["path"] == paths[2]
    assert len(s["skipped"]) == 1
    path, reason = s["skipped"][0]
    assert path == str(images / paths[1]) and "truncated" in reason
    assert any(paths[1] in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    assert ds[0]["skipped"] == []


def test_image_changed_since_the_store_was_made_is_skipped(broken):
    images, store, paths = broken
    s = SoCoDataset(images, store, config())[3]
    assert s["index"] == 4
    assert s["skipped"][0][0] == str(images / paths[3])
    assert "proposal store has" in s["skipped"][0][1]


def test_an_image_of_another_size_than_the_store_is_rerouted_with_a_counted_notice(broken, caplog):
    # A photo replaced under the same name: its stored boxes belong to another picture. With
    # no_proposals=whole_image it is trained on the whole image, counted and said once.
    from soco_pretrain.data import SkipLog, soco_collate

    images, store, paths = broken
    ds = SoCoDataset(images, store, config(no_proposals="whole_image", jitter="none"))
    with caplog.at_level(logging.WARNING, logger="soco_pretrain.data"):
        s, again, other = ds[3], ds[(1, 3)], ds[4]
    assert s["index"] == 3 and s["path"] == paths[3] and s["skipped"] == []  # not replaced by the next image
    assert s["valid"].tolist() == [True, False, False, False] and s["boxes"][0][0].tolist() == [0, 0, 224, 224]
    path, reason = s["rerouted"][0]
    assert len(s["rerouted"]) == 1 and path == str(images / paths[3])
    assert "decodes to 90x" in reason and "but the proposal store has 120x" in reason
    assert "rerun soco proposals" in reason
    assert other["rerouted"] == [] and ds.rerouted == 2
    said = [r.getMessage() for r in caplog.records if "whole image" in r.getMessage()]
    assert len(said) == 1 and paths[3] in said[0]  # once per process, however often it is met
    log = SkipLog()
    log.update(soco_collate([s, other]))
    log.update(soco_collate([again]))
    assert len(log) == 0 and log.rerouted[str(images / paths[3])] == 2
    line = log.rerouted_line()
    assert "\n" not in line and line.startswith("1 images decoded to another size than the proposal store records")
    assert "trained on the whole image 2 times" in line and paths[3] in line
    assert log.summary().splitlines() == ["skipped images: none", line]
    # The device-decode path (header sizes) re-routes it the same way.
    planned = SoCoDataset(images, store, dataclasses.replace(config(no_proposals="whole_image"), decode="device"))[3]
    assert planned["index"] == 3 and [p for p, _ in planned["rerouted"]] == [str(images / paths[3])]


def test_an_older_store_without_file_keys_is_warned_about_once(tmp_path, capsys):
    images = tmp_path / "images"
    paths = make_photos(images, PHOTOS[:2], side=80)
    store = make_store(tmp_path / "store", images, paths, keys=False)
    SoCoDataset(images, store, config())
    SoCoDataset(images, store, config())
    err = [line for line in capsys.readouterr().err.splitlines() if "file keys" in line]
    assert err == [
        f"soco: warning: {store}: made by an older soco-pretrain without file keys: a photo replaced since is "
        f"caught only when its pixel size differs; rerun soco proposals IMAGES -o {store} to check every image "
        "and record them"
    ]
    SoCoDataset(images, make_store(tmp_path / "new", images, paths), config())
    assert "file keys" not in capsys.readouterr().err


def test_consecutive_failures_chain_and_wrap_around(broken):
    images, store, paths = broken
    corrupt(images / paths[5])
    corrupt(images / paths[0])
    s = SoCoDataset(images, store, config())[5]
    assert s["index"] == 2  # 5 -> 0 -> 1 (all broken) -> 2
    assert [p for p, _ in s["skipped"]] == [str(images / paths[k]) for k in (5, 0, 1)]


def test_too_many_failures_is_a_clear_error(broken):
    images, store, paths = broken
    cfg = dataclasses.replace(config(), max_decode_retries=0)
    with pytest.raises(PathError, match=r"1 images in a row from index 1 failed to decode"):
        SoCoDataset(images, store, cfg)[1]


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda: DataConfig(augment=AugmentConfig(device="tpu")), 'device="tpu": must be one of auto, cpu, gpu'),
        (lambda: DataConfig(views=ViewsConfig(no_proposals="skip")), 'no_proposals="skip": must be one of'),
        (lambda: DataConfig(views=ViewsConfig(pad="zeros")), 'pad="zeros": must be one of mask, repeat'),
        (
            lambda: DataConfig(views=ViewsConfig(soco_star=True), augment=AugmentConfig(view_params=(0, 1, 1))),
            r"augment.view_params=\[0, 1, 1\]: names 3 views; 4 are built",
        ),
        (lambda: DataConfig(views=ViewsConfig(proposal_source="coco")), "needs views.proposal_json"),
    ],
)
def test_bad_config_is_a_one_line_error_before_any_data_is_read(make, problem):
    with pytest.raises(UserError, match=problem) as info:
        make()
    assert "\n" not in str(info.value)


def test_index_out_of_range(data):
    images, store = data
    ds = SoCoDataset(images, store, raw_config())
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds[-1]["index"] == len(ds) - 1
