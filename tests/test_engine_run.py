"""engine.run with a toy stage: the order of the hooks, the one resume policy (recipe keys refused
by name, run keys free, --accept-changes), exact resume, and the records of a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soco_pretrain.engine.hooks import Hook, StepOutput
from soco_pretrain.engine.metrics import read_metrics
from soco_pretrain.engine.run import differences, run
from soco_pretrain.errors import UserError


class ToyStage:
    """Least squares on 8 fixed points with SGD: a stage with no data pipeline or model zoo."""

    command = "toy"
    distributed = False
    trains = True
    keep_checkpoints = 0
    run_keys = ("log_every",)

    def __init__(self, out, lr=0.1, log_every=1, steps=4, calls=None):
        self.out, self.options = Path(out), {"lr": lr, "log_every": log_every, "steps": steps}
        self.calls = calls if calls is not None else []
        self.is_main = True

    def check(self, info, fresh):
        self.calls.append(("check", fresh))

    def build(self, info):
        torch.manual_seed(0)
        self.device, self.total_steps = info.device, self.options["steps"]
        self.w = torch.zeros(3, requires_grad=True)
        self.opt = torch.optim.SGD([self.w], lr=self.options["lr"], momentum=0.9)
        self.x = torch.arange(24.0).reshape(8, 3) / 24
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])

    def recipe(self):
        return dict(self.options)

    def recipe_of(self, checkpoint, path, accept_changes):
        if "toy" not in checkpoint:
            raise UserError(f"{path}: not a toy checkpoint")
        return checkpoint["options"]

    def state_dict(self, step):
        return {"toy": True, "w": self.w.detach().clone(), "opt": self.opt.state_dict(), "options": self.recipe()}

    def load_state_dict(self, checkpoint, path):
        with torch.no_grad():
            self.w.copy_(checkpoint["w"])
        self.opt.load_state_dict(checkpoint["opt"])

    def resumed_line(self, checkpoint, path):
        return f"resumed toy at {checkpoint['step']}"

    def finished_result(self, start):
        return None

    def begin(self, start, stop, resumed_from):
        self.calls.append(("begin", start, stop, resumed_from is not None))

    def make_step(self, start):
        def step(i):
            loss = ((self.x @ self.w - self.y) ** 2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            return StepOutput(loss=[loss.detach()], images=8)

        return step

    def metrics(self):
        every = self.options["log_every"]
        return {"desc": "toy", "tensorboard": False, "log_due": lambda tr: tr.every(every) or tr.is_last,
                "record": lambda tr, w: {"loss": w.loss}}  # fmt: skip

    def checkpoint_due(self, trainer):
        return True

    def hooks(self, writer, checkpointer):
        calls = self.calls

        class Spy(Hook):
            def after_step(self, trainer):
                calls.append(("spy", trainer.step, trainer.metrics.last_loss is not None))

        return [Spy(), writer, checkpointer]

    def finish(self, trainer, start, seconds):
        return {"step": trainer.step, "start": start, "w": self.w.detach().clone()}


def test_differences_name_nested_keys():
    old = {"train": {"lr": 1, "epochs": 2}, "seed": 0}
    new = {"train": {"lr": 2, "epochs": 2}, "seed": 0, "extra": 1}
    assert differences(old, new) == ["extra", "train.lr"]


def test_hooks_see_the_guarded_loss_and_a_split_run_equals_a_straight_one(tmp_path, capsys):
    calls: list = []
    straight = run(ToyStage(tmp_path / "a", calls=calls), tmp_path / "a", progress=False)
    # the metrics hook comes first: the stage's hook sees a loss already read by the guard
    assert [c for c in calls if c[0] == "spy"] == [("spy", s, True) for s in (1, 2, 3, 4)]
    assert calls[0] == ("check", True) and calls[1] == ("begin", 0, 4, False)
    run(ToyStage(tmp_path / "b"), tmp_path / "b", max_steps=2, progress=False)
    calls = []
    split = run(ToyStage(tmp_path / "b", calls=calls), tmp_path / "b", progress=False)
    assert calls[0] == ("check", False) and calls[1] == ("begin", 2, 4, True)
    assert split["start"] == 2 and torch.equal(split["w"], straight["w"])  # momentum restored too
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4]
    assert "resumed toy at 2" in capsys.readouterr().out


def test_a_resume_with_another_recipe_is_refused_naming_the_key(tmp_path, capsys):
    out = tmp_path / "run"
    run(ToyStage(out), out, max_steps=1, progress=False)
    with pytest.raises(UserError, match=r"made with other settings \(lr\).*--accept-changes"):
        run(ToyStage(out, lr=0.2), out, progress=False)
    run(ToyStage(out, log_every=2), out, max_steps=2, progress=False)  # a run key: resumes
    assert "note: the settings differ from the checkpoint's in log_every" in capsys.readouterr().out
    done = run(ToyStage(out, lr=0.2), out, progress=False, accept_changes=True)
    assert done["start"] == 2 and done["step"] == 4


def test_a_restart_without_a_checkpoint_drops_the_old_records(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    run(ToyStage(out), out, progress=False)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert "held records of an earlier start without a checkpoint; removed" in capsys.readouterr().out


def test_another_stages_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    run(ToyStage(out), out, max_steps=1, progress=False)
    checkpoint = out / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=False)
    del state["toy"]
    torch.save(state, checkpoint)
    (out / "checkpoints" / "last.pt.sha256").unlink(missing_ok=True)
    with pytest.raises(UserError, match="not a toy checkpoint"):
        run(ToyStage(out), out, progress=False)
