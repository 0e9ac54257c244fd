"""Loader: collate, make_loader (workers, seeding, epochs, distributed), skipped-file log, GPU path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from data_fixtures import PHOTOS, corrupt, make_photos, make_store
from torch.utils.data import DistributedSampler

from soco_pretrain.config import AugmentConfig, DataConfig, ViewsConfig
from soco_pretrain.data.dataset import SoCoDataset
from soco_pretrain.data.loader import SkipLog, augment_batch, make_loader, set_epoch, soco_collate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    images = root / "images"
    paths = make_photos(images, PHOTOS, side=128)
    # Two boxes per image: with K=4 every sample has two padded slots.
    store = make_store(root / "store", images, paths, boxes_per_image=2)
    return images, store


def dataset(data, **kwargs):
    images, store = data
    return SoCoDataset(images, store, DataConfig(**kwargs))


def batches(loader, epochs=(0, 1)):
    out = []
    for epoch in epochs:
        set_epoch(loader, epoch)
        out.append(list(loader))
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and x["paths"] == y["paths"]
        for key in ("views", "boxes", "levels"):
            assert all(torch.equal(u, v) for u, v in zip(x[key], y[key])), key
        assert torch.equal(x["valid"], y["valid"]) and torch.equal(x["proposal_ids"], y["proposal_ids"])


# ---------------------------------------------------------------- collate


def test_collate_shapes_dtypes_and_valid_mask(data):
    ds = dataset(data, views=ViewsConfig(soco_star=True))
    batch = soco_collate([ds[0], ds[3], ds[5]])
    sizes = [224, 224, 112, 192]
    assert [tuple(v.shape) for v in batch["views"]] == [(3, 3, s, s) for s in sizes]
    assert all(v.dtype == torch.float32 for v in batch["views"])
    assert [tuple(b.shape) for b in batch["boxes"]] == [(3, 4, 4)] * 4
    assert all(b.dtype == torch.float32 for b in batch["boxes"])
    assert [tuple(lv.shape) for lv in batch["levels"]] == [(3, 4)] * 4
    assert all(lv.dtype == torch.int64 for lv in batch["levels"])
    assert batch["valid"].dtype == torch.bool and batch["valid"].shape == (3, 4)
    # Two proposals per image, K=4: slots 2 and 3 padded in every sample, ids -1 there.
    assert batch["valid"].tolist() == [[True, True, False, False]] * 3
    assert (batch["proposal_ids"][:, 2:] == -1).all() and (batch["proposal_ids"][:, :2] >= 0).all()
    assert batch["index"].dtype == torch.int64 and batch["index"].tolist() == [0, 3, 5]
    assert batch["paths"] == [ds.images.paths[i] for i in (0, 3, 5)]
    assert batch["skipped"] == []
    # Sample k's tensors are row k of the batch.
    s = ds[3]
    assert torch.equal(batch["views"][2][1], s["views"][2]) and torch.equal(batch["boxes"][1][1], s["boxes"][1])


def test_collate_concatenates_skipped():
    def sample(skipped):
        return {
            "views": [torch.zeros(3, 2, 2)],
            "boxes": [torch.zeros(1, 4)],
            "levels": [torch.zeros(1, dtype=torch.int64)],
            "valid": torch.ones(1, dtype=torch.bool),
            "proposal_ids": torch.zeros(1, dtype=torch.int64),
            "index": 0,
            "path": "x",
            "skipped": skipped,
        }

    batch = soco_collate([sample([("a", "bad")]), sample([]), sample([("b", "worse"), ("c", "x")])])
    assert batch["skipped"] == [("a", "bad"), ("b", "worse"), ("c", "x")]


# ---------------------------------------------------------------- make_loader


def test_same_seed_same_batches_with_0_and_2_workers(data):
    ds = dataset(data)
    serial = make_loader(ds, batch_size=2, workers=0, seed=3)
    parallel = make_loader(dataset(data), batch_size=2, workers=2, seed=3)
    assert parallel.persistent_workers and not parallel.pin_memory  # no CUDA here
    a, b = batches(serial), batches(parallel)
    assert_same_batches(a[0], b[0])
    # Epoch 1 reaches the persistent workers (they keep their dataset copy between epochs).
    assert_same_batches(a[1], b[1])
    assert len(a[0]) == len(PHOTOS) // 2


def test_epochs_reshuffle_and_redraw_views(data):
    loader = make_loader(dataset(data), batch_size=3, workers=0, seed=0)
    e0, e1 = batches(loader)
    order0 = torch.cat([b["index"] for b in e0]).tolist()
    order1 = torch.cat([b["index"] for b in e1]).tolist()
    assert sorted(order0) == sorted(order1) == list(range(len(PHOTOS)))
    assert order0 != order1
    # The same image gets different views in another epoch.
    first0 = {i: b for b in e0 for i in b["index"].tolist()}
    i = order1[0]
    k0 = first0[i]["index"].tolist().index(i)
    assert not torch.equal(first0[i]["views"][1][k0], e1[0]["views"][1][0])
    # Another seed, another order.
    other = make_loader(dataset(data), batch_size=3, workers=0, seed=1)
    assert torch.cat([b["index"] for b in list(other)]).tolist() != order0


def test_no_shuffle_and_drop_last(data):
    loader = make_loader(dataset(data), batch_size=4, workers=0, shuffle=False, drop_last=False)
    got = [b["index"].tolist() for b in loader]
    assert got == [[0, 1, 2, 3], [4, 5]]
    assert len(list(make_loader(dataset(data), batch_size=4, workers=0))) == 1  # drop_last


def test_distributed_sampler_splits_the_data_between_ranks(data, monkeypatch):
    with pytest.raises(RuntimeError, match="torch.distributed"):
        make_loader(dataset(data), batch_size=1, workers=0, distributed=True)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        loader = make_loader(dataset(data), batch_size=1, workers=0, seed=4)  # distributed=None: auto
        assert isinstance(loader.sampler.sampler, DistributedSampler)
        assert loader.sampler.sampler.num_replicas == 2 and loader.sampler.sampler.rank == rank
        monkeypatch.undo()
        seen.append([b["index"].item() for b in loader])
    assert len(seen[0]) == len(seen[1]) == len(PHOTOS) // 2
    assert sorted(seen[0] + seen[1]) == list(range(len(PHOTOS)))


# ---------------------------------------------------------------- skipped files


def test_bad_image_in_a_worker_is_skipped_counted_and_listed(tmp_path):
    images = tmp_path / "images"
    paths = make_photos(images, PHOTOS, side=100)
    store = make_store(tmp_path / "store", images, paths)
    corrupt(images / paths[2])
    ds = SoCoDataset(images, store, DataConfig(augment=AugmentConfig(device="gpu")))
    loader = make_loader(ds, batch_size=3, workers=2, seed=0, persistent_workers=False)
    skips = SkipLog()
    new = []
    for epoch in (0, 1):
        set_epoch(loader, epoch)
        for batch in loader:
            new += skips.update(batch)
            assert batch["index"].shape == (3,)
    bad = str(images / paths[2])
    assert new == [(bad, skips.reasons[bad])] and "truncated" in skips.reasons[bad]
    assert skips.count == 2 and len(skips) == 1  # once per epoch, one file
    summary = skips.summary()
    assert "2 times, 1 files" in summary and bad in summary and "(x2)" in summary
    assert SkipLog().summary() == "skipped images: none"


# ---------------------------------------------------------------- GPU photometric path


def test_augment_batch_turns_uint8_views_into_normalised_floats(data):
    from soco_pretrain.data.augment import BatchAugment

    cfg = DataConfig(augment=AugmentConfig(device="gpu"))
    loader = make_loader(SoCoDataset(*data, cfg), batch_size=3, workers=0)
    batch = next(iter(loader))
    assert all(v.dtype == torch.uint8 for v in batch["views"])
    out = augment_batch(
        batch, BatchAugment(cfg.augment), cfg.augment.view_params, torch.Generator().manual_seed(0), device="cpu"
    )
    assert [v.shape for v in out["views"]] == [v.shape for v in batch["views"]]
    assert all(v.dtype == torch.float32 for v in out["views"])
    # Photometric only: the geometry (boxes, levels, masks, ids) comes through unchanged.
    for key in ("boxes", "levels"):
        assert len(out[key]) == len(batch[key]) and all(torch.equal(a, b) for a, b in zip(out[key], batch[key])), key
    for key in ("valid", "proposal_ids"):
        assert torch.equal(out[key], batch[key]), key
    # Off: exactly the normalised pixels.
    off = dataclasses.replace(cfg.augment, enabled=False)
    plain = augment_batch(batch, BatchAugment(off), off.view_params)
    mean = torch.tensor(off.mean).view(1, 3, 1, 1)
    std = torch.tensor(off.std).view(1, 3, 1, 1)
    for v in range(len(batch["views"])):
        torch.testing.assert_close(plain["views"][v], (batch["views"][v].float() / 255 - mean) / std, atol=1e-5, rtol=0)
    # On: the pixels were changed (BYOL's first parameter set blurs with probability 1).
    assert not torch.allclose(out["views"][0], plain["views"][0], atol=1e-3)
