"""Non-finite numbers and out-of-range seeds: refused in the config, never checkpointed, never read.

- Config: inf / nan in any float field or list of floats (``.inf``, ``1e400``, ``.nan``) and a
  seed outside [0, 2**32) are one-line errors (exit 2), from ``--set`` and from a file.
- Training: a checkpoint whose weights hold NaN or inf is not written; the run stops with the
  non-finite error, naming the last good checkpoint.
- Reading: every weights reader (export, kNN, --init, the fine-tune detector, the linear probe, a
  resume) refuses such a file in one line naming it and its first bad tensor.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import call
from test_knn import make_coloured_set

from soco_pretrain.config import ConfigError, KnnOptions, TrainConfig, ViewsConfig
from soco_pretrain.engine.checkpoint import (
    Checkpointer,
    CheckpointManager,
    NonFiniteWeightsError,
    load_checkpoint,
    save_checkpoint,
)
from soco_pretrain.engine.metrics import Metrics
from soco_pretrain.engine.trainer import StepOutput, Trainer
from soco_pretrain.errors import NonFiniteLossError, UserError
from soco_pretrain.weights import WeightsError, load_weights_file

pytestmark = pytest.mark.usefixtures("one_thread")

BAD = "encoder.backbone.body.layer1.0.conv1.weight"  # the NaN tensor of the files below


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nonfinite") / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(folder / f"{i}.png")
    return folder


def _one_line(status, err, words):
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soco: error: ") and words in lines[0], err
    return lines[0]


# ---------------------------------------------------------------- the config


@pytest.mark.parametrize(
    "item, words",
    [
        ("train.base_lr=.inf", "--set train.base_lr=Infinity: must be a finite number"),
        ("train.base_lr=1e400", "--set train.base_lr=Infinity: must be a finite number"),  # overflows to inf
        ("train.weight_decay=.inf", "--set train.weight_decay=Infinity: must be a finite number"),
        ("train.final_lr=.inf", "--set train.final_lr=Infinity: must be a finite number"),
        ("train.momentum=.nan", "--set train.momentum=NaN: must be a finite number"),
        ("data.views.crop_ratio=[0.5, .inf]", "--set data.views.crop_ratio=[0.5, Infinity]: must be a finite"),
        ("data.augment.blur_sigma=[.nan, 2.0]", "--set data.augment.blur_sigma=[NaN, 2.0]: must be a finite"),
    ],
)
def test_inf_and_nan_in_a_set_are_one_line_errors(item, words, images, tmp_path, capsys):
    status, _, err = call(
        ["pretrain", "--preset", "tiny", "--images", str(images), "--out", str(tmp_path / "run"), "--set", item], capsys
    )
    _one_line(status, err, words)
    assert not (tmp_path / "run").exists()


def test_inf_in_a_config_file_is_a_one_line_error_naming_the_file(images, tmp_path, capsys):
    path = tmp_path / "my.yaml"
    path.write_text("train:\n  base_lr: .inf\ndata:\n  views:\n    crop_scale: [0.5, 1.0]\n")
    args = ["--images", str(images), "--out", str(tmp_path / "run"), "--config", str(path)]
    status, _, err = call(["pretrain", *args], capsys)
    _one_line(status, err, f"{path}: train.base_lr=Infinity: must be a finite number")
    # another command's options: a list field of soco knn
    (tmp_path / "t.json").write_text('{"images": [], "annotations": [], "categories": []}')
    path.write_text("level_bounds: [21, 41, .inf]\n")
    coco = ["--weights", "none", "--train-json", str(tmp_path / "t.json"), "--train-images", str(images)]
    coco += ["--val-json", str(tmp_path / "t.json"), "--val-images", str(images), "--out", str(tmp_path / "knn")]
    status, _, err = call(["knn", *coco, "--config", str(path)], capsys)
    _one_line(status, err, f"{path}: level_bounds=[21, 41, Infinity]: must be a finite number")


def test_the_python_api_refuses_them_too():
    for make in (
        lambda: TrainConfig(base_lr=float("nan")),  # nan used to fail "must be positive"
        lambda: TrainConfig(final_lr=float("inf")),
        lambda: ViewsConfig(crop_ratio=(0.5, float("inf"))),
        lambda: KnnOptions(temperature=float("inf")),
    ):
        with pytest.raises(ConfigError, match="must be a finite number"):
            make()


# seeds reach torch.manual_seed (< 2**64), numpy default_rng (>= 0) and, for kNN and the monitor,
# scikit-learn's random_state (< 2**32): one range for all
@pytest.mark.parametrize(
    "command, item",
    [
        ("pretrain", "train.seed=99999999999999999999999"),
        ("pretrain", "train.seed=18446744073709551616"),
        ("pretrain", "data.seed=-1"),
        ("pretrain", "monitor.seed=4294967296"),
        ("knn", "seed=4294967296"),
        ("linear", "seed=-3"),
        ("finetune", "seed=99999999999999999999999"),
    ],
)
def test_a_seed_out_of_range_is_a_one_line_error(command, item, images, tmp_path, capsys):
    (tmp_path / "t.json").write_text('{"images": [], "annotations": [], "categories": []}')
    for split in ("train", "val"):
        (tmp_path / split / "red").mkdir(parents=True)
    coco = ["--weights", "none", "--train-json", str(tmp_path / "t.json"), "--train-images", str(images)]
    coco += ["--val-json", str(tmp_path / "t.json"), "--val-images", str(images)]
    inputs = {
        "pretrain": ["--preset", "tiny", "--images", str(images)],
        "knn": coco,
        "finetune": coco,
        "linear": ["--weights", "none", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val")],
    }[command]
    status, _, err = call([command, *inputs, "--out", str(tmp_path / "out"), "--set", item], capsys)
    _one_line(status, err, f"--set {item}: must be in [0, 4294967295]")
    assert TrainConfig(seed=2**32 - 1).seed == 2**32 - 1  # the top of the range is fine


# ---------------------------------------------------------------- never written


class _Diverging:
    """One optimiser step of a tiny model whose update makes the weights NaN at step ``at`` while
    the loss (computed before the update) stays finite: what the loss guard cannot see."""

    def __init__(self, at: int):
        self.model, self.at = torch.nn.Linear(2, 2), at

    def __call__(self, step: int) -> StepOutput:
        if step + 1 == self.at:
            with torch.no_grad():
                self.model.weight[0, 1] = float("nan")
        return StepOutput(loss=1.0, images=1)


def test_a_checkpoint_with_nan_weights_is_not_written_and_the_run_stops(tmp_path):
    step_fn = _Diverging(at=3)
    manager = CheckpointManager(tmp_path, keep=3)
    checkpointer = Checkpointer(
        manager, lambda: {"model": step_fn.model.state_dict(), "step": trainer.step}, due=lambda tr: tr.every(2)
    )
    metrics = Metrics(
        tmp_path,
        total_steps=6,
        initial=0,
        log_due=lambda tr: False,
        record=lambda tr, w: {},
        progress=False,
        tensorboard=False,
        hint="Try a lower lr.",
    )
    trainer = Trainer(step_fn, 0, 6, [metrics, metrics.writer, checkpointer])
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run()
    message = str(info.value)
    assert message == (
        f"non-finite weights (1 of 2 tensors, first weight) at step 4; stopped without saving. "
        f"Last good checkpoint: {manager.last}. Try a lower lr."
    )
    assert [p.name for p in manager.numbered()] == ["step_00000002.pt"]
    assert load_checkpoint(manager.last)["step"] == 2  # the last good one, still finite


# ---------------------------------------------------------------- never read


def _nan_soco_checkpoint(path: Path) -> Path:
    model = {
        "encoder.backbone.body.conv1.weight": torch.ones(2, 3),
        BAD: torch.tensor([1.0, float("nan")]),
        "encoder.backbone.body.bn1.num_batches_tracked": torch.tensor(3),
        "target_encoder.backbone.body.conv1.weight": torch.tensor([float("inf")]),
    }
    save_checkpoint(path, {"model": model, "step": 5, "optimizer": {}, "config": {"model": {"arch": "fpn"}}})
    return path


def test_every_weights_format_with_nan_is_refused_naming_the_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    ckpt = _nan_soco_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    st = tmp_path / "w.safetensors"
    save_file({"backbone.body.conv1.weight": torch.tensor([float("-inf")])}, str(st))
    pkl = tmp_path / "d2.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {"backbone.bottom_up.stem.conv1.weight": np.array([np.nan], np.float32)}}, f)
    for source, path, name, counts in (
        (tmp_path / "run", ckpt, BAD, "2 of 3"),  # a run folder resolves to last.pt
        (st, st, "backbone.body.conv1.weight", "1 of 1"),
        (pkl, pkl, "backbone.bottom_up.stem.conv1.weight", "1 of 1"),
    ):
        with pytest.raises(WeightsError) as info:
            load_weights_file(source)
        message = str(info.value)
        assert message.startswith(f"{path}: {counts} weight tensors hold NaN or inf (first: {name})"), message
        assert "\n" not in message
    # the resumes (pretrain, finetune, linear) read through load_checkpoint: the same line
    with pytest.raises(NonFiniteWeightsError, match=f"^{ckpt}: 2 of 3 weight tensors hold NaN or inf"):
        load_checkpoint(ckpt)


def test_export_refuses_nan_weights(tmp_path, capsys):
    ckpt = _nan_soco_checkpoint(tmp_path / "last.pt")
    out = tmp_path / "tv.pth"
    status, _, err = call(["export", str(ckpt), "--to", "torchvision", "-o", str(out)], capsys)
    _one_line(status, err, f"{ckpt}: 2 of 3 weight tensors hold NaN or inf (first: {BAD})")
    assert not out.exists()


def test_knn_refuses_nan_weights(tmp_path, capsys):
    ckpt = _nan_soco_checkpoint(tmp_path / "last.pt")
    train = make_coloured_set(tmp_path / "train", "train", 2, seed=1)
    val = make_coloured_set(tmp_path / "val", "val", 2, seed=2)
    args = ["--weights", str(ckpt), "--train-json", str(train), "--train-images", str(train.parent / "images")]
    args += ["--val-json", str(val), "--val-images", str(val.parent / "images"), "--out", str(tmp_path / "knn")]
    status, _, err = call(["knn", *args, "--workers", "0", "--min-box", "8", "--size", "64", "--no-progress"], capsys)
    _one_line(status, err, f"{ckpt}: 2 of 3 weight tensors hold NaN or inf (first: {BAD})")
    assert not (tmp_path / "knn" / "knn.json").exists()


def test_an_init_with_nan_stops_before_the_run_folder_is_written(images, tmp_path, capsys):
    # a torchvision ResNet state dict, as an ImageNet download would be
    init = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.ones(1), "layer1.0.bn1.running_var": torch.tensor([float("nan")])}, init)
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--images", str(images), "--out", str(out), "--init", str(init)]
    status, _, err = call(["pretrain", *args, "--set", "data.views.proposal_source=whole_image"], capsys)
    _one_line(status, err, f"--init {init}: 1 of 2 weight tensors hold NaN or inf (first: layer1.0.bn1.running_var)")
    assert not out.exists()
    # the warm start's own reader, called directly
    from soco_pretrain.config import ModelConfig
    from soco_pretrain.transfer.warm_start import prepare_init

    with pytest.raises(UserError, match=f"^--init {init}: 1 of 2 weight tensors .*layer1.0.bn1.running_var"):
        prepare_init(init, ModelConfig(backbone="resnet18"))


def test_the_fine_tune_detector_and_the_linear_probe_refuse_nan_weights(tmp_path):
    from soco_pretrain.transfer.detector import read_weights
    from soco_pretrain.transfer.linear import _backbone_state

    ckpt = _nan_soco_checkpoint(tmp_path / "last.pt")
    with pytest.raises(WeightsError, match=f"^{ckpt}: 2 of 3 weight tensors hold NaN or inf"):
        read_weights(ckpt)  # soco finetune --weights
    with pytest.raises(UserError, match=f"^{ckpt}: 2 of 3 weight tensors hold NaN or inf"):
        _backbone_state(ckpt, "online")  # soco linear --weights


def test_a_resume_from_a_checkpoint_with_nan_is_refused_naming_the_file(images, tmp_path, capsys):
    ckpt = _nan_soco_checkpoint(tmp_path / "nan.pt")
    args = ["--preset", "tiny", "--images", str(images), "--out", str(tmp_path / "run"), "--resume", str(ckpt)]
    args += ["--set", "data.views.proposal_source=whole_image", "--set", "model.backbone=resnet18"]
    status, _, err = call(["pretrain", *args, "--set", "train.workers=0"], capsys)
    _one_line(status, err, f"{ckpt}: 2 of 3 weight tensors hold NaN or inf (first: {BAD})")
