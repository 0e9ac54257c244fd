"""Learning-rate and EMA-momentum schedules at the key steps; the linear scaling rule."""

from __future__ import annotations

import itertools
import math

import pytest

from soco_pretrain.config import TrainConfig
from soco_pretrain.engine.schedule import lr_at, scaled_lr, tau_at
from soco_pretrain.engine.trainer import set_lr


def test_scaled_lr_linear_rule():
    assert scaled_lr(1.0, 256) == 1.0
    assert scaled_lr(1.0, 2048) == 8.0  # paper 4.1: base 1.0, batch 2048
    assert scaled_lr(0.5, 64) == 0.125


def test_paper_schedule_key_steps():
    # 100 epochs of 10 steps, 10 warm-up epochs (paper 4.1), peak 8.0, from 0 to 0.
    total, warm, peak = 1000, 100, 8.0
    assert lr_at(0, total, warm, peak) == 0.0
    assert lr_at(50, total, warm, peak) == pytest.approx(4.0)  # mid warm-up
    assert lr_at(100, total, warm, peak) == pytest.approx(8.0)  # end of warm-up: the peak
    assert lr_at(550, total, warm, peak) == pytest.approx(4.0)  # middle of the cosine
    assert lr_at(325, total, warm, peak) == pytest.approx(4.0 * (1 + math.cos(math.pi / 4)))
    assert lr_at(1000, total, warm, peak) == pytest.approx(0.0, abs=1e-12)  # end
    assert lr_at(5000, total, warm, peak) == pytest.approx(0.0, abs=1e-12)  # past the end: stays
    values = [lr_at(s, total, warm, peak) for s in range(total + 1)]
    assert all(a <= b for a, b in itertools.pairwise(values[: warm + 1]))  # rises
    assert all(a >= b for a, b in itertools.pairwise(values[warm:]))  # then falls


def test_released_schedule_key_steps():
    # Released code: warm-up from lr/100, cosine down to 1e-6.
    total, warm, peak, start, final = 1000, 100, 8.0, 0.01, 1e-6
    assert lr_at(0, total, warm, peak, start, final) == pytest.approx(0.08)
    assert lr_at(50, total, warm, peak, start, final) == pytest.approx((0.08 + 8.0) / 2)
    assert lr_at(100, total, warm, peak, start, final) == pytest.approx(8.0)
    assert lr_at(550, total, warm, peak, start, final) == pytest.approx((8.0 + 1e-6) / 2)
    assert lr_at(1000, total, warm, peak, start, final) == pytest.approx(1e-6)


def test_config_defaults_are_the_paper_schedule():
    cfg = TrainConfig()
    assert (cfg.warmup_start_factor, cfg.final_lr, cfg.ema_tau, cfg.base_lr) == (0.0, 0.0, 0.99, 1.0)


def test_no_warmup_and_warmup_covering_the_run():
    assert lr_at(0, 10, 0, 2.0) == pytest.approx(2.0)
    assert lr_at(7, 5, 10, 2.0) == pytest.approx(1.4)  # still warming up
    assert lr_at(12, 5, 10, 2.0) == pytest.approx(2.0)  # warm-up longer than the run: hold the peak
    with pytest.raises(ValueError):
        lr_at(0, 0, 0, 1.0)


def test_tau_key_steps():
    assert tau_at(0, 1000) == pytest.approx(0.99)
    assert tau_at(500, 1000) == pytest.approx(0.995)  # (1 + tau0) / 2 half-way
    assert tau_at(250, 1000) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert tau_at(1000, 1000) == pytest.approx(1.0)
    assert tau_at(2000, 1000) == pytest.approx(1.0)
    assert tau_at(0, 10, tau0=0.996) == pytest.approx(0.996)
    values = [tau_at(s, 100) for s in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(values))


def test_set_lr_sets_every_group():
    class FakeOptimizer:
        def __init__(self):
            self.param_groups = [{"lr": 0.0}, {"lr": 1.0}]

    opt = FakeOptimizer()
    set_lr(opt, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3]
