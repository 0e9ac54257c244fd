"""The SoCo model: online and target networks and the symmetric loss (paper section 3.3, 4.1).

Online network: ``encoder`` (ResNet-50 + FPN + RoIAlign + box head, or the C4 variant),
``projector`` and ``predictor``. Target network: ``target_encoder`` and ``target_projector``,
deep copies of the online ones made at construction (same initial weights), with
``requires_grad=False``; they change only through ``update_target(tau)``.

Target BatchNorm buffers (our choice; the paper is silent): ``update_target`` copies the online
network's running mean/variance (and ``num_batches_tracked``) into the target, the parameters
being EMA'd. The target always runs in training mode, as in BYOL and the released code, so its
forward uses the batch statistics and the buffers never affect the loss; copying them keeps the
target a complete, usable network in eval mode (the released code leaves the target's buffers to
its own forward passes). Running the target forward in train mode still updates its buffers
between two EMA updates; the next update overwrites them.

``model.encoder.state_dict()`` has torchvision Mask R-CNN v2 keys (``backbone.*``,
``box_head.*``): that is what stage 5 exports.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from ..config import PretrainConfig
from .encoder import SoCoEncoder
from .freeze import freeze, frozen_parts, keep_frozen_in_eval
from .heads import MLP
from .loss import MODES, loss_count, soco_loss_terms


def num_views(cfg: PretrainConfig) -> int:
    """Views the model consumes: 2 for C4 (V1, V2), 3 for FPN (V1-V3), 4 for SoCo* (V1-V4)."""
    if cfg.model.arch == "c4":
        return 2
    return 4 if cfg.data.views.soco_star else 3


def view_pairs(cfg: PretrainConfig) -> list[tuple[int, int]]:
    """(online-side, target-side) view pairs of L; L~ swaps each. V1 is paired with every other view."""
    return [(0, v) for v in range(1, num_views(cfg))]


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A synchronised BatchNorm for CPU tensors (gloo), e.g. for CPU DDP runs and tests.

    torch's SyncBatchNorm refuses CPU inputs when a process group exists, and DDP refuses to wrap
    a CPU module holding any ``nn.SyncBatchNorm`` (subclasses included), hence a plain
    ``_BatchNorm`` subclass (same parameters, buffers and state-dict keys); ``convert_sync_bn``
    uses torch's own SyncBatchNorm for models on an accelerator. On CPU we all-reduce
    (sum, sum of squares, count) per channel with the differentiable
    ``torch.distributed.nn.functional.all_reduce`` (float64 sums; ranks may hold different numbers
    of rows, e.g. boxes), normalise with the global biased variance and update the running
    statistics with the unbiased one, as torch's CUDA kernel. Accelerator inputs use torch's path.
    """

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group  # None: the whole world (as nn.SyncBatchNorm)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._needs_sync():
            return super().forward(input)
        if input.device.type != "cpu":
            raise ValueError("soco SyncBatchNorm is the CPU one; convert_sync_bn uses nn.SyncBatchNorm on accelerators")
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        dims = [0] + list(range(2, input.dim()))
        x = input.double()
        count = torch.full((1,), input.numel() / input.shape[1], dtype=torch.float64)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        stats = dist_nn.all_reduce(stats, group=self.process_group or dist.group.WORLD)
        c = input.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = [1, c] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        y = y.to(input.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def _needs_sync(self) -> bool:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group or dist.group.WORLD) > 1


