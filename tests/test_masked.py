"""Masked BatchNorm: the head's statistics come from the valid proposal slots only, with static shapes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from soco_pretrain.config import ModelConfig
from soco_pretrain.model.encoder import build_box_head
from soco_pretrain.model.heads import MLP
from soco_pretrain.model.masked import masked_batch_norm, run_masked

pytestmark = pytest.mark.usefixtures("one_thread")


MASK = torch.tensor([True, False, True, True, False, True, True])


def _compare(module: nn.Module, x: torch.Tensor, mask: torch.Tensor, forward=None, atol=1e-5):
    """run_masked(module, x, mask)[mask] == module(x[mask]): outputs, input/parameter gradients and
    running statistics; padded rows finite."""
    forward = forward or (lambda mod, inp, m: run_masked(mod, inp, m))
    ref_module = copy.deepcopy(module)
    x1 = x.clone().requires_grad_(True)
    x2 = x[mask].clone().requires_grad_(True)
    out = forward(module, x1, mask)
    ref = ref_module(x2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[mask], ref, atol=atol, rtol=1e-4)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    (out[mask] * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x1.grad[mask], x2.grad, atol=atol, rtol=1e-4)
    assert (x1.grad[~mask] == 0).all()  # padded rows get no gradient
    for (name, p), p_ref in zip(module.named_parameters(), ref_module.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=atol * 10, rtol=1e-3, msg=name)
    for (name, b), b_ref in zip(module.named_buffers(), ref_module.buffers()):
        torch.testing.assert_close(b, b_ref, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("shape", [(7, 5), (7, 4, 3, 3)])
def test_masked_batch_norm_equals_batch_norm_on_valid_rows(shape):
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm1d(shape[1]) if len(shape) == 2 else nn.BatchNorm2d(shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0, generator=g)
        bn.bias.uniform_(-1, 1, generator=g)
    x = torch.randn(shape, generator=g) * 3 + 2
    x[~MASK] = 1e6  # huge padded rows would wreck the statistics if they leaked in
    _compare(bn, x, MASK)


def test_padded_rows_may_hold_nan_and_inf():
    bn = nn.BatchNorm2d(4)
    x = torch.randn(7, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    x[1] = float("nan")
    x[4] = float("inf")
    y = masked_batch_norm(bn, x, MASK)
    assert torch.isfinite(y[MASK]).all() and torch.isfinite(bn.running_mean).all()
    assert torch.isfinite(bn.running_var).all()


def test_eval_mode_and_no_valid_rows():
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 9.0]))
    x = torch.randn(5, 3)
    bn.eval()
    torch.testing.assert_close(masked_batch_norm(bn, x, torch.zeros(5, dtype=torch.bool)), bn(x))
    bn.train()
    before = (bn.running_mean.clone(), bn.running_var.clone())
    y = masked_batch_norm(bn, x, torch.zeros(5, dtype=torch.bool))
    assert torch.isfinite(y).all()
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])


def test_momentum_none_is_a_cumulative_average():
    bn = nn.BatchNorm1d(2, momentum=None)
    _compare(bn, torch.randn(7, 2, generator=torch.Generator().manual_seed(2)), MASK)


def test_box_head_bottleneck_and_mlp_match_their_forward_on_valid_rows():
    torch.manual_seed(0)
    head = build_box_head(ModelConfig(roi_size=3, head_dim=16))
    _compare(head, torch.randn(7, 256, 3, 3), MASK, atol=1e-4)
    block = Bottleneck(16, 4, downsample=nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)))
    for m in block.modules():  # non-trivial affine parameters (bn3 may be zero-initialised)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    _compare(block, torch.randn(7, 16, 4, 4), MASK, atol=1e-4)
    mlp = MLP(6, 12, 4)
    _compare(mlp, torch.randn(7, 6), MASK, forward=lambda mod, inp, m: mod(inp, m))


def test_bf16_autocast_keeps_dtype_and_stays_close():
    bn = nn.BatchNorm1d(8)
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(4)).bfloat16()
    y = masked_batch_norm(bn, x, MASK)
    assert y.dtype == torch.bfloat16
    ref = nn.BatchNorm1d(8)(x[MASK].float())
    torch.testing.assert_close(y[MASK].float(), ref, atol=2e-2, rtol=2e-2)


def _masked_sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from soco_pretrain.model import convert_sync_bn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        mlp = convert_sync_bn(MLP(6, 12, 4))
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(9))
        mask = torch.tensor([True, False, True, True, False, True, True, True])
        rows = slice(rank * 4, rank * 4 + 4)  # rank 0: 3 valid rows, rank 1: 3 valid of 4
        y = mlp(x[rows], mask[rows])
        (y[mask[rows]].square().sum()).backward()
        grads = [p.grad.clone() for p in mlp.parameters()]
        for g in grads:
            dist.all_reduce(g)
        torch.save(
            {"y": y.detach(), "grads": grads, "stats": [b.clone() for b in mlp.buffers()]}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_synced_masked_batch_norm_matches_one_process_on_the_valid_rows(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_masked_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.manual_seed(0)
    mlp = MLP(6, 12, 4)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(9))
    mask = torch.tensor([True, False, True, True, False, True, True, True])
    y = mlp(x[mask])
    y.square().sum().backward()
    torch.testing.assert_close(torch.cat([r0["y"][mask[:4]], r1["y"][mask[4:]]]), y.detach(), atol=1e-5, rtol=1e-4)
    for g_ref, g0, g1 in zip((p.grad for p in mlp.parameters()), r0["grads"], r1["grads"]):
        torch.testing.assert_close(g0, g_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g1, g_ref, atol=1e-5, rtol=1e-4)
    for b_ref, b0, b1 in zip(mlp.buffers(), r0["stats"], r1["stats"]):
        torch.testing.assert_close(b0, b_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b1, b_ref, atol=1e-5, rtol=1e-4)


def test_an_unknown_module_holding_batch_norm_is_refused():
    # A module run_masked has no masked forward for (e.g. a changed torchvision box head) would
    # let the padded rows into its BatchNorm statistics: a one-line error instead.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.fc(x))

    x = torch.randn(7, 5)
    with pytest.raises(TypeError, match="no masked forward for Block, which holds a BatchNorm1d") as info:
        run_masked(nn.Sequential(nn.Linear(5, 5), Block()), x, MASK)
    assert "\n" not in str(info.value)
    run_masked(Block(), x, None)  # no mask: the plain forward
    assert run_masked(nn.Linear(5, 5), x, MASK).shape == x.shape  # no BatchNorm inside: called as is
