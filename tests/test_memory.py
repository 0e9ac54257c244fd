"""Auto per-device batch (train/memory.py) and train.compile resolution."""

from __future__ import annotations

import pytest
import torch

from soco_pretrain.config import apply_overrides
from soco_pretrain.presets import load_preset
from soco_pretrain.train.loop import PretrainError, make_plan, resolve_compile, resolve_per_device_batch
from soco_pretrain.train.memory import auto_per_device_batch, estimate_gib

CARDS = {24: 23.6, 48: 45.0, 80: 79.6, 141: 139.8}  # nominal GB -> GiB torch reports (4090, L40S, H100, H200)


@pytest.mark.parametrize("arch, star, expected", [
    ("fpn", False, {24: 128, 48: 256, 80: 512, 141: 512}),
    ("c4", False, {24: 128, 48: 256, 80: 256, 141: 512}),
    ("fpn", True, {24: 64, 48: 128, 80: 256, 141: 512}),
])
def test_auto_batch_per_card_matches_the_documented_table(arch, star, expected):
    for card, gib in CARDS.items():
        b = auto_per_device_batch(arch, star, gib, 2048, 1)
        assert b == expected[card], (arch, star, card)
        assert estimate_gib(arch, star, b) <= 0.85 * gib < estimate_gib(arch, star, 2 * b) or b == 1024


def test_estimate_reproduces_the_measurements_it_was_fitted_on():
    for arch, star, b, gib in [("fpn", False, 128, 17.1), ("fpn", False, 256, 33.4), ("c4", False, 256, 35.8),
                               ("fpn", True, 256, 42.9)]:
        assert estimate_gib(arch, star, b) == pytest.approx(gib, abs=0.3)
    assert estimate_gib("fpn", False, 128, precision="fp32") == pytest.approx(33.3, abs=1.0)  # measured 33.2
    assert estimate_gib("fpn", False, 128, v1_size=112) < estimate_gib("fpn", False, 128) / 3


def test_auto_batch_divides_the_batch_per_process_and_has_a_cpu_default():
    assert auto_per_device_batch("fpn", False, 139.8, 2048, 8) == 256  # 2048 / 8 processes
    assert auto_per_device_batch("fpn", False, 139.8, 96, 1) == 32  # power of two dividing 96
    assert auto_per_device_batch("fpn", False, None, 2048, 1) == 64
    assert auto_per_device_batch("fpn", False, 0.5, 2048, 1) == 1  # nothing fits: 1, never 0


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
    assert cfg.train.compile == "auto"
    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", torch.device("cpu"))
    assert apply_overrides(cfg, ["train.compile=true"]).train.compile == "true"
    assert resolve_compile(apply_overrides(cfg, ["train.compile=false"]).train.compile, torch.device("cuda")) is False
    assert resolve_compile(True, torch.device("cpu"))  # an older run's config.yaml holds a bool
    with pytest.raises(PretrainError, match="train.compile"):
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
