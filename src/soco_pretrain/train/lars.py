"""LARS optimiser (You et al. 2017) as used by BYOL and SoCo, with a batched (foreach) update.

SoCo (paper 4.1) trains with LARS; the paper gives no details, so we follow BYOL and the
released code: trust coefficient ``eta`` 0.001, and biases and normalisation parameters
(every parameter with ndim <= 1) get neither weight decay nor the layer-wise adaptation.

Update, per parameter ``p`` with gradient ``g`` (BYOL's formulation)::

    d = g + wd * p
    if not excluded:  d = d * (eta * ||p|| / ||d||  if ||p|| > 0 and ||d|| > 0 else 1)
    buf = momentum * buf + d          (buf starts at 0, so the first step gives buf = d)
    p = p - lr * buf

The trust ratios are computed for a whole group at once (``torch._foreach_norm`` + one
``torch.where``), so a step launches a handful of kernels per group and never syncs with the host.

:func:`decay_param_groups` (the same weight-decay exclusions without LARS's flag) also builds
the groups of ``train.optimizer=sgd`` (``torch.optim.SGD``; train/loop.make_optimizer).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split ``model``'s trainable parameters into weight-decay groups (LARS and ``train.optimizer=sgd``).

    Returns ``[{"params": weights, "weight_decay": weight_decay}, {"params": biases_and_norms,
    "weight_decay": 0.0}]`` (empty groups are left out). ndim <= 1 catches every bias and every
    BatchNorm/GroupNorm/LayerNorm affine parameter (the released code's exclusion list). Frozen
    parameters (``requires_grad=False``, e.g. the EMA target network) are not listed, and a
    parameter shared between modules is listed once.
    """
    decay, exclude, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (exclude if param.ndim <= 1 else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if exclude:
        groups.append({"params": exclude, "weight_decay": 0.0})
    return groups


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """:func:`decay_param_groups` for LARS: the excluded group (biases and norms, no weight decay)
    also gets no layer-wise adaptation (``lars_exclude``)::

        [{"params": weights, "weight_decay": weight_decay, "lars_exclude": False},
         {"params": biases_and_norms, "weight_decay": 0.0, "lars_exclude": True}]
    """
    # The groups split by ndim, so a group's first parameter tells which one it is.
    return [{**g, "lars_exclude": g["params"][0].ndim <= 1} for g in decay_param_groups(model, weight_decay)]


def _by_device_and_dtype(params: list[torch.Tensor]) -> list[list[int]]:
    # foreach kernels and torch.stack need tensors on one device with one dtype.
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    return list(buckets.values())


class LARS(torch.optim.Optimizer):
    """LARS with momentum; see the module docstring for the exact update.

    Args:
        params: parameters or param groups (use :func:`lars_param_groups`); a group may set
            ``lars_exclude=True`` (no adaptation) and its own ``weight_decay``.
        lr: learning rate (the training loop sets ``group["lr"]`` every step from the schedule).
        momentum: 0.9, as BYOL and the released code (paper silent).
        weight_decay: 1e-5 (paper 4.1).
        eta: trust coefficient 0.001 (released code; paper silent).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-5, eta: float = 0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(
                f"LARS: need lr >= 0, momentum >= 0, weight_decay >= 0, eta > 0; got "
                f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}"
            )
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for idx in _by_device_and_dtype(params):
                self._update(group, [params[i] for i in idx])
        return loss

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        grads = []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("LARS does not support sparse gradients")
            grads.append(p.grad)
        wd, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]

        # New tensors: the gradients themselves are never modified.
        d = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else list(grads)
        if not group["lars_exclude"]:
            p_norm = torch.stack(torch._foreach_norm(params))
            d_norm = torch.stack(torch._foreach_norm(d))
            # A zero norm (fresh zero-init weight, zero gradient) leaves the step unscaled; the
            # division's inf/nan in the unselected branch never reaches the result.
            trust = torch.where((p_norm > 0) & (d_norm > 0), group["eta"] * p_norm / d_norm, torch.ones_like(p_norm))
            d = torch._foreach_mul(d, list(trust.unbind()))

        if momentum != 0:
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    # buf = momentum * 0 + d on the first step.
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, d)
            d = bufs
        torch._foreach_add_(params, d, alpha=-lr)
