"""BatchNorm over the valid rows of a fixed-shape batch: static shapes, no host synchronisation.

After RoIAlign every proposal slot (B x K per view) goes through the head, padded slots included,
so every tensor in the step has a shape known in advance: no ``nonzero``/``tolist`` to count valid
boxes, nothing for the GPU to wait on, and the step can be captured as a CUDA graph or compiled
without graph breaks. Padded slots must still never reach BatchNorm statistics (the released
code lets them in: a design flaw we fix), so the head's and the MLPs' BatchNorms run through
:func:`masked_batch_norm`: statistics (and the running-statistics update) over the rows where
``mask`` is True only, every row normalised with them. For the valid rows this is exactly what
BatchNorm on the valid rows alone computes (tests/test_masked.py), gradients included; padded rows
get finite values that the loss then ignores.

The modules stay torchvision's / ours (``nn.BatchNorm*d`` or a SyncBatchNorm after
``convert_sync_bn``), so state-dict keys and exports are unchanged; only the forward is routed
here. A SyncBatchNorm (torch's on GPUs, ours on CPU) makes the statistics global across the
process group: per-channel sums and counts are all-reduced with the autograd-aware
``torch.distributed.nn.functional.all_reduce``, so ranks may hold different numbers of valid rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torchvision.models.resnet import Bottleneck


def _synced_group(bn: nn.Module):
    """The process group to synchronise ``bn``'s statistics over, or None for local statistics."""
    if not (isinstance(bn, nn.SyncBatchNorm) or type(bn).__name__ == "SyncBatchNorm"):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(bn, "process_group", None) or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    return t if group is None else dist_nn.all_reduce(t, group=group)


def masked_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` with batch statistics from the rows ``x[mask]`` only (training mode).

    x: (R, C) or (R, C, *spatial); mask: (R,) bool. In eval mode (running statistics) the mask
    changes nothing and ``bn(x)`` is returned. Statistics are two-pass in float32 (the mean first,
    then the centred squares) whatever the autocast dtype; the output has x's dtype. With no valid
    row anywhere the running statistics are left as they are.
    """
    if not (bn.training or not bn.track_running_stats):
        return bn(x)
    group = _synced_group(bn)
    shape = [-1, x.shape[1]] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    keep = mask.view([-1] + [1] * (x.dim() - 1))
    xf = x.float()
    per_row = xf[0].numel() // x.shape[1] if x.shape[0] else 1
    # where, not a multiplication: a non-finite padded row must not leak in (0 * inf = nan).
    sums = torch.where(keep, xf, 0.0).sum(dims)
    count = mask.sum().to(torch.float32) * per_row
    reduced = _all_reduce(torch.cat([sums, count[None]]), group)
    sums, count = reduced[:-1], reduced[-1]
    n = count.clamp(min=1)
    mean = sums / n
    centred = xf - mean.view(shape)
    var = _all_reduce(torch.where(keep, centred * centred, 0.0).sum(dims), group) / n
    out = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            # momentum None = cumulative average (nn.BatchNorm's meaning), as a device tensor: no sync
            factor = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.float()
            factor = torch.where(count > 0, factor, 0.0)  # python scalars stay scalars: no copy to the device
            unbiased = var * count / (count - 1).clamp(min=1)  # as torch: running var is unbiased
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor.to(bn.running_mean.dtype))
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor.to(bn.running_var.dtype))
    return out.to(x.dtype)


def run_masked(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Run ``module`` on x with every BatchNorm in it masked by ``mask`` (None: plain forward).

    Handles what the heads are made of: BatchNorm layers, ``nn.Sequential`` chains (torchvision's
    box head: Conv2dNormActivation blocks, Flatten, Linear, ReLU) and torchvision ``Bottleneck``
    blocks (the C4 head, res5); any other module is called as is if it holds no BatchNorm, and
    raises ``TypeError`` if it does: its own forward would let the padded rows into the statistics
    (e.g. after a change of torchvision's box head), so it needs a masked forward here first.
    """
    if mask is None:
        return module(x)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return masked_batch_norm(module, x, mask)
    if isinstance(module, nn.Sequential):
        for child in module:
            x = run_masked(child, x, mask)
        return x
    if _is_bottleneck(module):
        return _bottleneck(module, x, mask)
    inner = next((m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    if inner is not None:
        raise TypeError(
            f"run_masked: no masked forward for {type(module).__name__}, which holds a "
            f"{type(inner).__name__}: its padded rows would enter the BatchNorm statistics"
        )
    return module(x)


def _is_bottleneck(module: nn.Module) -> bool:
    return isinstance(module, Bottleneck)


def _bottleneck(block: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """torchvision ``Bottleneck.forward`` with masked BatchNorms."""
    identity = x if block.downsample is None else run_masked(block.downsample, x, mask)
    out = block.relu(masked_batch_norm(block.bn1, block.conv1(x), mask))
    out = block.relu(masked_batch_norm(block.bn2, block.conv2(out), mask))
    out = masked_batch_norm(block.bn3, block.conv3(out), mask)
    return block.relu(out + identity)
