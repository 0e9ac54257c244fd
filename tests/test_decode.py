"""data.decode="device": workers ship JPEG bytes and a render plan, data/decode.py's render_batch
decodes and renders the views (here on the CPU device) exactly as the workers would have.

Small real photos (skimage) saved as RGB JPEG, grey JPEG and PNG; a proposal store written
directly. Cheap: about 2 s on 2 cores.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import skimage.data
import torch
from data_fixtures import make_store
from PIL import Image

from soco_pretrain.config import AugmentConfig, ConfigError, DataConfig, ViewsConfig
from soco_pretrain.data import SoCoDataset, make_loader, soco_collate
from soco_pretrain.data.decode import has_encoded, render_batch

pytestmark = pytest.mark.usefixtures("one_thread")

# Measured max |device - worker| over every view and pixel here: 0 (PIL and torchvision's CPU
# decode_jpeg are both libjpeg-turbo; the resize is the same torch kernel). Kept at 0: any
# difference on the CPU would be a real divergence of the two paths.
TOLERANCE = 0

# name -> (skimage photo, format, PIL mode)
FILES = {
    "astronaut.jpg": ("astronaut", "JPEG", "RGB"),
    "camera.jpg": ("camera", "JPEG", "L"),  # grey JPEG: its bytes are shipped too
    "chelsea.jpg": ("chelsea", "JPEG", "RGB"),
    "coffee.png": ("coffee", "PNG", "RGB"),  # decoded in the worker, pixels shipped
}


def write_photo(path, name: str, fmt: str, mode: str, side: int = 150) -> None:
    im = Image.fromarray(getattr(skimage.data, name)()).convert(mode)
    scale = side / max(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    im.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(images folder, store, sorted relative paths)."""
    root = tmp_path_factory.mktemp("decode")
    images = root / "images"
    images.mkdir()
    for file, spec in FILES.items():
        write_photo(images / file, *spec)
    paths = sorted(FILES)
    return images, make_store(root / "store", images, paths), paths


def configs(decode: str, **views) -> DataConfig:
    """uint8 views from the worker ("gpu" augmentation), small views to keep it quick."""
    views = {"v1_size": 96, "v2_size": 96, "v3_size": 48, "v4_size": 64, "num_proposals": 3, **views}
    return DataConfig(views=ViewsConfig(**views), augment=AugmentConfig(device="gpu"), decode=decode, seed=3)


VIEW_OPTIONS = [
    {},  # paper: crops of V1, V3 = V2 downsampled
    {"v2_source": "original", "v3": "independent_crop", "soco_star": True, "pad": "repeat"},
]


@pytest.mark.parametrize("views", VIEW_OPTIONS)
def test_device_views_equal_the_workers_views(photos, views):
    images, store, paths = photos
    worker = SoCoDataset(images, store, configs("worker", **views))
    device = SoCoDataset(images, store, configs("device", **views))
    for epoch in (0, 1):
        keys = [(epoch, i) for i in range(len(paths))]
        expected = soco_collate([worker[k] for k in keys])
        samples = [device[k] for k in keys]
        batch = soco_collate(samples)
        assert has_encoded(batch) and not has_encoded(expected)
        got = render_batch(batch, device.config.views, "cpu")
        assert got["skipped"] == [] and "encoded" not in got and "pixels" not in got
        for v, (a, b) in enumerate(zip(got["views"], expected["views"])):
            assert a.dtype == torch.uint8 and a.shape == b.shape, v
            diff = (a.int() - b.int()).abs().max().item()
            assert diff <= TOLERANCE, f"view {v}: max difference {diff}"
        for key in ("boxes", "levels"):
            assert all(torch.equal(a, b) for a, b in zip(got[key], expected[key])), key
        for key in ("valid", "proposal_ids", "index"):
            assert torch.equal(got[key], expected[key]), key
        assert got["paths"] == expected["paths"] == paths


