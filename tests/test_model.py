"""SoCo network: torchvision-compatible encoder, per-level routing, heads, online/target model.

Kept small for 2 shared CPU cores: 64x64 views, batch 2, K = 3; the full-size model is built once
per module and one forward+backward covers gradients, padded slots and the loss range.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2
from torchvision.ops import FrozenBatchNorm2d, roi_align

from soco_pretrain.config import DataConfig, ModelConfig, PretrainConfig, ViewsConfig
from soco_pretrain.model import (
    C4_ROI_SIZE,
    FPN_STRIDES,
    MLP,
    SoCoEncoder,
    SoCoModel,
    convert_sync_bn,
    num_views,
    pool_boxes,
    view_pairs,
)

B, K = 2, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(arch="fpn", soco_star=False, **model) -> PretrainConfig:
    return PretrainConfig(
        data=DataConfig(views=ViewsConfig(soco_star=soco_star)), model=ModelConfig(arch=arch, **model)
    )


def _batch(sizes=(64, 64, 32), seed=0, garbage=True) -> dict:
    """Random views with boxes on every level; slot (1, 1) padded (garbage box when ``garbage``)."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.tensor([[True, True, True], [True, False, True]])
    views, boxes, levels = [], [], []
    for s in sizes:
        views.append(torch.randn(B, 3, s, s, generator=g))
        # continuous-edge boxes, fractions of the view: small, medium, large
        rel = torch.tensor([[0.1, 0.1, 0.3, 0.35], [0.2, 0.1, 0.7, 0.6], [0.0, 0.05, 0.95, 1.0]])
        b = (rel * s).expand(B, K, 4).clone()
        b[1] = b[1].flip(0)
        lv = torch.tensor([[0, 1, 3], [2, 1, 0]])
        if garbage:  # a padded slot holds nonsense: NaN box, out-of-range level
            b[1, 1] = float("nan")
            lv = lv.clone()
            lv[1, 1] = 7
        boxes.append(b)
        levels.append(lv)
    return {"views": views, "boxes": boxes, "levels": levels, "valid": valid}


@pytest.fixture(scope="module")
def fpn_model():
    torch.manual_seed(0)
    return SoCoModel(_cfg())


@pytest.fixture(scope="module")
def tv_maskrcnn_state():
    return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict()


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- torchvision alignment


def test_state_dict_matches_torchvision_mask_rcnn_v2(fpn_model, tv_maskrcnn_state):
    enc = fpn_model.encoder.state_dict()
    for ours, theirs in (("backbone.", "backbone."), ("box_head.", "roi_heads.box_head.")):
        mine, ref = _sub(enc, ours), _sub(tv_maskrcnn_state, theirs)
        assert list(mine) == list(ref)
        assert all(mine[k].shape == ref[k].shape for k in ref)
    assert set(enc) == {"backbone." + k for k in _sub(tv_maskrcnn_state, "backbone.")} | {
        "box_head." + k for k in _sub(tv_maskrcnn_state, "roi_heads.box_head.")
    }
    # The export of stage 5: loads into torchvision's modules with no mapping.
    det = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    det.backbone.load_state_dict(fpn_model.encoder.backbone.state_dict())
    det.roi_heads.box_head.load_state_dict(fpn_model.encoder.box_head.state_dict())


def test_everything_trainable_with_plain_batchnorm(fpn_model):
    enc = fpn_model.encoder
    assert all(p.requires_grad for p in enc.parameters())
    norms = [m for m in enc.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d))]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms), {type(m) for m in norms}
    assert sum(1 for m in enc.backbone.fpn.modules() if isinstance(m, nn.BatchNorm2d)) == 8


def test_init_and_bn_momentum_follow_config():
    enc = SoCoEncoder(ModelConfig(bn_momentum=0.03, zero_init_residual=True))
    assert all(m.momentum == 0.03 for m in enc.modules() if isinstance(m, nn.BatchNorm2d))
    body = enc.backbone.body
    assert all((blk.bn3.weight == 0).all() for layer in (body.layer1, body.layer4) for blk in layer)
    assert (body.bn1.weight == 1).all()
    enc = SoCoEncoder(ModelConfig(zero_init_residual=False))
    assert (enc.backbone.body.layer1[0].bn3.weight == 1).all()
    # Box-head conv: PyTorch default init (uniform, |w| <= 1/sqrt(fan_in)), as the released code.
    w = enc.box_head[0][0].weight
    assert w.abs().max() <= 1 / (256 * 9) ** 0.5 + 1e-6


# ---------------------------------------------------------------- routing