def _to_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm*d by ``SyncBatchNorm``, sharing its parameters and buffers."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight = module.weight  # same Parameter: requires_grad (False in the target) kept
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _to_sync_bn(child))
    return out


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """SyncBatchNorm everywhere (online and target) when a process group with world size > 1 exists.

    Plain BatchNorm otherwise (SyncBN needs a process group; one process gains nothing). A model
    on an accelerator gets torch's ``nn.SyncBatchNorm``; a CPU model (gloo) our ``SyncBatchNorm``
    (call it after moving the model to its device). The state-dict keys do not change.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        first = next(model.parameters(), None)
        if first is not None and first.device.type != "cpu":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return _to_sync_bn(model)
    return model


class SoCoModel(nn.Module):
    """``model(batch) -> (loss, stats)``; ``model.update_target(tau)`` after each optimiser step.

    batch: a collated batch (data.loader.soco_collate: ``views``, ``boxes``, ``levels`` lists per
    view, ``valid`` (B, K));
    extra views (e.g. V3 for C4) are ignored. stats: detached tensors (no host sync): ``loss``,
    one term per pair (``loss_12``, ``loss_13``, ...), ``proposals`` (valid proposals in the batch)
    and ``count`` (the batch's loss units: valid proposals for ``model.loss=paper``, images for
    ``released``; model/loss.py).

    ``model(batch, reduction="sum")``: ``loss`` and the terms are sums over the batch's loss units
    instead of means (mean = sum / count); the training step adds sums and counts over its
    micro-batches and processes, so the loss is the mean over the global batch (train/loop.py).
    """

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        m = cfg.model
        if m.loss not in MODES:
            raise ValueError(f"model.loss must be one of {', '.join(MODES)}, got {m.loss!r}")
        if m.arch == "c4" and cfg.data.views.soco_star:
            raise ValueError("views.soco_star needs model.arch=fpn (SoCo-C4 uses V1 and V2 only)")
        self.loss_mode = m.loss
        self.num_views = num_views(cfg)
        self.pairs = view_pairs(cfg)
        self.encoder = SoCoEncoder(m)
        self.projector = MLP(self.encoder.out_dim, m.proj_hidden, m.proj_out, m.bn_momentum)
        self.predictor = MLP(m.proj_out, m.proj_hidden, m.proj_out, m.bn_momentum)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)
        # train.freeze (model/freeze.py): the same parts of both encoders, kept in eval mode
        parts = frozen_parts(m.arch, cfg.train.freeze)
        self.frozen = [f"{net}.{name}" for net in ("encoder", "target_encoder") for name in parts]
        freeze(self, self.frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        keep_frozen_in_eval(self, self.frozen)  # frozen BatchNorms keep their running statistics
        return self

    # ------------------------------------------------------------ online / target bookkeeping

    def _pairs_of_modules(self):
        return ((self.encoder, self.target_encoder), (self.projector, self.target_projector))

    def online_parameters(self):
        """Parameters the optimiser updates (encoder, projector, predictor)."""
        for module in (self.encoder, self.projector, self.predictor):
            yield from module.parameters()

    def target_parameters(self):
        for module in (self.target_encoder, self.target_projector):
            yield from module.parameters()

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """target <- tau * target + (1 - tau) * online (trainable parameters; frozen ones are
        equal in both and skipped); BN buffers copied from online."""
        online, target = [], []
        online_buf, target_buf = [], []
        for o, t in self._pairs_of_modules():
            for po, pt in zip(o.parameters(), t.parameters()):
                if po.requires_grad:  # frozen parts are equal in both networks and stay so
                    online.append(po.detach())
                    target.append(pt)
            online_buf += list(o.buffers())
            target_buf += list(t.buffers())
        torch._foreach_lerp_(target, online, 1.0 - float(tau))
        torch._foreach_copy_(target_buf, online_buf)

    # ------------------------------------------------------------ forward

    def _inputs(self, batch: dict):
        device = next(self.parameters()).device
        views = [batch["views"][v].to(device, non_blocking=True) for v in range(self.num_views)]
        boxes = [batch["boxes"][v].to(device, non_blocking=True) for v in range(self.num_views)]
        levels = [batch["levels"][v].to(device, non_blocking=True) for v in range(self.num_views)]
        return views, boxes, levels, batch["valid"].to(device, non_blocking=True)

    def forward(self, batch: dict, reduction: str = "mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        views, boxes, levels, valid = self._inputs(batch)
        # One encoder pass per view: views differ in size (224, 112, 192), and BatchNorm statistics
        # stay per view as in the released code.
        # Every slot flows through with static shapes (B*K rows per view); BatchNorm statistics
        # and the loss use the valid slots only (rows = mask).
        rows = valid.reshape(-1)
        preds = [
            self.predictor(self.projector(self.encoder(x, b, lv, valid), rows), rows)
            for x, b, lv in zip(views, boxes, levels)
        ]
        with torch.no_grad():
            projs = [
                self.target_projector(self.target_encoder(x, b, lv, valid), rows)
                for x, b, lv in zip(views, boxes, levels)
            ]
        terms = soco_loss_terms(preds, projs, self.pairs, valid, self.loss_mode, reduction=reduction)
        loss = sum(terms.values())
        stats = {
            "loss": loss.detach(),
            **{k: v.detach() for k, v in terms.items()},
            "proposals": valid.sum(),
            "count": loss_count(valid, self.loss_mode),
        }
        return loss, stats