def test_jpegs_ship_bytes_other_files_ship_pixels(photos, caplog):
    images, store, paths = photos
    ds = SoCoDataset(images, store, configs("device"))
    with caplog.at_level(logging.INFO, logger="soco_pretrain.data"):
        samples = {s["path"]: s for s in (ds[i] for i in range(len(paths)))}
        ds[paths.index("coffee.png")]  # a second PNG sample: counted, not said again
    for file in ("astronaut.jpg", "camera.jpg", "chelsea.jpg"):  # RGB and grey JPEGs
        s = samples[file]
        assert s["pixels"] is None and s["encoded"].dtype == torch.uint8 and s["encoded"].dim() == 1
        assert s["encoded"].numel() == (images / file).stat().st_size
    png = samples["coffee.png"]
    w, h = Image.open(images / "coffee.png").size
    assert png["encoded"] is None and png["pixels"].shape == (h, w, 3)
    assert png["image_size"].tolist() == [w, h] and png["file"] == str(images / "coffee.png")
    assert png["plan"].shape == (3, 8) and png["plan"].dtype == torch.int32
    said = [r for r in caplog.records if "decoded in the loader workers" in r.getMessage()]
    assert len(said) == 1 and ds.worker_decoded == 2


def test_corrupt_jpeg_is_left_out_of_the_loss_and_reported(photos, tmp_path, caplog):
    images, store, paths = photos
    broken = tmp_path / "images"
    broken.mkdir()
    for p in paths:
        (broken / p).write_bytes((images / p).read_bytes())
    data = (broken / "chelsea.jpg").read_bytes()
    (broken / "chelsea.jpg").write_bytes(data[: len(data) // 2])  # the header still parses
    cfg = configs("device")
    ds = SoCoDataset(broken, store, cfg)
    batch = soco_collate([ds[i] for i in range(len(paths))])
    assert batch["skipped"] == []  # the workers read the header only
    with caplog.at_level(logging.WARNING, logger="soco_pretrain.data"):
        got = render_batch(batch, cfg.views, "cpu")
    bad = paths.index("chelsea.jpg")
    # the decoder's reason and PIL's, both kept
    reason = "decode_jpeg on cpu: Image is incomplete or truncated; truncated image file"
    assert got["skipped"] == [(str(broken / "chelsea.jpg"), reason)]
    assert any("chelsea.jpg" in r.getMessage() for r in caplog.records)
    assert not got["valid"][bad].any() and batch["valid"][bad].all()  # the loader's batch is untouched
    assert all((view[bad] == 0).all() for view in got["views"])
    worker = SoCoDataset(images, store, dataclasses.replace(cfg, decode="worker"))
    expected = soco_collate([worker[i] for i in range(len(paths))])
    for i in range(len(paths)):
        if i != bad:
            assert torch.equal(got["valid"][i], expected["valid"][i])
            assert all(torch.equal(a[i], b[i]) for a, b in zip(got["views"], expected["views"]))


def test_device_decode_with_cpu_augmentation_is_a_one_line_error():
    with pytest.raises(ConfigError) as info:
        DataConfig(decode="device", augment=AugmentConfig(device="cpu"))
    message = str(info.value)
    assert "\n" not in message and "decode" in message and "augment.device=gpu or auto" in message
    DataConfig(decode="device", augment=AugmentConfig(device="auto"))  # auto is accepted


def test_loader_batches_render_the_workers_views(photos):
    """Batches of the loader (device decode) render to the views the worker path makes of the
    same (epoch, index): every pixel, box and slot."""
    images, store, paths = photos
    ds = SoCoDataset(images, store, configs("device", soco_star=True))
    worker = SoCoDataset(images, store, configs("worker", soco_star=True))
    loader = make_loader(ds, batch_size=2, workers=0, seed=0, drop_last=True)
    batches = list(loader)
    assert len(batches) == 2 and sorted(i for b in batches for i in b["index"].tolist()) == [0, 1, 2, 3]
    for batch in batches:
        assert has_encoded(batch) and len(batch["encoded"]) == len(batch["pixels"]) == 2
        got = render_batch(batch, ds.config.views, torch.device("cpu"))
        expected = soco_collate([worker[(0, i)] for i in batch["index"].tolist()])
        assert [tuple(v.shape) for v in got["views"]] == [(2, 3, s, s) for s in (96, 96, 48, 64)]
        assert all(torch.equal(a, b) for a, b in zip(got["views"], expected["views"]))
        assert all(torch.equal(a, b) for a, b in zip(got["boxes"], expected["boxes"]))
        assert torch.equal(got["valid"], expected["valid"]) and got["valid"].all()


# JPEG (quality 95, no chroma subsampling) of the smooth test image: max |decoded - array|
# measured 3 (RGB) and 0 (grey) here; a swapped channel order or a transposed image is off by
# well over 100.
JPEG_TOLERANCE = 4


def test_rendered_views_hold_the_files_pixels(tmp_path):
    """Known arrays saved as PNG (exact), RGB JPEG and grey JPEG (within JPEG_TOLERANCE), read as
    the loader workers read them (images.load_encoded: JPEG bytes, PNG pixels), rendered with a
    plan whose resamplings are all identities: V1 = the whole image at its own size, V2 = a crop
    of the original at its own size, flipped, V3 = V2's pixels before the flip."""
    from soco_pretrain.data.views import PLAN_CROP_ORIGINAL, PLAN_FOLLOWS, PLAN_V1, ViewPlan, plan_array
    from soco_pretrain.images import load_encoded

    side, (x0, y0, x1, y1) = 32, (4, 8, 20, 24)
    yy, xx = np.mgrid[0:side, 0:side]
    smooth = np.stack([xx * 8, yy * 6 + 20, 255 - (xx + yy) * 3], axis=-1).astype(np.uint8)
    noisy = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    Image.fromarray(smooth).save(tmp_path / "smooth.jpg", quality=95, subsampling=0)
    Image.fromarray(smooth[..., 1]).save(tmp_path / "grey.jpg", quality=95)
    sources = {"noisy.png": noisy, "smooth.jpg": smooth, "grey.jpg": np.repeat(smooth[..., 1:2], 3, axis=2)}
    plan = [
        ViewPlan(PLAN_V1, 0, 0, 0, 0, -1, 0, side),
        ViewPlan(PLAN_CROP_ORIGINAL, x0, y0, x1, y1, -1, 1, x1 - x0),
        ViewPlan(PLAN_FOLLOWS, 0, 0, 0, 0, 1, 0, x1 - x0),
    ]
    read = [load_encoded(tmp_path / name) for name in sources]
    assert [data is not None for data, _, _ in read] == [False, True, True]  # PNG pixels, JPEG bytes
    n = len(sources)
    batch = {
        "files": [str(tmp_path / name) for name in sources],
        "encoded": [None if data is None else torch.from_numpy(data) for data, _, _ in read],
        "pixels": [None if image is None else torch.from_numpy(image) for _, image, _ in read],
        "plan": torch.from_numpy(np.stack([plan_array(plan)] * n)),
        "image_size": torch.tensor([size for _, _, size in read]),
        "valid": torch.ones(n, 1, dtype=torch.bool),
        "proposal_ids": torch.zeros(n, 1, dtype=torch.int64),
        "boxes": [],
        "levels": [],
        "skipped": [],
    }
    views = render_batch(batch, ViewsConfig(v1_size=side), "cpu")["views"]
    assert [tuple(v.shape) for v in views] == [(n, 3, side, side), (n, 3, 16, 16), (n, 3, 16, 16)]
    for i, (name, array) in enumerate(sources.items()):
        crop = array[y0:y1, x0:x1]
        for v, expected in enumerate([array, crop[:, ::-1], crop]):
            got = views[v][i].permute(1, 2, 0).numpy().astype(int)
            diff = np.abs(got - expected.astype(int)).max()
            assert diff <= (0 if name.endswith(".png") else JPEG_TOLERANCE), (name, v, diff)