def test_pool_boxes_routes_each_box_to_its_level_only():
    g = torch.Generator().manual_seed(1)
    size = 128
    maps = [torch.randn(2, 4, size // s, size // s, generator=g) for s in FPN_STRIDES]
    boxes = torch.tensor(
        [
            [[4.0, 6.0, 40.0, 30.0], [10.0, 10.0, 100.0, 90.0], [0.0, 0.0, 128.0, 128.0], [30.0, 20.0, 50.0, 70.0]],
            [[1.5, 2.5, 20.0, 12.0], [float("nan")] * 4, [60.0, 0.0, 127.0, 64.0], [8.0, 8.0, 120.0, 100.0]],
        ]
    )
    levels = torch.tensor([[0, 2, 3, 1], [1, 99, 0, 3]])
    valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
    pooled = pool_boxes(maps, FPN_STRIDES, boxes, levels, valid, output_size=7, sampling_ratio=2)
    slots = valid.nonzero().tolist()
    assert pooled.shape == (2 * 4, 4, 7, 7)  # every slot, padded ones too (static shapes)
    assert torch.isfinite(pooled).all()  # the NaN box of the padded slot was sanitised
    for b, k in slots:  # row-major (b, k) order of all slots
        row = b * 4 + k
        roi = torch.cat([torch.tensor([float(b)]), boxes[b, k]])[None]
        for level, stride in enumerate(FPN_STRIDES):
            direct = roi_align(maps[level], roi, 7, spatial_scale=1 / stride, sampling_ratio=2, aligned=True)
            if level == levels[b, k]:
                torch.testing.assert_close(pooled[row], direct[0], rtol=0, atol=1e-6)
            else:
                assert not torch.allclose(pooled[row], direct[0], atol=1e-3)


def test_encoder_pools_from_its_fpn_levels_and_shapes(fpn_model):
    enc = fpn_model.encoder
    batch = _batch()
    with torch.no_grad():
        maps = enc.features(batch["views"][0])
        assert list(maps) == ["p2", "p3", "p4", "p5"]
        assert [tuple(m.shape) for m in maps.values()] == [(B, 256, 64 // s, 64 // s) for s in FPN_STRIDES]
        pooled = enc.pool(maps, batch["boxes"][0], batch["levels"][0], batch["valid"])
    b, k = 1, 2  # level 0 (P2), stride 4
    roi = torch.cat([torch.tensor([1.0]), batch["boxes"][0][b, k]])[None]
    direct = roi_align(maps["p2"], roi, 7, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(pooled[-1], direct[0])
    assert pooled.shape == (B * K, 256, 7, 7)


def test_heads_shapes_and_parameter_counts(fpn_model, tv_maskrcnn_state):
    m = fpn_model
    assert m.encoder.out_dim == 1024
    ref_count = sum(
        v.numel()
        for k, v in tv_maskrcnn_state.items()
        if k.startswith(("backbone.", "roi_heads.box_head.")) and "running" not in k and "num_batches" not in k
    )
    assert sum(p.numel() for p in m.encoder.parameters()) == ref_count
    assert (
        sum(p.numel() for p in m.encoder.box_head.parameters()) == 4 * (256 * 256 * 9 + 2 * 256) + 12544 * 1024 + 1024
    )

    def mlp(i):
        return i * 4096 + 4096 + 2 * 4096 + 4096 * 256 + 256

    assert sum(p.numel() for p in m.projector.parameters()) == mlp(1024)
    assert sum(p.numel() for p in m.predictor.parameters()) == mlp(256)
    head = MLP(1024, 4096, 256)
    assert [type(x) for x in head.children()] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.randn(5, 1024)).shape == (5, 256)


# ---------------------------------------------------------------- C4


def test_c4_encoder_shapes_and_keys():
    enc = SoCoEncoder(ModelConfig(arch="c4"))
    ref = {k for k in resnet50(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(_sub(enc.state_dict(), "backbone.")) == ref
    batch = _batch(sizes=(64, 64))
    with torch.no_grad():
        maps = enc.features(batch["views"][0])
        assert list(maps) == ["c4"] and maps["c4"].shape == (B, 1024, 4, 4)  # stride 16
        pooled = enc.pool(maps, batch["boxes"][0], batch["levels"][0], batch["valid"])
        assert pooled.shape == (B * K, 1024, C4_ROI_SIZE, C4_ROI_SIZE)
        roi = torch.cat([torch.tensor([0.0]), batch["boxes"][0][0, 2]])[None]
        direct = roi_align(maps["c4"], roi, 14, spatial_scale=1 / 16, sampling_ratio=2, aligned=True)
        torch.testing.assert_close(pooled[2], direct[0])
        out = enc.head(pooled)
    assert out.shape == (B * K, 2048) and enc.out_dim == 2048


def test_c4_model_forward_backward_uses_two_views():
    cfg = _cfg("c4", proj_hidden=64)
    assert num_views(cfg) == 2 and view_pairs(cfg) == [(0, 1)]
    model = SoCoModel(cfg)
    assert model.projector.linear1.in_features == 2048
    loss, stats = model(_batch(sizes=(64, 64, 32)))  # V3 present in the batch, ignored
    loss.backward()
    assert torch.isfinite(loss) and -4.0 <= loss.item() <= 4.0
    assert set(stats) == {"loss", "loss_12", "proposals", "count"}
    assert model.encoder.backbone.layer4[0].conv1.weight.grad is not None


# ---------------------------------------------------------------- the model


def test_views_pairs_and_config_errors():
    assert num_views(_cfg()) == 3 and view_pairs(_cfg()) == [(0, 1), (0, 2)]
    star = _cfg(soco_star=True)
    assert num_views(star) == 4 and view_pairs(star) == [(0, 1), (0, 2), (0, 3)]
    with pytest.raises(ValueError, match="soco_star"):
        SoCoModel(_cfg("c4", soco_star=True))
    with pytest.raises(ValueError, match='loss="nope": must be one of paper, released'):
        _cfg(loss="nope")  # the config refuses it before any model is built
    with pytest.raises(ValueError, match='arch="dc5": must be one of fpn, c4'):
        ModelConfig(arch="dc5")


def test_target_is_a_frozen_copy_and_update_target_is_ema(fpn_model):
    m = fpn_model
    online = dict(m.encoder.named_parameters()) | {"proj." + k: v for k, v in m.projector.named_parameters()}
    target = dict(m.target_encoder.named_parameters()) | {
        "proj." + k: v for k, v in m.target_projector.named_parameters()
    }
    assert online.keys() == target.keys()
    assert all(not p.requires_grad for p in m.target_parameters())
    for k in online:
        assert torch.equal(online[k], target[k]) and online[k] is not target[k]
    snapshot = {k: v.clone() for k, v in m.state_dict().items()}  # the model is shared by the module
    try:
        # Move online and the online BN buffers away, then one EMA step.
        g = torch.Generator().manual_seed(2)
        before_t = {k: v.detach().clone() for k, v in target.items()}
        with torch.no_grad():
            for p in online.values():
                p.add_(torch.randn(p.shape, generator=g))
            for buf in m.encoder.buffers():
                buf.add_(3)
        tau = 0.9
        m.update_target(tau)
        for k in online:
            torch.testing.assert_close(target[k], tau * before_t[k] + (1 - tau) * online[k].detach())
        for o, t in zip(m.encoder.buffers(), m.target_encoder.buffers()):  # buffers copied (documented choice)
            assert torch.equal(o, t)
        m.update_target(0.0)  # tau 0: target = online
        assert all(torch.equal(online[k], target[k]) for k in online)
        assert not any(p.requires_grad for p in m.target_parameters())
    finally:
        m.load_state_dict(snapshot)


def _padded_slot_variant(batch: dict, box: float, level: int) -> dict:
    out = {**batch, "boxes": [b.clone() for b in batch["boxes"]], "levels": [lv.clone() for lv in batch["levels"]]}
    for b, lv in zip(out["boxes"], out["levels"]):
        b[1, 1] = torch.tensor([box, box, 3 * box, 2 * box])
        lv[1, 1] = level
    return out


def test_forward_backward_gradients_only_online_and_padded_slots_never_in_batchnorm(fpn_model):
    m = fpn_model
    m.train()
    snapshot = {k: v.clone() for k, v in m.state_dict().items()}
    seen = []
    hooks = [
        mod.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
        # the heads' first conv (run_masked walks the head's children), projector, predictor
        for mod in (m.encoder.box_head[0][0], m.target_encoder.box_head[0][0], m.projector, m.predictor)
    ]
    results = []
    try:
        # The padded slot holds a NaN box and level 7, then two different finite boxes: if its
        # rows reached a BatchNorm statistic or the loss, the three runs would differ.
        batch = _batch()
        for variant in (batch, _padded_slot_variant(batch, 2.0, 0), _padded_slot_variant(batch, 9.0, 3)):
            m.load_state_dict(snapshot)
            m.zero_grad(set_to_none=True)
            loss, stats = m(variant)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
            results.append((loss.detach(), stats, grads, {k: v.clone() for k, v in m.state_dict().items()}))
    finally:
        for h in hooks:
            h.remove()
    n_valid = int(batch["valid"].sum())
    assert seen and all(n == B * K for n in seen)  # heads run on every slot: static shapes
    assert len(seen) == 3 * 3 * 4  # 3 runs x 3 views x (online head, projector, predictor, target head)
    loss, stats, grads, state = results[0]
    for other_loss, _, other_grads, other_state in results[1:]:
        torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(other_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
        for name in state:  # running statistics (BatchNorm buffers) included
            torch.testing.assert_close(other_state[name], state[name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.isfinite(loss) and -8.0 <= loss.item() <= 8.0
    assert set(stats) == {"loss", "loss_12", "loss_13", "proposals", "count"}
    assert stats["proposals"].item() == stats["count"].item() == n_valid and not stats["loss"].requires_grad
    torch.testing.assert_close(stats["loss"], stats["loss_12"] + stats["loss_13"])
    online = list(m.encoder.named_parameters(prefix="encoder")) + list(m.predictor.named_parameters(prefix="predictor"))
    for name, _ in online:
        assert name in grads and torch.isfinite(grads[name]).all(), name
    assert grads["encoder.backbone.fpn.layer_blocks.0.0.weight"].abs().sum() > 0  # P2 path used
    assert not any(n.startswith(("target_encoder.", "target_projector.")) for n in grads)
    m.load_state_dict(snapshot)


def test_soco_star_forward_four_views():
    model = SoCoModel(_cfg(soco_star=True, proj_hidden=64))
    with torch.no_grad():
        loss, stats = model(_batch(sizes=(64, 64, 32, 48)))
    assert set(stats) == {"loss", "loss_12", "loss_13", "loss_14", "proposals", "count"}
    assert torch.isfinite(loss) and -12.0 <= loss.item() <= 12.0


def test_convert_sync_bn_is_a_no_op_without_process_group():
    mlp = MLP(8, 16, 4)
    assert convert_sync_bn(mlp) is mlp and type(mlp.bn1) is nn.BatchNorm1d
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(MLP(8, 16, 4))  # what world size > 1 does
    assert type(converted.bn1) is nn.SyncBatchNorm


def _tiny_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6)
    )


def _tiny_inputs() -> torch.Tensor:
    return torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(3))


def _sync_bn_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        net = convert_sync_bn(_tiny_bn_net())
        x = _tiny_inputs()
        # Even split for the gradients, then an uneven one (3 + 5 rows) for the statistics.
        y = net(x[rank * 4 : rank * 4 + 4])
        (y.square().mean() / world).backward()
        grads = [p.grad.clone() for p in net.parameters()]
        for g in grads:
            dist.all_reduce(g)  # what DDP does (sum of loss / world)
        stats = [b.clone() for b in net.buffers()]
        rows = slice(0, 3) if rank == 0 else slice(3, 8)
        with torch.no_grad():
            y2 = net(x[rows])
        stats2 = [b.clone() for b in net.buffers()]
        assert any(type(m).__name__ == "SyncBatchNorm" for m in net.modules())
        torch.save(
            {"y": y.detach(), "grads": grads, "stats": stats, "y2": y2, "stats2": stats2}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_convert_sync_bn_on_cpu_matches_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sync_bn_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    net = _tiny_bn_net()
    x = _tiny_inputs()
    y = net(x)
    y.square().mean().backward()
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach(), atol=1e-5, rtol=1e-5)
    for g_ref, g0, g1 in zip((p.grad for p in net.parameters()), r0["grads"], r1["grads"]):
        torch.testing.assert_close(g0, g_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g1, g_ref, atol=1e-5, rtol=1e-4)
    for b_ref, b0 in zip(net.buffers(), r0["stats"]):
        torch.testing.assert_close(b0, b_ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        y2 = net(x)  # second step of running statistics, same as the uneven 3 + 5 split
    torch.testing.assert_close(torch.cat([r0["y2"], r1["y2"]]), y2, atol=1e-5, rtol=1e-5)
    for b_ref, b0, b1 in zip(net.buffers(), r0["stats2"], r1["stats2"]):
        torch.testing.assert_close(b0, b_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b1, b_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode, count", [("paper", 5), ("released", B)])
def test_forward_sum_reduction_is_the_mean_times_the_loss_units(fpn_model, mode, count):
    # reduction="sum": loss and terms summed over the batch's loss units (valid proposals, or
    # images for released); the training step divides by the units of the global batch.
    m = fpn_model
    snapshot = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    m.loss_mode = mode
    try:
        batch = _batch()
        with torch.no_grad():
            mean, mean_stats = m(batch)
            m.load_state_dict(snapshot)  # the same BatchNorm running statistics for both
            total, stats = m(batch, reduction="sum")
    finally:
        m.loss_mode = "paper"
        m.load_state_dict(snapshot)
    assert stats["count"].item() == mean_stats["count"].item() == count
    torch.testing.assert_close(total / count, mean, rtol=1e-5, atol=1e-6)
    for key in ("loss_12", "loss_13"):
        torch.testing.assert_close(stats[key] / count, mean_stats[key], rtol=1e-5, atol=1e-6)
