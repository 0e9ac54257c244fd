"""Auto per-device batch: pretraining's (train/memory.py), fine-tuning's (transfer/detector_memory.py);
train.compile resolution."""

from __future__ import annotations

import pytest
import torch

from soco_pretrain.config import apply_overrides
from soco_pretrain.errors import UserError
from soco_pretrain.presets import load_preset
from soco_pretrain.train.loop import make_plan, resolve_per_device_batch
from soco_pretrain.train.memory import HEADROOM, auto_per_device_batch, estimate_gib
from soco_pretrain.train.speed import resolve_compile

CARDS = {24: 23.6, 48: 45.0, 80: 79.6, 141: 139.8}  # nominal GB -> GiB torch reports (4090, L40S, H100, H200)
KINDS = [("fpn", False), ("c4", False), ("fpn", True)]
# Peak memory measured on an H200 (memory.py's docstring): (arch, SoCo*, per-device batch, GiB).
MEASURED = [
    ("fpn", False, 128, 17.1),
    ("fpn", False, 256, 33.4),
    ("c4", False, 128, 18.2),
    ("c4", False, 256, 35.8),
    ("fpn", True, 128, 21.8),
    ("fpn", True, 256, 42.9),
]


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@pytest.mark.parametrize("arch, star", KINDS)
def test_auto_batch_grows_with_the_card_and_is_the_largest_that_fits(arch, star):
    previous = 0
    for gib in [1.0 + 2.5 * i for i in range(80)]:  # 1 .. 198.5 GiB
        b = auto_per_device_batch(arch, star, gib, 2048, 1)
        assert _is_power_of_two(b) and 2048 % b == 0, (gib, b)
        assert b >= previous, (gib, b, previous)  # more memory never gives a smaller batch
        previous = b
        assert estimate_gib(arch, star, b) <= HEADROOM * gib or b == 1, (gib, b)  # fits, headroom kept
        assert estimate_gib(arch, star, 2 * b) > HEADROOM * gib or b == 1024, (gib, b)  # twice would not
    assert previous >= 512  # a 198 GiB card takes at least 512 images of 224 px


@pytest.mark.parametrize("arch, star, batch, gib", MEASURED)
def test_auto_batch_follows_the_measured_peak_memory(arch, star, batch, gib):
    # A card with just enough memory for the measured peak plus the headroom takes that batch (at
    # least); one 5 % smaller does not.
    enough = gib / HEADROOM * 1.02
    assert auto_per_device_batch(arch, star, enough, 2048, 1) >= batch
    assert auto_per_device_batch(arch, star, gib / HEADROOM * 0.95, 2048, 1) < batch


def test_more_memory_per_image_never_gives_a_larger_batch():
    for gib in CARDS.values():
        fpn = auto_per_device_batch("fpn", False, gib, 2048, 1)
        assert auto_per_device_batch("fpn", True, gib, 2048, 1) <= fpn  # a fourth view
        assert auto_per_device_batch("fpn", False, gib, 2048, 1, precision="fp32") <= fpn
        assert auto_per_device_batch("fpn", False, gib, 2048, 1, v1_size=320) <= fpn
        assert auto_per_device_batch("fpn", False, gib, 2048, 1, v1_size=112) >= fpn
    # On a 24 GB card (FPN: 128 of the measured 0.127 GiB per image fit in 85 % of 23.6 GiB) the
    # differences show: a fourth view or fp32 activations do not fit 128 any more.
    card = CARDS[24]
    assert auto_per_device_batch("fpn", False, card, 2048, 1) == 128
    assert auto_per_device_batch("fpn", True, card, 2048, 1) < 128
    assert auto_per_device_batch("fpn", False, card, 2048, 1, precision="fp32") < 128


def test_estimate_reproduces_the_measurements_it_was_fitted_on():
    for arch, star, b, gib in MEASURED:
        assert estimate_gib(arch, star, b) == pytest.approx(gib, abs=0.3)
    assert estimate_gib("fpn", False, 128, precision="fp32") == pytest.approx(33.3, abs=1.0)  # measured 33.2
    # The per-image part scales with the view area, the fixed part does not.
    per_image = estimate_gib("fpn", False, 129) - estimate_gib("fpn", False, 128)
    small = estimate_gib("fpn", False, 129, v1_size=112) - estimate_gib("fpn", False, 128, v1_size=112)
    assert small == pytest.approx(per_image / 4)


