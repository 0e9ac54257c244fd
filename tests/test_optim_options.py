"""Small-budget training options of ``soco pretrain`` (ours, not the paper's): ``train.optimizer=sgd``,
``train.warmup_steps`` and ``train.ema_schedule=constant``. Each against a hand-computed oracle:
the SGD update and its momentum, the decay groups and frozen parts through ``model_parts``, the
constant EMA rate through a real step, the warm-up ramp in steps, and a resume that is bit for
bit the uninterrupted run (and refused when the optimiser changes)."""

from __future__ import annotations

import math

import pytest
import torch
from data_fixtures import make_photos, make_store, small_pretrain_config
from torch import nn

from soco_pretrain.cli import main
from soco_pretrain.config import ConfigError, PretrainConfig, TrainConfig, apply_overrides, to_dict
from soco_pretrain.data.synthetic import synthetic_batch
from soco_pretrain.engine.checkpoint import CheckpointManager, load_checkpoint, rng_state, save_checkpoint
from soco_pretrain.engine.run import resume_stage
from soco_pretrain.engine.schedule import lr_at, tau_at
from soco_pretrain.engine.skips import SkipLog
from soco_pretrain.errors import UserError
from soco_pretrain.model.freeze import frozen_parts
from soco_pretrain.train.fixed_batch import job_for_batch
from soco_pretrain.train.lars import LARS
from soco_pretrain.train.loop import Position, PretrainStage, PretrainStep, make_optimizer, make_plan, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(*extra: str):
    """The tests' small pretraining setting on a ResNet-18 with a small head (as test_runfolder)."""
    return small_pretrain_config("model.backbone=resnet18", "model.head_dim=256", "model.proj_hidden=512", *extra)


def _batch(cfg) -> dict:
    return synthetic_batch(cfg.data.views, 2, k=2, n_views=3)


# ---------------------------------------------------------------- train.optimizer=sgd


