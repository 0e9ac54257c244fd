"""``train.freeze``: frozen parts stay bit-identical through real training steps (online and
target), their BatchNorm statistics do not move, the optimiser holds nothing of them, and what
is not frozen trains.

Each case runs ``soco pretrain``'s own step (``PretrainStep`` on ``fixed_batch.job_for_batch``) twice on a
synthetic batch of 64 px views.
"""

from __future__ import annotations

import pytest
import torch
from data_fixtures import small_pretrain_config

from soco_pretrain.data.synthetic import synthetic_batch
from soco_pretrain.engine.skips import SkipLog
from soco_pretrain.model.freeze import frozen_parts
from soco_pretrain.train.fixed_batch import job_for_batch
from soco_pretrain.train.loop import Position, PretrainStep

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(cfg, n_views: int) -> dict:
    return synthetic_batch(cfg.data.views, 2, k=2, n_views=n_views)


def _snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# fpn/backbone by default; the others with -m slow: the same mechanism on other submodules
CASES = [
    pytest.param("fpn", "stem", marks=pytest.mark.slow),
    ("fpn", "backbone"),
    pytest.param("fpn", "backbone+fpn", marks=pytest.mark.slow),
    pytest.param("c4", "backbone", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch, mode", CASES)
def test_frozen_parts_do_not_move_and_the_rest_trains(arch, mode):
    # ResNet-18 for FPN (freezing does not depend on the backbone; R18 is cheap); C4 needs a bottleneck one
    extra = ["model.arch=c4"] if arch == "c4" else ["model.backbone=resnet18"]
    cfg = small_pretrain_config(*extra, f"train.freeze={mode}", "train.warmup_epochs=0")
    batch = _batch(cfg, 2 if arch == "c4" else 3)
    job = job_for_batch(cfg, batch, "cpu", total_steps=10)
    core = job.core
    names = frozen_parts(arch, mode)
    assert names and core.frozen == [f"{net}.{n}" for net in ("encoder", "target_encoder") for n in names]
    before = {net: {n: _snapshot(getattr(core, net).get_submodule(n)) for n in names}
              for net in ("encoder", "target_encoder")}  # fmt: skip
    trainable_before = _snapshot(core.encoder.box_head if arch == "fpn" else core.encoder.backbone.layer4)
    step = PretrainStep(job, Position(), SkipLog())
    job.model.train()
    for i in range(2):
        step(i)

    # frozen: every tensor (weights and BN running statistics, counters included) bit-identical,
    # in both networks, and the BatchNorms still in eval mode after model.train()
    for net, parts in before.items():
        for name, state in parts.items():
            module = getattr(core, net).get_submodule(name)
            now = module.state_dict()
            assert all(torch.equal(now[k], v) for k, v in state.items()), (net, name)
            assert not module.training and not any(m.training for m in module.modules())
            assert not any(p.requires_grad for p in module.parameters())
    # the optimiser holds no frozen tensor, neither in its groups nor in its state
    frozen_ids = {id(p) for n in names for p in core.encoder.get_submodule(n).parameters()}
    grouped = {id(p) for g in job.optimizer.param_groups for p in g["params"]}
    assert frozen_ids and not frozen_ids & grouped
    assert not frozen_ids & {id(p) for p in job.optimizer.state}
    # what is not frozen has moved (the head, and the projector)
    after = (core.encoder.box_head if arch == "fpn" else core.encoder.backbone.layer4).state_dict()
    assert any(not torch.equal(after[k], v) for k, v in trainable_before.items() if v.is_floating_point())
    assert len(grouped) == sum(1 for p in core.online_parameters() if p.requires_grad)


def test_no_gradient_reaches_a_frozen_backbone():
    """A frozen backbone is outside the graph: after backward its parameters have no .grad and
    the FPN's do (the backward stops at the FPN's inputs)."""
    cfg = small_pretrain_config("train.freeze=backbone", "model.backbone=resnet18")
    job = job_for_batch(cfg, _batch(cfg, 3), "cpu")
    job.model.train()
    loss, _ = job.core(_batch(cfg, 3))
    loss.backward()
    body, fpn = job.core.encoder.backbone.body, job.core.encoder.backbone.fpn
    assert all(p.grad is None for p in body.parameters())
    assert all(p.grad is not None for p in fpn.parameters())


def test_an_optimiser_step_with_nonzero_gradients_leaves_frozen_parameters_alone():
    """Every parameter, frozen or not, is handed the same nonzero gradient and the run's optimiser
    (LARS) steps once: the frozen backbone stays bit-identical, every trainable parameter moves."""
    cfg = small_pretrain_config("train.freeze=backbone", "model.backbone=resnet18", "train.warmup_epochs=0")
    job = job_for_batch(cfg, _batch(cfg, 3), "cpu", total_steps=10)
    encoder = job.core.encoder
    frozen = dict(encoder.backbone.body.named_parameters())
    trainable = {n: p for n, p in encoder.named_parameters() if not n.startswith("backbone.body.")}
    assert frozen and trainable
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    for p in encoder.parameters():
        p.grad = torch.full_like(p, 0.01)
    job.optimizer.step()
    assert all(torch.equal(frozen[n], before[f"backbone.body.{n}"]) for n in frozen)
    assert [n for n, p in trainable.items() if torch.equal(p, before[n])] == []


def test_without_freeze_the_stem_and_its_batch_norm_train():
    """train.freeze=none (the default): one real step moves the weights of every part another mode
    would freeze (the stem, the rest of the ResNet, the FPN), and the stem's BatchNorm updates its
    running statistics."""
    cfg = small_pretrain_config("model.backbone=resnet18", "train.warmup_epochs=0")
    assert cfg.train.freeze == "none" and frozen_parts("fpn", cfg.train.freeze) == []
    job = job_for_batch(cfg, _batch(cfg, 3), "cpu", total_steps=10)
    encoder = job.core.encoder
    parts = ["backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer4", "backbone.fpn"]
    before = {name: _snapshot(encoder.get_submodule(name)) for name in parts}
    job.model.train()
    PretrainStep(job, Position(), SkipLog())(0)
    for name in parts:
        now = encoder.get_submodule(name).state_dict()
        moved = [k for k, v in before[name].items() if v.is_floating_point() and not torch.equal(now[k], v)]
        assert moved, name
    bn = encoder.get_submodule("backbone.body.bn1")
    stats = before["backbone.body.bn1"]
    assert bn.training and not torch.equal(bn.running_mean, stats["running_mean"])
    assert not torch.equal(bn.running_var, stats["running_var"])
    assert bn.num_batches_tracked.item() > stats["num_batches_tracked"].item()  # one count per view's forward