@pytest.mark.parametrize("batch_size", [2048, 96, 256, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("card", [None, 23.6, 139.8])
def test_auto_batch_splits_the_total_batch_exactly(batch_size, world, card):
    if batch_size % world:
        return  # the total batch must split over the processes anyway (make_plan says so)
    b = auto_per_device_batch("fpn", False, card, batch_size, world)
    per_process = batch_size // world
    assert per_process % b == 0 and b <= per_process
    if card is None:
        assert b <= 64  # a CPU: time, not memory, is the limit
    cfg = apply_overrides(load_preset("fpn-100ep"), [f"train.batch_size={batch_size}", f"train.per_device_batch={b}"])
    plan = make_plan(cfg, world, 10_000, "cpu")
    assert plan.accum * b * world == batch_size


def test_nothing_fits_gives_one_never_zero():
    assert auto_per_device_batch("fpn", False, 0.5, 2048, 1) == 1
    assert auto_per_device_batch("fpn", False, 139.8, 1, 1) == 1


def test_the_card_memory_reaches_the_choice(monkeypatch):
    cfg = load_preset("fpn-100ep")

    class Props:
        total_memory = 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    got = []
    for gib in (16, 24, 48, 80, 141):
        Props.total_memory = int(gib * 2**30)
        resolved, note = resolve_per_device_batch(cfg, 1, torch.device("cuda"))
        b = resolved.train.per_device_batch
        assert b == auto_per_device_batch("fpn", False, gib, 2048, 1, precision="bf16")
        assert f"{gib} GiB card" in note
        got.append(b)
    assert got == sorted(got) and got[0] < got[-1]


def test_resolved_batch_feeds_the_plan_and_explicit_batches_stay():
    cfg = load_preset("fpn-100ep")
    assert cfg.train.per_device_batch == 0
    resolved, note = resolve_per_device_batch(cfg, 1, torch.device("cpu"))
    assert resolved.train.per_device_batch == 64 and "auto" in note and cfg.train.per_device_batch == 0
    plan = make_plan(resolved, 1, 10_000, "cpu")
    assert plan.accum == 2048 // 64
    fixed = apply_overrides(cfg, ["train.per_device_batch=16"])
    assert resolve_per_device_batch(fixed, 1, torch.device("cpu")) == (fixed, "")


def test_compile_is_auto_on_cuda_only_and_overrides_parse():
    cfg = load_preset("fpn-100ep")
    assert cfg.train.compile is None  # auto
    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", torch.device("cpu"))
    assert apply_overrides(cfg, ["train.compile=true"]).train.compile is True
    assert resolve_compile(apply_overrides(cfg, ["train.compile=false"]).train.compile, torch.device("cuda")) is False
    assert resolve_compile(True, torch.device("cpu"))  # an older run's config.yaml holds a bool
    with pytest.raises(UserError, match="train.compile"):
        resolve_compile("sometimes", torch.device("cpu"))


def test_augment_device_auto_means_gpu_on_cuda_and_workers_elsewhere():
    from soco_pretrain.train.loop import resolve_augment_device

    cfg = load_preset("fpn-100ep")
    assert cfg.data.augment.device == "auto"
    assert resolve_augment_device(cfg, torch.device("cuda")).data.augment.device == "gpu"
    assert resolve_augment_device(cfg, torch.device("cpu")).data.augment.device == "cpu"
    fixed = apply_overrides(cfg, ["data.augment.device=cpu"])
    assert resolve_augment_device(fixed, torch.device("cuda")) is fixed
    assert cfg.data.augment.device == "auto"  # the input config is not modified


# ---------------------------------------------------------------- soco finetune: transfer/detector_memory.py

# CPU peaks (VmHWM) measured for transfer/detector_memory.py: (batch, padded short, padded long, GiB).
FINETUNE_MEASURED = [(1, 320, 544, 2.18), (2, 320, 544, 3.09), (1, 800, 1344, 4.62), (2, 800, 1344, 6.99)]
FINETUNE_CHECK = (2, 640, 1088, 5.63)  # not fitted on


def test_finetune_estimate_bounds_the_measured_peaks_closely():
    from soco_pretrain.transfer.detector_memory import finetune_peak_gib

    for batch, short, long, gib in [*FINETUNE_MEASURED, FINETUNE_CHECK]:
        estimate = finetune_peak_gib(batch, short * long / 1e6)
        assert gib <= estimate <= gib + 0.35, (batch, short, long, estimate)


def test_finetune_auto_batch_divides_the_batch_and_fits():
    from soco_pretrain.transfer.detector_memory import FINETUNE_HEADROOM, auto_finetune_batch, finetune_estimate_gib

    previous = 0
    for gib in [2.0 + 4 * i for i in range(40)]:  # 2 .. 158 GiB
        b = auto_finetune_batch(16, gib, 800, 1333)
        assert 16 % b == 0 and b >= previous
        assert finetune_estimate_gib(b, 800, 1333) <= FINETUNE_HEADROOM * gib or b == 1
        bigger = [d for d in (2, 4, 8, 16) if d > b]
        assert not bigger or finetune_estimate_gib(bigger[0], 800, 1333) > FINETUNE_HEADROOM * gib
        previous = b
    assert previous == 16
    assert auto_finetune_batch(12, 40.0, 800, 1333) in (1, 2, 3, 4, 6, 12)  # any divisor, not only powers of 2
    # the default recipe on a 24 GB machine (about 22 GiB available) splits 16 into 4 x 4
    assert auto_finetune_batch(16, 22.0, 800, 1333) == 4
    assert auto_finetune_batch(16, 0.5, 800, 1333) == 1  # nothing fits: one, never zero
    assert auto_finetune_batch(2, 22.0, 128, 160) == 2  # the tests' tiny images
    # CUDA adds the context: never a larger batch than the CPU figure on the same memory
    assert all(
        auto_finetune_batch(16, g, 800, 1333, cuda=True) <= auto_finetune_batch(16, g, 800, 1333) for g in (8, 24, 80)
    )


def test_cpu_available_memory_is_capped_by_the_cgroup(tmp_path):
    from soco_pretrain.transfer.detector_memory import cpu_available_gib

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20971520 kB\n")  # 20 GiB
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert cpu_available_gib(str(meminfo), str(cgroup)) == pytest.approx(20.0)
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text(f"{2**30}\n")
    assert cpu_available_gib(str(meminfo), str(cgroup)) == pytest.approx(20.0)  # no limit
    (cgroup / "memory.max").write_text(f"{8 * 2**30}\n")
    assert cpu_available_gib(str(meminfo), str(cgroup)) == pytest.approx(7.0)  # 8 GiB limit, 1 used
    assert cpu_available_gib(str(tmp_path / "none"), str(tmp_path / "none")) is None


# ---------------------------------------------------------------- other backbones

# Saved activations per image (MiB, fp32, views 224/224/112, K = 4) printed by
# `python benchmarks/backbone_memory.py` (memory.py's BACKBONE_MEMORY comment).
BACKBONE_MEASURED = {
    "fpn": {
        "resnet18": 83.9,
        "resnet34": 105.6,
        "resnet50": 220.9,
        "resnet101": 308.6,
        "resnet152": 417.2,
        "resnext50_32x4d": 277.5,
        "resnext101_32x8d": 565.9,
        "resnext101_64x4d": 566.2,
    },
    "c4": {
        "resnet50": 216.4,
        "resnet101": 294.5,
        "resnet152": 390.9,
        "resnext50_32x4d": 283.7,
        "resnext101_32x8d": 574.7,
        "resnext101_64x4d": 574.7,
    },
}


def test_backbone_factors_are_the_measured_ratios_for_every_backbone():
    from soco_pretrain.model.backbones import BACKBONES
    from soco_pretrain.train.memory import BACKBONE_MEMORY

    assert set(BACKBONE_MEMORY["fpn"]) == set(BACKBONES)  # every backbone, c4 the bottleneck ones
    assert set(BACKBONE_MEMORY["c4"]) == {name for name, b in BACKBONES.items() if b.bottleneck}
    for arch, measured in BACKBONE_MEASURED.items():
        for name, mib in measured.items():
            assert BACKBONE_MEMORY[arch][name] == pytest.approx(mib / measured["resnet50"], abs=0.006), (arch, name)


def test_resnet50_estimates_are_unchanged_by_the_backbone_factor():
    for arch, star, b, _ in MEASURED:
        assert estimate_gib(arch, star, b, backbone="resnet50") == estimate_gib(arch, star, b)
        for gib in CARDS.values():
            r50 = auto_per_device_batch(arch, star, gib, 2048, 1, backbone="resnet50")
            assert r50 == auto_per_device_batch(arch, star, gib, 2048, 1)


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_a_backbone_with_more_memory_per_image_never_gets_a_larger_batch(arch):
    from soco_pretrain.train.memory import BACKBONE_MEMORY

    for gib in [1.0 + 2.5 * i for i in range(80)]:
        by_factor = sorted(BACKBONE_MEMORY[arch], key=BACKBONE_MEMORY[arch].get)
        batches = [auto_per_device_batch(arch, False, gib, 2048, 1, backbone=n) for n in by_factor]
        assert batches == sorted(batches, reverse=True), (gib, batches)
        for name, b in zip(by_factor, batches):
            assert estimate_gib(arch, False, b, backbone=name) <= HEADROOM * gib or b == 1
    # an 80 GB card: FPN R50 512 (0.127 GiB/image), X101-32x8d 128 (x2.56), R18 1024 (x0.38)
    if arch == "fpn":
        chosen = {
            n: auto_per_device_batch("fpn", False, CARDS[80], 2048, 1, backbone=n) for n in BACKBONE_MEMORY["fpn"]
        }
        assert chosen == {
            "resnet18": 1024,
            "resnet34": 1024,
            "resnet50": 512,
            "resnet101": 256,
            "resnet152": 256,
            "resnext50_32x4d": 256,
            "resnext101_32x8d": 128,
            "resnext101_64x4d": 128,
        }


def test_the_run_backbone_reaches_the_choice(monkeypatch):
    class Props:
        total_memory = int(80 * 2**30)

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    for name in ("resnet50", "resnext101_32x8d", "resnet18"):
        cfg = apply_overrides(load_preset("fpn-100ep"), [f"model.backbone={name}"])
        resolved, _ = resolve_per_device_batch(cfg, 1, torch.device("cuda"))
        expected = auto_per_device_batch("fpn", False, 80.0, 2048, 1, precision="bf16", backbone=name)
        assert resolved.train.per_device_batch == expected
    assert expected > auto_per_device_batch("fpn", False, 80.0, 2048, 1, backbone="resnext101_32x8d")