def test_sgd_step_matches_the_hand_computed_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    lr, wd, m = 0.5, 0.1, 0.9
    opt = make_optimizer(model, TrainConfig(optimizer="sgd", weight_decay=wd, momentum=m), lr)
    assert type(opt) is torch.optim.SGD
    weight, bias, bn_weight, bn_bias = model[0].weight, model[0].bias, model[1].weight, model[1].bias
    decayed = {id(weight)}
    params = [weight, bias, bn_weight, bn_bias]
    p0 = [p.detach().clone() for p in params]
    g1 = [torch.randn_like(p) for p in params]
    g2 = [torch.randn_like(p) for p in params]

    for p, g in zip(params, g1):
        p.grad = g.clone()
    opt.step()
    # step 1: buf = d (buf starts at 0), p1 = p0 - lr * d with d = g + wd * p for weights, g otherwise
    d1 = [g + wd * p if id(q) in decayed else g for q, p, g in zip(params, p0, g1)]
    p1 = [p - lr * d for p, d in zip(p0, d1)]
    for q, expected in zip(params, p1):
        torch.testing.assert_close(q.detach(), expected, rtol=1e-12, atol=1e-12)
    # the hand values of step 1 for the three kinds, written out
    torch.testing.assert_close(weight.detach(), p0[0] - lr * (g1[0] + wd * p0[0]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bias.detach(), p0[1] - lr * g1[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn_weight.detach(), p0[2] - lr * g1[2], rtol=1e-12, atol=1e-12)

    for p, g in zip(params, g2):
        p.grad = g.clone()
    opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lr / 2  # the loop sets the lr every step
    opt.step()
    # step 2: buf = m * buf + d (no dampening, no Nesterov), p2 = p1 - lr * buf
    d2 = [g + wd * p if id(q) in decayed else g for q, p, g in zip(params, p1, g2)]
    buf2 = [m * b + d for b, d in zip(d1, d2)]
    for q, p, b in zip(params, p1, buf2):
        torch.testing.assert_close(q.detach(), p - (lr / 2) * b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[q]["momentum_buffer"], b, rtol=1e-12, atol=1e-12)


def test_model_parts_builds_sgd_with_decay_groups_and_no_frozen_parameter():
    cfg = _config("train.optimizer=sgd", "train.freeze=backbone", "train.weight_decay=0.001", "train.momentum=0.8")
    job = job_for_batch(cfg, _batch(cfg), "cpu")
    opt, core = job.optimizer, job.core
    assert type(opt) is torch.optim.SGD
    assert [g["weight_decay"] for g in opt.param_groups] == [0.001, 0.0]
    for group in opt.param_groups:
        assert (group["momentum"], group["nesterov"], group["dampening"]) == (0.8, False, 0)
        assert "lars_exclude" not in group
    weights, no_decay = (g["params"] for g in opt.param_groups)
    assert all(p.ndim > 1 for p in weights) and all(p.ndim <= 1 for p in no_decay)
    # every bias and BatchNorm parameter of the trainable part is in the no-decay group
    head_norms = [m for m in core.encoder.box_head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert head_norms and all(any(m.weight is p for p in no_decay) for m in head_norms)
    # frozen parameters are in no group; the trainable online ones all are, once
    frozen = {id(p) for n in frozen_parts("fpn", "backbone") for p in core.encoder.get_submodule(n).parameters()}
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert frozen and not frozen & set(grouped)
    assert sorted(grouped) == sorted(id(p) for p in core.online_parameters() if p.requires_grad)
    # and the default is still the paper's LARS
    assert type(job_for_batch(_config(), _batch(cfg), "cpu").optimizer) is LARS


# ---------------------------------------------------------------- train.ema_schedule=constant


def test_constant_tau_is_ema_tau_at_every_step():
    for step in (0, 50, 100, 150):
        assert tau_at(step, 100, 0.99, schedule="constant") == 0.99
        assert tau_at(step, 100, 0.9, "constant") == 0.9
    # the default is still BYOL's cosine: 0.99 -> (1 + 0.99) / 2 half-way -> 1
    assert [tau_at(s, 100, 0.99) for s in (0, 50, 100)] == pytest.approx([0.99, 0.995, 1.0])
    with pytest.raises(ValueError, match="cosine, constant"):
        tau_at(0, 100, 0.99, "linear")


def test_a_pretrain_step_with_constant_tau_moves_the_target_by_it():
    cfg = _config("train.ema_schedule=constant", "train.ema_tau=0.9", "train.optimizer=sgd")
    job = job_for_batch(cfg, _batch(cfg), "cpu", total_steps=10)
    core = job.core
    online = core.projector.linear1.weight  # a trainable tensor, and its target twin
    target = core.target_projector.linear1.weight
    assert online.shape == target.shape and online is not target
    step = PretrainStep(job, Position(), SkipLog())
    job.model.train()
    step(0)  # the online and target networks part (they start equal)
    target_before, online_before = target.detach().clone(), online.detach().clone()
    out = step(6)  # cosine would give 1 - 0.1 * (cos(0.6 pi) + 1) / 2 = 0.965 here
    assert out.scalars["tau"] == 0.9
    assert not torch.equal(online.detach(), online_before)  # the online network moved
    expected = 0.9 * target_before + (1 - 0.9) * online.detach()
    torch.testing.assert_close(target.detach(), expected, rtol=0, atol=1e-7)
    assert not torch.allclose(target.detach(), target_before, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- train.warmup_steps


def test_warmup_steps_take_precedence_over_warmup_epochs():
    cfg = _config("train.warmup_steps=5", "train.warmup_epochs=3", "train.epochs=2", "train.base_lr=128.0")
    plan = make_plan(cfg, world_size=1, micro_batches_per_epoch=5, device="cpu")
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (5, 10, 5)  # not 3 x 5 = 15
    assert plan.peak_lr == 1.0  # 128 x 2 / 256
    assert make_plan(apply_overrides(cfg, ["train.warmup_steps=null"]), 1, 5, "cpu").warmup_steps == 15
    assert make_plan(apply_overrides(cfg, ["train.warmup_steps=0"]), 1, 5, "cpu").warmup_steps == 0
    # linear from 0 over 5 steps, then half a cosine over the other 5: step 6 is 1/5 into it
    ramp = [lr_at(s, plan.total_steps, plan.warmup_steps, plan.peak_lr) for s in range(7)]
    assert ramp == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.5 * (1 + math.cos(math.pi / 5))])
    assert ramp[6] == pytest.approx(0.9045084972)


def test_warmup_steps_must_be_at_least_0():
    assert TrainConfig().warmup_steps is None  # the paper's warm-up in epochs by default
    with pytest.raises(ConfigError, match=r"^warmup_steps=-1: must be at least 0$"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ConfigError, match=r"^--set train.warmup_steps=-2: must be at least 0$"):
        apply_overrides(PretrainConfig(), ["train.warmup_steps=-2"])


def test_a_typo_in_the_new_options_is_a_one_line_cli_error(tmp_path, capsys):
    images = tmp_path / "images"
    make_photos(images, names=("coffee",), side=64)
    base = ["pretrain", "--preset", "tiny", "--images", str(images), "--out", str(tmp_path / "run")]
    for item, words in [
        ("train.optimizer=sdg", "--set train.optimizer=sdg: expected one of lars, sgd"),
        ("train.optimiser=sgd", "unknown key 'train.optimiser'; did you mean 'train.optimizer'?"),
        ("train.ema_schedule=linear", "--set train.ema_schedule=linear: expected one of cosine, constant"),
        ("train.warmup_steps=-1", "--set train.warmup_steps=-1: must be at least 0"),
    ]:
        try:
            status = main([*base, "--set", item])
        except SystemExit as exc:
            status = exc.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("soco: error: ") and words in lines[0], err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- checkpoints and resume


@pytest.fixture(scope="module")
def two_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("optim_options")
    rel = make_photos(root / "images", side=96)[:2]
    store = make_store(root / "store", root / "images", rel, boxes_per_image=6)
    listed = root / "images" / "two.txt"  # beside the images, so paths match the store's
    listed.write_text("".join(f"{root / 'images' / p}\n" for p in rel))
    return listed, store


def _same(a, b, path: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_sgd_resume_equals_an_uninterrupted_run_and_another_optimizer_is_refused(tmp_path, two_photos, capsys):
    listed, store = two_photos
    sgd = ("train.optimizer=sgd", "train.ema_schedule=constant", "train.warmup_steps=0", "train.epochs=2")
    cfg = _config(*sgd)
    split, straight = tmp_path / "split", tmp_path / "straight"
    assert pretrain(cfg, listed, store, split, max_steps=1, progress=False).step == 1
    assert "sgd lr 0.03125 after 0 warm-up steps, tau 0.99 constant" in capsys.readouterr().out
    # another optimiser is another training: refused in one line naming the key, nothing run
    with pytest.raises(UserError, match=r"made with other settings \(train.optimizer\).*--accept-changes"):
        pretrain(_config(*sgd[1:]), listed, store, split, max_steps=2, progress=False)
    resumed = pretrain(cfg, listed, store, split, max_steps=2, progress=False)
    assert (resumed.start_step, resumed.step, resumed.finished) == (1, 2, True)
    pretrain(cfg, listed, store, straight, progress=False)

    a, b = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (split, straight))
    assert a["step"] == b["step"] == 2
    _same(a["model"], b["model"], "model")  # online and target weights, BN buffers: bit for bit
    _same(a["optimizer"], b["optimizer"], "optimizer")  # SGD's momentum buffers too
    assert a["optimizer"]["state"] and all("momentum_buffer" in s for s in a["optimizer"]["state"].values())
    assert {g["nesterov"] for g in a["optimizer"]["param_groups"]} == {False}

    # accepted, the change starts LARS afresh (SGD's state does not fit it) and says so
    capsys.readouterr()
    changed = pretrain(_config(*sgd[1:3], "train.epochs=3"), listed, store, split, progress=False,
                       accept_changes=True)  # fmt: skip
    assert (changed.start_step, changed.step) == (2, 3)
    assert "train.optimizer was sgd, now lars" in capsys.readouterr().out
    assert all("eta" in g for g in load_checkpoint(split / "checkpoints" / "last.pt")["optimizer"]["param_groups"])


def _save_job_checkpoint(job, path, config: dict) -> None:
    save_checkpoint(path, {
        "model": job.core.state_dict(), "optimizer": job.optimizer.state_dict(), "step": 0, "epoch": 0,
        "batch_in_epoch": 0, "rng": rng_state(), "scaler": job.scaler.state_dict(), "config": config,
    })  # fmt: skip


def test_a_checkpoint_from_before_the_options_resumes_as_lars_with_cosine_tau(tmp_path):
    cfg = _config()
    job = job_for_batch(cfg, _batch(cfg), "cpu")
    old = to_dict(job.cfg)
    for key in ("optimizer", "ema_schedule", "warmup_steps"):  # what an older checkpoint holds
        del old["train"][key]
    path = tmp_path / "old.pt"
    _save_job_checkpoint(job, path, old)
    manager = CheckpointManager(tmp_path / "run")
    stage = PretrainStage(cfg, None, None, tmp_path / "run").attach(job)
    assert resume_stage(stage, manager, str(path), False) == (0, path)  # the defaults are what it trained with
    sgd_cfg = _config("train.optimizer=sgd")
    sgd_job = job_for_batch(sgd_cfg, _batch(sgd_cfg), "cpu")
    with pytest.raises(UserError, match=r"made with other settings \(train.optimizer\)"):
        resume_stage(PretrainStage(sgd_cfg, None, None, tmp_path / "run").attach(sgd_job), manager, str(path), False)
