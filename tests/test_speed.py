"""``train/speed.py``: the speed settings ``soco pretrain`` resolves per device, and what it says."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from soco_pretrain.config import ConfigError, TrainConfig
from soco_pretrain.errors import UserError
from soco_pretrain.train.speed import mark_step_begin, resolve_speed

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_cuda_gets_compile_autotuning_tf32_and_prefetch_by_default_a_cpu_none():
    on_gpu = resolve_speed(TrainConfig(), CUDA)
    assert (on_gpu.compile, on_gpu.compile_mode, on_gpu.cudnn_benchmark, on_gpu.tf32, on_gpu.prefetch) == (
        True, "default", True, True, True,
    )  # fmt: skip
    assert not on_gpu.cuda_graphs
    assert on_gpu.describe() == "torch.compile, cudnn.benchmark, TF32, prefetch stream"
    on_cpu = resolve_speed(TrainConfig(), CPU)
    assert (on_cpu.compile, on_cpu.cudnn_benchmark, on_cpu.tf32, on_cpu.prefetch) == (False, False, False, False)
    assert on_cpu.describe() == ""


def test_each_setting_can_be_switched_and_cuda_graphs_follow_the_compile_mode():
    cfg = TrainConfig(compile=True, compile_mode="reduce-overhead", cudnn_benchmark=False, tf32=False,
                      prefetch=False)  # fmt: skip
    speed = resolve_speed(cfg, CUDA)
    assert speed.cuda_graphs and not (speed.cudnn_benchmark or speed.tf32 or speed.prefetch)
    assert speed.describe() == "torch.compile (reduce-overhead: CUDA graphs)"
    # compile forced on a CPU: no cuDNN or TF32 there whatever the config says
    assert resolve_speed(dataclasses.replace(cfg, cudnn_benchmark=True, tf32=True), CPU).describe() == (
        "torch.compile (reduce-overhead: CUDA graphs)"
    )
    # graphs only when compiled: the mode alone does nothing
    assert not resolve_speed(dataclasses.replace(cfg, compile=False), CUDA).cuda_graphs
    mark_step_begin(resolve_speed(dataclasses.replace(cfg, compile=False), CUDA))  # a no-op without graphs


def test_bad_values_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="compile_mode"):
        TrainConfig(compile_mode="fastest")
    with pytest.raises(ConfigError, match="cudnn_benchmark"):
        TrainConfig(cudnn_benchmark="sometimes")
    # an older config (not type-checked) with a bad value still fails with the key named
    old = dataclasses.replace(TrainConfig(), cudnn_benchmark=None)
    object.__setattr__(old, "cudnn_benchmark", "maybe")
    with pytest.raises(UserError, match="train.cudnn_benchmark='maybe'"):
        resolve_speed(old, CUDA)


def test_auto_is_none_and_the_old_strings_still_resolve():
    # None (YAML null, or "auto") is decided per device; True/False force; an older run's
    # config.yaml may hold the strings "auto", "true" or "false"
    assert resolve_speed(TrainConfig(compile=None, cudnn_benchmark=None), CUDA).compile
    assert not resolve_speed(TrainConfig(compile=None), CPU).compile
    assert resolve_speed(TrainConfig(compile=True), CPU).compile
    assert not resolve_speed(TrainConfig(cudnn_benchmark=False), CUDA).cudnn_benchmark
    old = dataclasses.replace(TrainConfig())
    object.__setattr__(old, "compile", "false")  # as read from an old file without the type check
    object.__setattr__(old, "cudnn_benchmark", "auto")
    speed = resolve_speed(old, CUDA)
    assert not speed.compile and speed.cudnn_benchmark
