"""metrics.jsonl (written, flushed, read back, resumes), the progress bar, `soco show curves`."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image
from test_cli import call  # main(argv) in-process -> (status, out, err)

from soco_pretrain.engine import metrics as M
from soco_pretrain.engine.metrics import MetricsLogger, Progress, read_metrics
from soco_pretrain.viz import plot_curves


def write_run(run, steps=range(0, 50, 5), **extras):
    with MetricsLogger(run, tensorboard=False) as logger:
        for step in steps:
            logger.log(
                step,
                epoch=step // 20,
                loss=-2.0 - step / 50,
                lr=0.01 * step,
                tau=0.99 + step / 10000,
                images_per_s=100.0 + step,
                data_wait=0.1,
                **extras,
            )


def test_lines_are_flushed_as_written_and_read_back(tmp_path):
    import torch

    logger = MetricsLogger(tmp_path / "run", tensorboard=False)
    record = logger.log(
        3,
        epoch=0,
        loss=torch.tensor(-1.5),
        lr=0.25,
        tau=0.99,
        images_per_s=12.5,
        data_wait=0.2,
        grad_norm=torch.tensor(2.0),
    )
    # Readable before close: each line is flushed.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == record
    assert record["loss"] == -1.5 and record["grad_norm"] == 2.0 and isinstance(record["time"], float)
    logger.log(4, loss=float("nan"))  # JSON has no NaN: stored as null
    logger.close()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 4]
    assert {k: records[0][k] for k in ("epoch", "lr", "tau", "images_per_s", "data_wait")} == {
        "epoch": 0,
        "lr": 0.25,
        "tau": 0.99,
        "images_per_s": 12.5,
        "data_wait": 0.2,
    }
    assert records[1]["loss"] is None


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False)
    assert logger.log(1, loss=1.0) is None
    logger.close()
    assert not (tmp_path / "run").exists()


def test_resume_appends_and_reading_keeps_the_continued_history(tmp_path):
    run = tmp_path / "run"
    write_run(run, steps=[10, 20, 30, 40])
    write_run(run, steps=[30, 40, 50])  # resumed from the step-20 checkpoint... at 30 after a crash
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 60, "loss": -2.')  # a line cut off by a crash
    records = read_metrics(run)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 8


def test_missing_tensorboard_gives_one_note(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.setattr(M, "_tensorboard_note_shown", False)
    for name in ("a", "b"):
        MetricsLogger(tmp_path / name).close()
    err = capsys.readouterr().err
    assert err.count("TensorBoard logging is off") == 1


def test_progress_bar(capsys):
    with Progress(total=10, initial=2) as bar:
        bar.update(5, loss=-3.25, lr=0.5, tau=0.995, images_per_s=40.0, data_wait=0.25)
        assert bar._bar.n == 5
        bar.write("hello")
    err = capsys.readouterr()
    assert "hello" in err.out + err.err
    silent = Progress(total=10, enabled=False)
    silent.update(3, loss=1.0)
    silent.write("not shown")
    silent.close()
    assert "not shown" not in "".join(capsys.readouterr())


def test_plot_curves_writes_a_png(tmp_path):
    write_run(tmp_path / "run", steps=range(0, 200, 5))
    (path,) = plot_curves(tmp_path / "run", tmp_path / "pictures")
    assert path == tmp_path / "pictures" / "curves.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 500
    with pytest.raises(ValueError, match="no metrics"):
        plot_curves(tmp_path, records=[])


def test_show_curves_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    status, out, _ = call(["show", "curves", str(run)], capsys)
    assert status == 0 and (run / "curves.png").is_file()
    assert "curves.png" in out
    status, _, _ = call(["show", "curves", str(run), "-o", str(tmp_path / "out")], capsys)
    assert status == 0 and (tmp_path / "out" / "curves.png").is_file()


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda run: run.mkdir(), "no metrics.jsonl"),
        (lambda run: None, "no such run folder"),
        (lambda run: (run.mkdir(), (run / "metrics.jsonl").write_text("")), "no step logged yet"),
    ],
)
def test_show_curves_without_metrics_is_a_one_line_error(setup, words, tmp_path, capsys):
    run = tmp_path / "run"
    setup(run)
    status, _, err = call(["show", "curves", str(run)], capsys)
    assert status == 2
    assert err.startswith("soco: error:") and words in err and len(err.strip().splitlines()) == 1


def test_show_curves_help_has_an_example(capsys):
    status, out, _ = call(["show", "curves", "--help"], capsys)
    assert status == 0 and "soco show curves" in out.split("examples:")[1]


def test_plain_values():
    assert M._plain(float("inf")) is None and M._plain(2) == 2 and math.isclose(M._plain(0.5), 0.5)
