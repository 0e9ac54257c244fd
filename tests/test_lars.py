"""LARS: the update formula against a per-parameter reference, exclusions, zero norms, groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from soco_pretrain.train.lars import LARS, lars_param_groups


def reference_step(params, grads, bufs, lr, momentum, wd, eta, exclude):
    """Straightforward LARS (BYOL's formulation), one parameter at a time, in float64."""
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g + wd * p
        if not exclude:
            pn, dn = p.norm().item(), d.norm().item()
            trust = eta * pn / dn if pn > 0 and dn > 0 else 1.0
            d = d * trust
        bufs[i] = momentum * bufs[i] + d
        params[i] = p - lr * bufs[i]


@pytest.mark.parametrize("exclude", [False, True])
def test_update_matches_reference_over_steps_with_momentum(exclude):
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,), (2, 3, 3, 3)]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ref]
    lr, momentum, wd, eta = 0.7, 0.9, 1e-2, 0.001
    opt = LARS([{"params": params, "lars_exclude": exclude}], lr=lr, momentum=momentum, weight_decay=wd, eta=eta)
    for step in range(4):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        lr_now = lr * (step + 1) / 4  # the loop changes group["lr"] every step
        opt.param_groups[0]["lr"] = lr_now
        opt.step()
        reference_step(ref, grads, bufs, lr_now, momentum, wd, eta, exclude)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)
        for p, g in zip(params, grads):  # gradients are left untouched
            torch.testing.assert_close(p.grad, g)


def test_first_step_value_by_hand():
    p = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||p|| = 5
    p.grad = torch.tensor([0.0, 1.0])
    opt = LARS([p], lr=2.0, momentum=0.9, weight_decay=0.0, eta=0.1)
    opt.step()
    # trust = 0.1 * 5 / 1 = 0.5; buf = d = [0, 0.5]; p -= 2 * buf
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 3.0]))
    p.grad = torch.tensor([0.0, 1.0])
    opt.step()
    # ||p|| = sqrt(18); trust = 0.1*sqrt(18); buf = 0.9*0.5 + trust
    buf = 0.9 * 0.5 + 0.1 * 18**0.5
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 3.0 - 2.0 * buf]))


def test_excluded_group_gets_no_decay_and_no_adaptation():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = lars_param_groups(model, weight_decay=0.5)
    opt = LARS(groups, lr=1.0, momentum=0.0, weight_decay=0.5, eta=0.001)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    for name in ["0.bias", "1.weight", "1.bias"]:  # plain SGD step: p - lr * g
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), before[name] - grads[name])
    w0, g = before["0.weight"], grads["0.weight"]
    d = g + 0.5 * w0
    expected = w0 - 0.001 * w0.norm() / d.norm() * d
    torch.testing.assert_close(model[0].weight.detach(), expected)


def test_zero_norms_give_trust_one():
    zero_weight = nn.Parameter(torch.zeros(2, 2))  # ||p|| = 0: e.g. a zero-initialised layer
    zero_weight.grad = torch.ones(2, 2)
    zero_grad = nn.Parameter(torch.ones(2, 2))  # ||d|| = 0 (no decay, zero gradient)
    zero_grad.grad = torch.zeros(2, 2)
    opt = LARS([zero_weight, zero_grad], lr=0.1, momentum=0.9, weight_decay=0.0, eta=0.001)
    opt.step()
    torch.testing.assert_close(zero_weight.detach(), torch.full((2, 2), -0.1))  # unscaled step
    torch.testing.assert_close(zero_grad.detach(), torch.ones(2, 2))
    assert all(torch.isfinite(p).all() for p in (zero_weight, zero_grad))


def test_param_groups_split_a_small_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)  # weight decays, bias excluded
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4, bias=False)
            self.ln = nn.LayerNorm(4)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)  # like the EMA target: not optimised at all

    net = Net()
    groups = lars_param_groups(net, weight_decay=1e-5)
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[0] == {id(net.conv.weight), id(net.fc.weight)}
    assert ids[1] == {id(net.conv.bias), id(net.bn.weight), id(net.bn.bias), id(net.ln.weight), id(net.ln.bias)}
    assert groups[0]["weight_decay"] == 1e-5 and groups[0]["lars_exclude"] is False
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"] is True
    opt = LARS(groups, lr=1.0)
    assert opt.param_groups[0]["eta"] == 0.001 and opt.param_groups[0]["momentum"] == 0.9


def test_params_without_grad_are_skipped_and_state_round_trips():
    a, b = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3))
    a.grad = torch.ones(3, 3)
    opt = LARS([{"params": [a]}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}], lr=0.5)
    opt.step()
    torch.testing.assert_close(b.detach(), torch.ones(3))
    state = opt.state_dict()
    clone = LARS([{"params": [a]}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}], lr=0.5)
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.state[a]["momentum_buffer"], opt.state[a]["momentum_buffer"])
    assert clone.param_groups[1]["lars_exclude"] is True


def test_bad_arguments():
    with pytest.raises(ValueError, match="LARS"):
        LARS([nn.Parameter(torch.ones(1))], lr=-1.0)
