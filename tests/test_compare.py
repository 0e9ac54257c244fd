"""soco compare: arms, seed pairing, shards, resume, the specification guard, the paired t interval,
the report files, the weights each arm saw and one-line errors. Arms run with fake runners (no
training); the run folders hold tiny soco checkpoints (a 2-element tensor and a step)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from soco_pretrain.cli import main
from soco_pretrain.errors import PathError, UserError
from soco_pretrain.evaluate import compare
from soco_pretrain.evaluate.compare import (
    RANDOM_INIT,
    CompareSpec,
    Init,
    child_commands,
    collect,
    load_result,
    parse_init,
    prepare_out,
    read_spec,
    run_compare,
    run_devices,
    shard_arms,
)
from soco_pretrain.evaluate.report import arm_metrics, format_markdown, mean_sd, paired_ci, summarize, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def call(argv, capsys):
    """main(argv) in-process -> (exit status, stdout, stderr); argparse exits become statuses."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def save_run(run: Path, step: int) -> Path:
    """A soco checkpoint of ``step`` in run folder ``run`` (weights differ per step); its last.pt."""
    import torch

    from soco_pretrain.engine.checkpoint import CheckpointManager

    return CheckpointManager(run, keep=1).save({"model": {"encoder.w": torch.full((2,), float(step))}, "step": step})


def sha12(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


@pytest.fixture
def data(tmp_path):
    """Two tiny COCO JSONs, an image folder and three run folders with a step-1 checkpoint each (no
    manifests)."""
    images = tmp_path / "imgs"
    images.mkdir()
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    for name in ("train.json", "val.json"):
        (tmp_path / name).write_text(json.dumps(coco))
    runs = [tmp_path / "runs" / f"ss{i}" for i in range(3)]
    for run in runs:
        run.mkdir(parents=True)
        save_run(run, 1)
    return {
        "root": tmp_path,
        "images": images,
        "runs": runs,
        "args": [
            "--train-json",
            tmp_path / "train.json",
            "--train-images",
            images,
            "--val-json",
            tmp_path / "val.json",
            "--val-images",
            images,
        ],
    }


# what each fake arm scores: bbox AP = base of the init + seed + 10 x fraction
BASE = {RANDOM_INIT: 10.0, "soco": 12.0}


def fake_finetune_result(arm) -> dict:
    ap = BASE.get(arm.init.name, 5.0) + arm.seed + 10 * arm.fraction
    return {
        "bbox": {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2, "APs": -1.0, "APm": ap, "APl": ap},
        "iterations": 4,
        "max_iters": 4,
        "fraction": arm.fraction,
        "seed": arm.seed,
    }


@pytest.fixture
def fake_runner(monkeypatch):
    """Replace compare.run_arm: writes a finished metrics.json and records every call."""
    calls = []

    def run(arm, spec, out_dir):
        calls.append((arm.init.name, arm.fraction, arm.seed, arm.weights, str(out_dir)))
        result = fake_finetune_result(arm)
        (out_dir / "metrics.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(compare, "run_arm", run)
    return calls


def spec_of(inits, fractions=(0.1, 1.0), seeds=3, metric="finetune", options=None) -> CompareSpec:
    return CompareSpec(
        tuple(inits),
        fractions,
        seeds,
        metric,
        "t.json",
        "imgs",
        "v.json",
        "imgs",
        options if options is not None else {"max_iters": 4},
    )


# ---------------------------------------------------------------- inits and arms


def test_parse_init_forms(data):
    a, b, c = (str(r) for r in data["runs"])
    assert parse_init("none") == Init(RANDOM_INIT, (None,))
    assert parse_init("NONE").name == RANDOM_INIT
    single = parse_init(a + "/")
    assert single.name == "ss0" and single.paths == (a,)
    group = parse_init(f"soco={a},{b},{c}")
    assert group.name == "soco" and group.paths == (a, b, c)
    assert [group.weights_for(s) for s in range(5)] == [a, b, c, a, b]  # member s % len
    assert parse_init("scratch=none").paths == (None,)
    with pytest.raises(UserError, match="no such run folder"):
        parse_init(str(data["root"] / "nope"))
    with pytest.raises(UserError, match="NAME=PATH"):
        parse_init(f"={a}")
    with pytest.raises(UserError, match="no empty path"):
        parse_init(f"x={a},,{b}")


def test_arms_pair_every_init_on_each_fraction_and_seed(data, tmp_path):
    a, b = (str(r) for r in data["runs"][:2])
    spec = spec_of([parse_init("none"), parse_init(f"soco={a},{b}")], fractions=(0.05, 1.0), seeds=3)
    arms = spec.arms()
    assert len(arms) == 2 * 2 * 3
    assert [arm.index for arm in arms] == list(range(12))
    # each (fraction, seed) has every init once: the pairs of the paired differences
    pairs = {}
    for arm in arms:
        pairs.setdefault((arm.fraction, arm.seed), []).append(arm.init.name)
    assert sorted(pairs) == [(f, s) for f in (0.05, 1.0) for s in range(3)]
    assert all(names == [RANDOM_INIT, "soco"] for names in pairs.values())
    soco = [arm for arm in arms if arm.init.name == "soco"]
    assert [arm.weights for arm in soco] == [a, b, a, a, b, a]  # seed s -> member s % 2
    assert all(arm.weights is None for arm in arms if arm.init.name == RANDOM_INIT)
    assert arms[7].folder(tmp_path) == tmp_path / "arms" / "soco" / "f1" / "s0"
    assert arms[0].folder(tmp_path) == tmp_path / "arms" / "random_init" / "f0.05" / "s0"
    assert arms[7].label == "soco f1 s0"


def test_run_arm_gives_every_init_the_same_subset_seed(monkeypatch, tmp_path, data):
    """finetune and knn get fraction/seed from the arm alone (their subset is a function of them)."""
    seen = []

    @dataclass
    class FakeOptions:  # records what run_arm sets
        fraction: float = 1.0
        seed: int = 0
        train_fraction: float = 1.0
        max_iters: int | None = None
        train_sizes: tuple = ()
        resume: str = "none"
        workers: int = 0
        device: str | None = None
        progress: bool = True
        log_every: int = 1
        checkpoint_every: int = 1
        k: int = 20
        allow_leak: bool = False

    def fake_finetune(weights, train_json, train_images, val_json, val_images, out, options, allow_leak=False):
        assert allow_leak  # check_leaks ran once for all arms
        seen.append(("finetune", weights, options))
        return {}

    def fake_knn(weights, train_json, train_images, val_json, val_images, out, options):
        seen.append(("knn", weights, options))
        return {}

    monkeypatch.setitem(
        sys.modules,
        "soco_pretrain.transfer.finetune",
        types.SimpleNamespace(FinetuneOptions=FakeOptions, finetune=fake_finetune),
    )
    monkeypatch.setitem(
        sys.modules, "soco_pretrain.evaluate.knn", types.SimpleNamespace(KnnOptions=FakeOptions, knn_eval=fake_knn)
    )
    inits = [parse_init("none"), parse_init(f"soco={data['runs'][0]},{data['runs'][1]}")]
    spec = spec_of(inits, fractions=(0.1,), seeds=2, options={"max_iters": 4, "train_sizes": [64, 96]})
    spec.runtime = {"workers": 0, "device": "cpu", "progress": False, "log_every": 5, "checkpoint_every": 7}
    for arm in spec.arms():
        compare.run_arm(arm, spec, tmp_path)
    by_seed = {}
    for (kind, weights, o), arm in zip(seen, spec.arms()):
        assert kind == "finetune" and weights == arm.weights
        assert (o.fraction, o.seed, o.resume, o.max_iters, o.train_sizes) == (0.1, arm.seed, "auto", 4, (64, 96))
        assert (o.workers, o.device, o.progress, o.log_every, o.checkpoint_every) == (0, "cpu", False, 5, 7)
        by_seed.setdefault(arm.seed, set()).add((o.fraction, o.seed))
    assert all(len(v) == 1 for v in by_seed.values())  # both inits: the same subset arguments
    seen.clear()
    knn = spec_of(inits, fractions=(0.1,), seeds=2, metric="knn", options={"k": 5})
    for arm in knn.arms():
        compare.run_arm(arm, knn, tmp_path)
    assert [(o.train_fraction, o.seed, o.k, o.allow_leak) for _, _, o in seen] == [
        (0.1, 0, 5, True),
        (0.1, 0, 5, True),
        (0.1, 1, 5, True),
        (0.1, 1, 5, True),
    ]
    assert [w for _, w, _ in seen] == [None, str(data["runs"][0]), None, str(data["runs"][1])]


def test_spec_rejects_duplicate_names_and_fractions(data):
    a, b = (str(r) for r in data["runs"][:2])
    with pytest.raises(UserError, match="same name"):
        spec_of([parse_init(f"x={a}"), parse_init(f"x={b}")])
    with pytest.raises(UserError, match="same folder name"):
        spec_of([parse_init(f"my run={a}"), parse_init(f"my_run={b}")])
    with pytest.raises(UserError, match="listed twice"):
        spec_of([parse_init("none")], fractions=(0.1, 0.1))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 12, 13])
def test_shards_partition_the_arms_exactly(n, data):
    spec = spec_of([parse_init("none"), parse_init(str(data["runs"][0]))], fractions=(0.1, 0.5, 1.0), seeds=2)
    arms = spec.arms()
    shards = [shard_arms(arms, (i, n)) for i in range(n)]
    indices = sorted(arm.index for shard in shards for arm in shard)
    assert indices == list(range(len(arms)))  # every arm once, none twice
    for i, shard in enumerate(shards):
        assert [arm.index for arm in shard] == list(range(i, len(arms), n))


# ---------------------------------------------------------------- running, resume, the spec guard


def test_cli_runs_every_arm_then_reports(data, fake_runner, capsys):
    out = data["root"] / "cmp"
    argv = [
        "compare",
        "--init",
        "none",
        "--init",
        f"soco={data['runs'][0]},{data['runs'][1]}",
        *data["args"],
        "--fractions",
        "0.1,1",
        "--seeds",
        "2",
        "--max-iters",
        "4",
        "--out",
        out,
    ]
    status, stdout, err = call(argv, capsys)
    assert status == 0, err
    assert len(fake_runner) == 8
    assert "arm 1/8: random init f0.1 s0" in stdout
    assert "arm 8/8: soco f1 s1" in stdout
    assert "no data manifest" in stdout  # run folders without one: the leak check could not be done
    for name in ("report.md", "report.json", "report.png", "compare.json"):
        assert (out / name).is_file()
    assert (out / "report.png").read_bytes()[:8] == PNG_SIGNATURE
    report = json.loads((out / "report.json").read_text())
    assert report["arms_done"] == 8 and report["missing"] == []
    row = next(r for r in report["rows"] if r["init"] == "soco" and r["fraction"] == 0.1)
    assert row["vs_baseline"]["bbox AP"]["diffs"] == [2.0, 2.0]  # 12 + s + 1 - (10 + s + 1)
    assert row["vs_baseline"]["bbox AP"]["half_width"] == 0.0
    spec = json.loads((out / "compare.json").read_text())
    assert spec["inits"][1]["paths"] == [str(data["runs"][0]), str(data["runs"][1])]
    assert spec["options"]["max_iters"] == 4 and spec["seeds"] == 2


def test_resume_skips_finished_arms_and_reruns_unfinished_ones(data, fake_runner, capsys):
    out = data["root"] / "cmp"
    argv = [
        "compare",
        "--init",
        "none",
        "--init",
        str(data["runs"][0]),
        *data["args"],
        "--seeds",
        "2",
        "--max-iters",
        "4",
        "--out",
        out,
    ]
    assert call(argv, capsys)[0] == 0
    assert len(fake_runner) == 4
    # one arm stopped early: its metrics.json is not final; another never wrote one
    unfinished = out / "arms" / "ss0" / "f1" / "s1" / "metrics.json"
    unfinished.write_text(json.dumps({"bbox": {"AP": 1.0}, "iterations": 2, "max_iters": 4}))
    (out / "arms" / "random_init" / "f1" / "s0" / "metrics.json").unlink()
    fake_runner.clear()
    status, stdout, err = call(argv, capsys)
    assert status == 0, err
    assert sorted((name, seed) for name, _, seed, _, _ in fake_runner) == [(RANDOM_INIT, 0), ("ss0", 1)]
    assert stdout.count("done, skipped") == 2
    fake_runner.clear()
    status, stdout, _ = call(["compare", "--out", out], capsys)  # the recorded spec, nothing left to run
    assert status == 0 and fake_runner == [] and stdout.count("done, skipped") == 4


def test_a_different_spec_in_the_same_out_is_refused(data, fake_runner, capsys):
    out = data["root"] / "cmp"
    base = ["compare", "--init", "none", *data["args"], "--seeds", "1", "--out", out]
    assert call([*base, "--max-iters", "4"], capsys)[0] == 0
    status, stdout, err = call([*base, "--max-iters", "8"], capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("soco: error: ") and "Traceback" not in err
    assert "options.max_iters 4 -> 8" in err and "another --out" in err
    assert len(fake_runner) == 1  # nothing ran the second time
    # spec options without --init would be silently ignored: refused
    status, _, err = call(["compare", "--out", out, "--max-iters", "8"], capsys)
    assert status == 2 and "--max-iters given without --init" in err


# soco finetune's options that change a fine-tune's result (each with a value other than the
# comparison's), and the settings that only change how an arm runs
RESULT_OPTIONS = {
    "--soco-weights": ["target"], "--schedule": ["2x"], "--max-iters": ["5"], "--batch-size": ["8"], "--lr": ["0.01"],
    "--train-sizes": ["64"], "--max-size": ["200"], "--test-size": ["64"], "--roi-batch": ["32"],
    "--test-proposals": ["10"], "--detections": ["5"], "--boxes-only": [], "--precise-bn": ["3"],
    "--precision": ["bf16"], "--set": ["weight_decay=1e-4"], "--preset": ["cpu"], "--base-lr": ["0.04"],
}  # fmt: skip
RUN_SETTINGS = {
    "--workers": ["1"], "--log-every": ["2"], "--checkpoint-every": ["3"], "--no-progress": [], "--device": ["cpu"],
    "--per-device-batch": ["1"],
}  # fmt: skip


def test_a_changed_recipe_option_is_refused_and_a_changed_run_setting_reaches_the_arm(data, monkeypatch, capsys):
    """The recorded recipe holds every option that changes the result: rerunning the comparison in
    the same OUT with one of them changed is refused before anything runs; a changed run setting
    is not, and the arm that runs again gets it."""
    import soco_pretrain.transfer.finetune as finetune_module

    seen = []

    def fake_finetune(weights, train_json, train_images, val_json, val_images, out_dir, options, **kwargs):
        seen.append(options)
        n = options.max_iters
        (out_dir / "metrics.json").write_text(json.dumps({"bbox": {"AP": 1.0}, "iterations": n, "max_iters": n}))
        return {}

    monkeypatch.setattr(finetune_module, "finetune", fake_finetune)
    out = data["root"] / "cmp"
    base = ["compare", "--init", "none", *data["args"], "--seeds", "1", "--max-iters", "4", "--out", out]
    assert call(base, capsys)[0] == 0 and len(seen) == 1
    recorded = (out / "compare.json").read_text()
    for flag, values in RESULT_OPTIONS.items():
        status, _, err = call([*base, flag, *values], capsys)
        key = values[0].split("=")[0] if flag == "--set" else flag[2:].replace("-", "_")
        if flag == "--preset":
            key = "options."  # a preset changes several options
        if flag == "--base-lr":
            key = "options.lr"  # the peak rate it sets
        assert status == 2 and "another --out" in err and key in err, (flag, err)
        assert len(seen) == 1 and (out / "compare.json").read_text() == recorded, flag  # nothing ran
    arm = out / "arms" / "random_init" / "f1" / "s0" / "metrics.json"
    for flag, values in RUN_SETTINGS.items():
        arm.unlink()  # the arm runs again, with the new setting
        status, _, err = call([*base, flag, *values], capsys)
        assert status == 0, (flag, err)
        field = {"--no-progress": "progress"}.get(flag, flag[2:].replace("-", "_"))
        before = getattr(seen[0], field)
        expected = False if flag == "--no-progress" else (str if before is None else type(before))(values[0])
        assert getattr(seen[-1], field) == expected and getattr(seen[0], field) != expected, flag
    assert len(seen) == 1 + len(RUN_SETTINGS) and (out / "compare.json").read_text() == recorded


def test_arm_shards_through_the_cli_report_only_when_all_done(data, fake_runner, capsys):
    out = data["root"] / "cmp"
    argv = [
        "compare",
        "--init",
        "none",
        "--init",
        str(data["runs"][0]),
        *data["args"],
        "--fractions",
        "0.5,1",
        "--seeds",
        "2",
        "--max-iters",
        "4",
        "--out",
        out,
    ]
    status, stdout, _ = call([*argv, "--arm", "0/3"], capsys)
    assert status == 0
    first = [(n, f, s) for n, f, s, _, _ in fake_runner]
    assert len(first) == 3  # arms 0, 3, 6 of 8
    assert "3 of 8 arms finished" in stdout and not (out / "report.md").exists()
    status, stdout, _ = call(["compare", "--out", out, "--report-only"], capsys)
    assert status == 0 and "missing 5 arm(s)" in stdout
    assert "Not finished (5 arm(s)" in (out / "report.md").read_text()
    for shard in ("1/3", "2/3"):
        assert call([*argv, "--arm", shard], capsys)[0] == 0
    assert len(fake_runner) == 8 and len(set(fake_runner)) == 8  # every arm exactly once
    report = json.loads((out / "report.json").read_text())  # the last shard wrote the full report
    assert report["arms_done"] == 8 and report["missing"] == []


def test_report_only_needs_a_finished_arm(data, fake_runner, capsys):
    out = data["root"] / "cmp"
    status, _, err = call(["compare", "--out", out, "--report-only"], capsys)
    assert status == 2 and "no such file" in err
    argv = ["compare", "--init", "none", *data["args"], "--seeds", "2", "--out", out]
    assert call([*argv, "--arm", "1/2"], capsys)[0] == 0
    for arm_dir in (out / "arms").rglob("metrics.json"):
        arm_dir.unlink()
    status, _, err = call(["compare", "--out", out, "--report-only"], capsys)
    assert status == 2 and "no finished arm yet (2 to run)" in err


def test_load_result_needs_the_final_metrics(tmp_path):
    spec = spec_of([parse_init("none")], fractions=(1.0,), seeds=1)
    arm = spec.arms()[0]
    folder = arm.folder(tmp_path)
    folder.mkdir(parents=True)
    assert load_result(arm, spec, tmp_path) is None
    # a damaged result file is named, not taken for an arm to run again
    (folder / "metrics.json").write_text("{not json")
    unreadable = r"metrics\.json: unreadable result file \(.*\); delete it to run this arm again$"
    with pytest.raises(PathError, match=unreadable):
        load_result(arm, spec, tmp_path)
    (folder / "metrics.json").write_text("[1, 2]")
    with pytest.raises(PathError, match=r"metrics\.json: unreadable result file \(a JSON list, not an object\)"):
        load_result(arm, spec, tmp_path)
    (folder / "metrics.json").write_text(json.dumps({"bbox": {"AP": 1}, "iterations": 3, "max_iters": 4}))
    assert load_result(arm, spec, tmp_path) is None
    (folder / "metrics.json").write_text(json.dumps({"bbox": {"AP": 1}, "iterations": 4, "max_iters": 4}))
    assert load_result(arm, spec, tmp_path)["bbox"]["AP"] == 1
    knn = spec_of([parse_init("none")], fractions=(1.0,), seeds=1, metric="knn", options={})
    assert load_result(arm, knn, tmp_path) is None
    (folder / "knn.json").write_text(json.dumps({"top1": 50.0}))
    assert load_result(arm, knn, tmp_path)["top1"] == 50.0


def test_prepare_out_writes_once_then_compares(tmp_path):
    spec = spec_of([parse_init("none")])
    path = prepare_out(spec, tmp_path)
    assert json.loads(path.read_text())["baseline"] == RANDOM_INIT
    prepare_out(spec_of([parse_init("none")]), tmp_path)  # the same: fine
    with pytest.raises(UserError, match=r"seeds 3 -> 4"):
        prepare_out(spec_of([parse_init("none")], seeds=4), tmp_path)


def test_a_spec_recorded_with_a_renamed_option_is_read_and_rewritten(tmp_path, capsys):
    spec = spec_of([parse_init("none")], options={"max_iters": 4, "batch_size": 2})
    path = prepare_out(spec, tmp_path)
    old = json.loads(path.read_text())
    old["options"] = {"max_iters": 4, "batch": 2}  # what an older version wrote
    path.write_text(json.dumps(old))
    assert read_spec(tmp_path).options == {"max_iters": 4, "batch_size": 2}
    prepare_out(spec, tmp_path)  # the same comparison: accepted, and the file says batch_size now
    assert json.loads(path.read_text())["options"] == {"max_iters": 4, "batch_size": 2}
    assert "rewritten (batch -> batch_size)" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"options.batch_size 2 -> 4"):
        prepare_out(spec_of([parse_init("none")], options={"max_iters": 4, "batch_size": 4}), tmp_path)


def test_a_diverged_arm_is_reported_and_the_others_still_run(data, tmp_path):
    from soco_pretrain.errors import NonFiniteLossError

    spec = spec_of([parse_init("none"), parse_init(str(data["runs"][0]))], fractions=(1.0,), seeds=1)
    prepare_out(spec, tmp_path)

    def runner(arm, spec, out_dir):
        if arm.index == 0:
            raise NonFiniteLossError("non-finite loss (nan) at iteration 3")
        (out_dir / "metrics.json").write_text(json.dumps(fake_finetune_result(arm)))

    lines = []
    summary = run_compare(spec, tmp_path, runner=runner, log=lines.append)
    assert [arm.index for arm, _ in summary.failed] == [0] and [a.index for a in summary.ran] == [1]
    assert any("failed: non-finite loss" in line for line in lines)
    done, missing = collect(spec, tmp_path)
    assert [a.index for a, _ in done] == [1] and [a.index for a in missing] == [0]


# ---------------------------------------------------------------- statistics


def test_paired_ci_matches_a_hand_computation():
    ci = paired_ci([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, df=2) = 4.302653 (t table) -> half-width 4.302653 / sqrt(3) = 2.484138
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(2.0) and ci["sd"] == pytest.approx(1.0)
    assert ci["half_width"] == pytest.approx(2.484138, abs=1e-6)
    assert (ci["low"], ci["high"]) == (pytest.approx(-0.484138, abs=1e-6), pytest.approx(4.484138, abs=1e-6))
    five = paired_ci([0.5, 1.5, -0.5, 2.5, 1.0])  # mean 1, sd sqrt(1.25); t(0.975, 4) = 2.776445
    assert five["half_width"] == pytest.approx(2.776445 * math.sqrt(1.25) / math.sqrt(5), abs=1e-6)
    one = paired_ci([4.0])
    assert one["mean"] == 4.0 and one["half_width"] is None and one["low"] is None
    assert paired_ci([])["n"] == 0
    assert mean_sd([10.0, None, 12.0, 14.0]) == {"mean": 12.0, "sd": 2.0, "n": 3}


def test_summary_pairs_by_seed_and_formats_the_table(data):
    spec = spec_of([parse_init("none"), parse_init(f"soco={data['runs'][0]}")], fractions=(1.0,), seeds=3)
    values = {
        (RANDOM_INIT, 0): 10.0,
        (RANDOM_INIT, 1): 20.0,
        (RANDOM_INIT, 2): 30.0,
        ("soco", 0): 11.0,
        ("soco", 1): 22.0,
        ("soco", 2): 33.0,
    }  # diffs 1, 2, 3
    done = [
        (arm, {"bbox": {"AP": values[(arm.init.name, arm.seed)], "APs": -1}, "segm": {"AP": 1.0}})
        for arm in spec.arms()
    ]
    report = summarize(spec, done, [])
    base, soco = report["rows"]
    assert base["vs_baseline"] is None and base["metrics"]["bbox AP"] == {"mean": 20.0, "sd": 10.0, "n": 3}
    diff = soco["vs_baseline"]["bbox AP"]
    assert diff["diffs"] == [1.0, 2.0, 3.0] and diff["high"] == pytest.approx(4.484138, abs=1e-6)
    assert soco["metrics"]["bbox APs"] == {"mean": None, "sd": None, "n": 0}  # COCO's -1: no value
    assert report["metrics"] == ["bbox AP", "bbox APs", "segm AP"]
    md = format_markdown(report)
    assert "| init | fraction | n | bbox AP mean ± sd | diff vs random init [95% CI] |" in md
    assert "| random init | 1 | 3 | 20.00 ± 10.00 | (baseline) |" in md
    assert "| soco | 1 | 3 | 22.00 ± 11.00 | +2.00 [-0.48, +4.48] |" in md
    assert "one pretraining run for every seed" in md


def test_arm_metrics_of_both_metrics():
    assert arm_metrics("finetune", {"bbox": {"AP": 3.0, "APl": -1.0}, "iterations": 2}) == {
        "bbox AP": 3.0,
        "bbox APl": None,
    }
    assert arm_metrics("knn", {"top1": 50.0, "top5": 80.0, "mean_class_top1": 40.0, "erank": 12.5, "dims": 1024}) == {
        "top1": 50.0,
        "top5": 80.0,
        "mean_class_top1": 40.0,
        "erank": 12.5,
    }


@pytest.mark.parametrize("fractions", [(0.01, 0.1, 1.0), (0.5,)])
def test_report_files(tmp_path, data, fractions):
    spec = spec_of(
        [parse_init("none"), parse_init(str(data["runs"][0])), parse_init(str(data["runs"][1]))],
        fractions=fractions,
        seeds=2,
        metric="knn",
        options={},
    )
    done = [
        (
            arm,
            {
                "top1": 40.0 + arm.seed + 5 * (arm.init.name != RANDOM_INIT),
                "top5": 70.0,
                "mean_class_top1": 30.0,
                "erank": 9.0,
            },
        )
        for arm in spec.arms()[:-3] + spec.arms()[-2:]
    ]
    missing = [spec.arms()[-3]]  # the baseline of the last (fraction, seed 1)
    paths = write_report(spec, tmp_path, done, missing)
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 5000
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["main_metric"] == "top1" and len(report["arms"]) == len(done)
    assert report["arms"][0]["metrics"]["top1"] == 40.0
    assert report["missing"][0]["init"] == RANDOM_INIT and report["missing"][0]["seed"] == 1
    md = (tmp_path / "report.md").read_text()
    assert "| ss0 |" in md
    if len(fractions) > 1:  # both seeds paired at the first fraction
        assert f"| ss0 | {fractions[0]:g} | 2 | 45.50 ± 0.71 | +5.00 [+5.00, +5.00] |" in md
    assert f"| ss1 | {fractions[-1]:g} | 2 | 45.50 ± 0.71 | +5.00 [n/a] (1 pair) |" in md  # baseline lost seed 1
    assert "Not finished (1 arm(s), left out above): random init" in md
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files


# ---------------------------------------------------------------- leaks, devices


def test_leak_guard_refuses_and_allow_leak_skips_it(data, fake_runner, monkeypatch, capsys):
    from soco_pretrain.data import manifest

    checked = []
    run0 = str(data["runs"][0])

    def manifest_for_weights(path):
        return (path, {"files": [["x.jpg", "abc"]]}) if path == run0 else None

    def check_no_leak(paths, manifests, **kwargs):
        checked.append(([str(p) for p in paths], sorted(manifests)))
        raise manifest.LeakError(
            "1 validation image was in the pretraining set of ss0 (by content), "
            "e.g. a.jpg = x.jpg; pretrain without them or pass --allow-leak"
        )

    monkeypatch.setattr(manifest, "manifest_for_weights", manifest_for_weights)
    monkeypatch.setattr(manifest, "check_no_leak", check_no_leak)
    argv = [
        "compare",
        "--init",
        "none",
        "--init",
        f"soco={run0},{data['runs'][1]}",
        *data["args"],
        "--seeds",
        "1",
        "--out",
        data["root"] / "cmp",
    ]
    status, stdout, err = call(argv, capsys)
    assert status == 2 and err.count("\n") == 1 and "pretraining set of ss0" in err
    assert checked == [([str(data["images"] / "a.jpg")], [run0])]
    assert f"({data['runs'][1]}) has no data manifest" in stdout
    assert fake_runner == []
    status, _, err = call([*argv, "--allow-leak"], capsys)
    assert status == 0, err
    assert len(checked) == 1 and len(fake_runner) == 2


# ---------------------------------------------------------------- the weights each arm saw


def two_init_argv(data, *extra):
    """none and the run folder ss0, one fraction, two seeds: arms 0..3 = none s0, ss0 s0, none s1, ss0 s1."""
    return [
        "compare",
        "--init",
        "none",
        "--init",
        data["runs"][0],
        *data["args"],
        "--seeds",
        "2",
        "--max-iters",
        "4",
        "--out",
        data["root"] / "cmp",
        *extra,
    ]


def test_the_weights_identity_is_recorded_in_each_arm_and_the_report(data, fake_runner, monkeypatch, capsys):
    hashed = []
    digest = compare.file_digest
    monkeypatch.setattr(compare, "file_digest", lambda path: hashed.append(str(path)) or digest(path))
    last = data["runs"][0] / "checkpoints" / "last.pt"
    status, stdout, err = call(two_init_argv(data), capsys)
    assert status == 0, err
    assert hashed == [str(last)]  # once per invocation, not once per arm
    sha = hashlib.sha256(last.read_bytes()).hexdigest()
    assert f"(weights: {data['runs'][0]}: step 1, sha256 {sha[:12]})" in stdout
    out = data["root"] / "cmp"
    for seed in (0, 1):
        result = json.loads((out / "arms" / "ss0" / "f1" / f"s{seed}" / "metrics.json").read_text())
        assert result["init_weights"] == {"weights": str(data["runs"][0]), "file": str(last), "sha256": sha, "step": 1}
        assert result["bbox"]["AP"] > 0  # the metric's own result is kept
        random = json.loads((out / "arms" / "random_init" / "f1" / f"s{seed}" / "metrics.json").read_text())
        assert random["init_weights"]["random_seed"] == seed and random["init_weights"]["sha256"] is None
    report = json.loads((out / "report.json").read_text())
    assert [a["init_weights"]["sha256"] for a in report["arms"] if a["init"] == "ss0"] == [sha, sha]
    ss0 = next(i for i in report["init_weights"] if i["init"] == "ss0")
    assert ss0["consistent"] and [(w["sha256"], w["step"], w["arms"]) for w in ss0["weights"]] == [(sha, 1, [1, 3])]
    assert report["weights_warnings"] == []
    md = (out / "report.md").read_text()
    assert f"| ss0 | {last} | step 1, sha256 {sha[:12]} | 2 |" in md
    assert "| random init | none | random init, seeded by each arm's seed | 2 |" in md
    hashed.clear()
    assert call(two_init_argv(data), capsys)[0] == 0 and hashed == [str(last)]  # a rerun checks, hashing once


def test_a_checkpoint_that_changed_between_two_invocations_is_refused(data, fake_runner, capsys):
    out = data["root"] / "cmp"
    assert call(two_init_argv(data, "--arm", "1/2"), capsys)[0] == 0  # ss0 s0 and ss0 s1 with step 1
    old = sha12(data["runs"][0] / "checkpoints" / "last.pt")
    new = sha12(save_run(data["runs"][0], 2))  # the run trained on
    spec_before = (out / "compare.json").read_text()
    fake_runner.clear()
    status, stdout, err = call(two_init_argv(data), capsys)
    assert status == 2 and err.startswith("soco: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert f"ss0 (2 arm(s) from step 1, sha256 {old}, now step 2, sha256 {new})" in err
    assert "--reevaluate ss0" in err
    assert fake_runner == [] and "arm 1/4" not in stdout  # nothing ran
    assert (out / "compare.json").read_text() == spec_before
    # without --init (the recorded comparison) and for one shard: the same refusal
    status, _, err = call(["compare", "--out", out, "--arm", "0/2"], capsys)
    assert status == 2 and "--reevaluate ss0" in err and fake_runner == []


def test_reevaluate_runs_those_arms_again_and_the_report_shows_the_new_weights(data, fake_runner, capsys):
    out = data["root"] / "cmp"
    assert call(two_init_argv(data, "--arm", "1/2"), capsys)[0] == 0
    new = save_run(data["runs"][0], 2)
    sha = hashlib.sha256(new.read_bytes()).hexdigest()
    fake_runner.clear()
    status, stdout, err = call(two_init_argv(data, "--reevaluate", "ss0"), capsys)
    assert status == 0, err
    line = next(x for x in stdout.splitlines() if x.startswith("--reevaluate ss0:"))
    assert "moved 2 arm(s) computed from step 1" in line and f"again with step 2, sha256 {sha[:12]}" in line
    assert sorted((n, s) for n, _, s, _, _ in fake_runner) == [
        (RANDOM_INIT, 0),
        (RANDOM_INIT, 1),
        ("ss0", 0),
        ("ss0", 1),
    ]
    assert (out / "arms" / "ss0" / "f1" / "s0.old-1" / "metrics.json").is_file()  # moved aside, not deleted
    report = json.loads((out / "report.json").read_text())
    ss0 = next(i for i in report["init_weights"] if i["init"] == "ss0")
    assert ss0["consistent"] and [(w["sha256"], w["step"]) for w in ss0["weights"]] == [(sha, 2)]
    assert f"step 2, sha256 {sha[:12]} | 2 |" in (out / "report.md").read_text()
    fake_runner.clear()
    status, stdout, _ = call(["compare", "--out", out, "--reevaluate", "all"], capsys)  # nothing left to do
    assert status == 0 and fake_runner == [] and "every arm of ss0 already used its current weights" in stdout
    status, _, err = call(["compare", "--out", out, "--reevaluate", "nope"], capsys)
    assert status == 2 and "--reevaluate nope: no init of this comparison has that name" in err


def test_weights_that_change_while_the_comparison_runs_stop_it_before_the_next_arm(data, tmp_path):
    spec = spec_of([parse_init("none"), parse_init(str(data["runs"][0]))], fractions=(1.0,), seeds=2)
    prepare_out(spec, tmp_path)

    def runner(arm, spec, out_dir):
        (out_dir / "metrics.json").write_text(json.dumps(fake_finetune_result(arm)))
        if arm.index == 1:
            save_run(data["runs"][0], 2)  # the run saves a checkpoint meanwhile

    with pytest.raises(UserError, match=r"ss0: its weights changed while this comparison ran \(step 1, .* -> step 2"):
        run_compare(spec, tmp_path, runner=runner, log=lambda line: None)
    done, missing = collect(spec, tmp_path)
    assert [a.index for a, _ in done] == [0, 1, 2] and [a.index for a in missing] == [3]
    assert done[1][1]["init_weights"]["step"] == 1  # what that arm started from


def test_the_report_says_when_an_init_pooled_different_weights(data, tmp_path):
    spec = spec_of([parse_init("none"), parse_init(str(data["runs"][0]))], fractions=(1.0,), seeds=2, metric="knn")
    ids = {
        1: {"file": "/r/last.pt", "sha256": "a" * 64, "step": 100},
        3: {"file": "/r/last.pt", "sha256": "b" * 64, "step": 200},
    }
    done = [(arm, {"top1": 50.0, "init_weights": ids.get(arm.index)}) for arm in spec.arms()]
    paths, warnings = compare.write_compare_report(spec, tmp_path, done, [])
    assert len(warnings) == 1 and "ss0 were computed from different weights" in warnings[0]
    assert "step 100, sha256 aaaaaaaaaaaa: 1 arm(s); step 200, sha256 bbbbbbbbbbbb: 1 arm(s)" in warnings[0]
    report = json.loads(paths[0].read_text())
    assert report["weights_warnings"] == warnings
    assert not next(i for i in report["init_weights"] if i["init"] == "ss0")["consistent"]
    md = paths[1].read_text()
    assert md.startswith("# soco compare: knn\n\n**Warning: the arms of ss0 were computed from different weights")
    assert "| ss0 | /r/last.pt | **step 200, sha256 bbbbbbbbbbbb** (differs from its other arms) | 1 |" in md


def test_weights_records_missing_a_field_say_so():
    """A record written by hand or an older version: never "sha256 None" or "seed None"."""
    recorded = {"file": "/r/last.pt", "sha256": "c" * 64, "step": 3}
    assert compare.describe_weights(recorded) == "step 3, sha256 cccccccccccc"
    assert compare.describe_weights({"file": "/r/last.pt", "sha256": None}) == "sha256 not recorded"
    assert compare.describe_weights({"file": "/r/last.pt"}) == "sha256 not recorded"
    assert compare.describe_weights({"file": None, "random_seed": 2}) == "random init seed 2"
    assert compare.describe_weights({}) == "random init, seed not recorded"
    assert compare.describe_weights(None) == "not recorded"


def test_a_leak_refusal_does_not_block_the_corrected_rerun(data, fake_runner, capsys):
    from soco_pretrain.data.manifest import build_manifest, write_manifest

    root, images = data["root"], data["images"]
    (images / "a.jpg").write_bytes(b"a val photo")
    (images / "b.jpg").write_bytes(b"another val photo")
    (root / "pool").mkdir()
    (root / "pool" / "copy.jpg").write_bytes(b"a val photo")  # a renamed copy in the pretraining data
    write_manifest(data["runs"][0], build_manifest([root / "pool" / "copy.jpg"], root / "pool", progress=False))
    fixed = json.loads((root / "val.json").read_text())
    fixed["images"][0]["file_name"] = "b.jpg"
    (root / "val_fixed.json").write_text(json.dumps(fixed))
    argv = two_init_argv(data)
    status, _, err = call(argv, capsys)
    assert status == 2 and "pretraining set of" in err and err.count("\n") == 1 and fake_runner == []
    assert not (root / "cmp").exists()  # nothing written: the refused comparison is not recorded
    corrected = [str(root / "val_fixed.json") if a == root / "val.json" else a for a in argv]
    status, stdout, err = call(corrected, capsys)
    assert status == 0, err
    assert "leak check: none of the 1 validation images" in stdout and len(fake_runner) == 4


def test_messages_only_name_flags_soco_compare_has():
    """Every --flag that soco compare's code or messages name is one of its own options."""
    from soco_pretrain import cli
    from soco_pretrain.cli import compare as cli_compare

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.choices and "compare" in a.choices).choices["compare"]
    options = {o for action in sub._actions for o in action.option_strings}
    named = set()
    for module in (compare, cli_compare):
        named |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", Path(module.__file__).read_text(encoding="utf-8")))
    assert named and named - options == set()


def test_device_children(tmp_path):
    commands = child_commands(
        tmp_path, ["cuda:0", "cuda:1"], ["--workers", "3"], environ={"CUDA_VISIBLE_DEVICES": "4,6", "PATH": "/bin"}
    )
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env, _ in commands] == ["4", "6"]
    argv, env, log = commands[1]
    assert argv[:4] == [sys.executable, "-m", "soco_pretrain", "compare"]
    assert argv[argv.index("--arm") + 1] == "1/2" and argv[argv.index("--device") + 1] == "cuda"
    assert "--no-report" in argv and argv[-2:] == ["--workers", "3"] and env["PATH"] == "/bin"
    assert log == tmp_path / "logs" / "arm1of2.log"
    assert child_commands(tmp_path, ["cuda:2"], [], environ={})[0][1]["CUDA_VISIBLE_DEVICES"] == "2"
    with pytest.raises(UserError, match="lists 2 GPU"):
        child_commands(tmp_path, ["cuda:2"], [], environ={"CUDA_VISIBLE_DEVICES": "0,1"})

    started = []

    class FakeChild:
        def __init__(self, argv, env, stdout, stderr):
            started.append(argv)
            self.status = 0 if len(started) == 1 else 3

        def wait(self):
            return self.status

        def poll(self):
            return self.status

    lines = []
    statuses = run_devices(tmp_path, ["cpu", "cpu"], [], log=lines.append, popen=FakeChild)
    assert statuses == [0, 3] and [a[a.index("--arm") + 1] for a in started] == ["0/2", "1/2"]
    assert any("exit status 3" in line for line in lines)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--init", "{root}/nope"], "no such run folder"),
        (["--init", "{run0}", "--init", "{run0}"], "two inits have the same name"),
        (["--init", "none", "--fractions", "0,1"], "must be positive"),
        (["--init", "none", "--fractions", "0.1,0.1"], "listed twice"),
        (["--init", "none", "--fractions", "1.5"], "must be in (0, 1]"),
        (["--init", "none", "--fractions", "a,b"], "not a number"),
        (["--init", "none", "--arm", "3/2"], "need 0 <= i < N"),
        (["--init", "none", "--seeds", "0"], "must be at least 1"),
        (["--init", "none", "--k", "5"], "--k: not an option of --metric finetune"),
        (["--init", "none", "--metric", "knn", "--max-iters", "5"], "--max-iters: not an option of --metric knn"),
        (["--init", "none", "--devices", "cuda:0", "--arm", "0/2"], "exclude each other"),
        (["--init", "none", "--devices", "tpu:0"], "bad device"),
        (["--init", "none", "--set", "workers=2"], "workers is not a finetune recipe option"),
        (["--init", "none", "--metric", "knn", "--set", "k=many"], "--set k=many: expected int"),
        (["--init", "none", "--metric", "knn", "--set", "bn=off"], "--set bn=off: expected one of precise, running"),
        (["--init", "none", "--preset", "nope"], "--preset nope: not a finetune preset"),
        (["--set", "k=5"], "--set given without --init"),
    ],
)
def test_bad_input_is_one_line(extra, message, data, fake_runner, capsys):
    extra = [e.format(root=data["root"], run0=data["runs"][0]) for e in extra]
    status, _, err = call(["compare", *extra, *data["args"], "--out", data["root"] / "cmp"], capsys)
    assert status == 2
    assert err.startswith("soco: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert fake_runner == []


def test_init_needs_the_data_options(data, capsys):
    status, _, err = call(["compare", "--init", "none", "--out", data["root"] / "cmp"], capsys)
    assert status == 2 and "required with --init: --train-json, --train-images" in err


def test_every_help_example_is_a_command_line_soco_compare_accepts(capsys):
    """Each example of ``soco compare --help`` parses with soco's parser: its flags exist and its
    values (--fractions, --arm, --devices, --init, ...) pass their checks."""
    import shlex

    from soco_pretrain import cli

    status, out, _ = call(["compare", "--help"], capsys)
    assert status == 0
    examples = [line.strip() for line in out.split("examples:")[1].splitlines() if line.strip()]
    assert len(examples) >= 4
    parser = cli.build_parser()
    for example in examples:
        argv = shlex.split(example.split("#")[0])
        assert argv[:2] == ["soco", "compare"], example
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"soco compare --help example does not parse: {example}")
        assert args.func is cli.cmd_compare, example


def _metric_calls(monkeypatch, capsys, argv: list, metric: str) -> list:
    """Run ``soco ARGV`` with the metric's function (transfer.finetune.finetune or
    evaluate.knn.knn_eval) replaced; the options object of each call."""
    import soco_pretrain.evaluate.knn as knn_module
    import soco_pretrain.transfer.finetune as finetune_module

    seen = []

    def fake(*args, **kwargs):
        seen.append(args[-1])  # both commands pass the options last
        return {}

    module, name = (finetune_module, "finetune") if metric == "finetune" else (knn_module, "knn_eval")
    monkeypatch.setattr(module, name, fake)
    status, _, err = call(argv, capsys)
    assert status == 0, err
    return seen


# (metric, flags given to both soco compare and the metric's own command): the defaults, and a
# recipe with options from each source (--preset, the flags, --set) plus the run settings.
SAME_AS_THE_COMMAND = [
    ("finetune", []),
    (
        "finetune",
        ["--preset", "cpu", "--max-iters", "7", "--lr", "0.05", "--batch-size", "4", "--train-sizes", "64,96",
         "--max-size", "160", "--test-size", "96", "--roi-batch", "64", "--test-proposals", "50",
         "--detections", "20", "--precise-bn", "0", "--precision", "bf16", "--soco-weights", "target",
         "--boxes-only", "--workers", "1", "--log-every", "3", "--checkpoint-every", "9", "--no-progress",
         "--device", "cpu", "--set", "momentum=0.8", "--set", "warmup_iters=2"],
    ),
    ("finetune", ["--batch-size", "4", "--per-device-batch", "2"]),
    ("finetune", ["--base-lr", "0.04", "--batch-size", "8"]),
    ("knn", []),
    (
        "knn",
        ["--k", "7", "--temperature", "0.2", "--size", "96", "--objects", "crop", "--context", "1.5",
         "--bn", "running", "--batch-size", "3", "--soco-weights", "target", "--workers", "1", "--no-progress",
         "--device", "cpu", "--set", "centre=false"],
    ),
]  # fmt: skip


@pytest.mark.parametrize("metric, flags", SAME_AS_THE_COMMAND)
def test_each_arm_runs_with_the_options_its_metrics_own_command_would(metric, flags, data, monkeypatch, capsys):
    """An arm of ``soco compare --fractions 0.5 --seeds 2 FLAGS`` hands the metric exactly the
    options ``soco finetune`` / ``soco knn FLAGS --fraction 0.5 --seed S`` would: every recipe
    option and run setting reaches the arm, the arm's fraction and seed too, nothing else differs."""
    out = data["root"] / "cmp"
    compared = _metric_calls(
        monkeypatch,
        capsys,
        ["compare", "--metric", metric, "--init", "none", *data["args"], "--fractions", "0.5", "--seeds", "2",
         "--out", out, *flags],
        metric,
    )  # fmt: skip
    assert len(compared) == 2
    for seed, arm in enumerate(compared):
        # soco compare checked the leaks once for every arm: the arm runs as with --allow-leak
        own = ["--allow-leak"] if metric == "knn" else []
        argv = [metric, "--weights", "none", *data["args"], "--out", data["root"] / f"own{seed}", *own,
                "--fraction", "0.5", "--seed", seed, *flags]  # fmt: skip
        (direct,) = _metric_calls(monkeypatch, capsys, argv, metric)
        if metric == "knn" and direct.size is None:
            # soco compare fixes one input size for every arm (the first run's, else 224);
            # soco knn resolves None the same way for its one weights: the same geometry
            from soco_pretrain.evaluate.knn import resolve_geometry

            assert arm.size == 224 and resolve_geometry(arm.size, arm.level_bounds, None) == resolve_geometry(
                None, direct.level_bounds, None
            )
            direct = dataclasses.replace(direct, size=arm.size)
        differing = [f.name for f in dataclasses.fields(arm) if getattr(arm, f.name) != getattr(direct, f.name)]
        assert arm == direct, {name: (getattr(arm, name), getattr(direct, name)) for name in differing}


def test_preset_config_and_set_feed_the_recorded_recipe(data, tmp_path):
    """--preset < --config FILE < the flags < --set, as in soco finetune / soco knn."""
    from soco_pretrain import cli
    from soco_pretrain.config import FINETUNE_PRESETS

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("weight_decay: 1e-4\nmomentum: 0.8\n")
    base = ["compare", "--init", "none", *map(str, data["args"]), "--out", str(tmp_path / "cmp")]
    args = cli.build_parser().parse_args([*base, "--preset", "cpu", "--config", str(recipe), "--set", "momentum=0.6"])
    options = cli._compare_spec(args, {}).options
    assert options["weight_decay"] == 1e-4 and options["momentum"] == 0.6  # file, then --set over it
    for key, value in FINETUNE_PRESETS["cpu"].items():
        if key in options and key not in ("weight_decay", "momentum"):
            assert options[key] == (list(value) if isinstance(value, tuple) else value), key
    args = cli.build_parser().parse_args([*base, "--metric", "knn", "--k", "7", "--set", "temperature=0.2"])
    options = cli._compare_spec(args, {}).options
    assert options["k"] == 7 and options["temperature"] == 0.2


def test_the_recorded_recipe_and_the_run_settings_are_the_options_kinds():
    """What a comparison records (the recipe) and what it only passes to every arm (run settings),
    as generated from the options' field metadata, written out here."""
    from soco_pretrain.cli import build_parser
    from soco_pretrain.cli.compare import FINETUNE_RECIPE_DEFAULTS, KNN_DEFAULTS, _runtime

    assert set(FINETUNE_RECIPE_DEFAULTS) == {
        "soco_weights", "schedule", "max_iters", "batch_size", "lr", "train_sizes", "max_size", "test_size",
        "roi_batch", "test_proposals", "detections", "boxes_only", "precise_bn", "precision",
    }  # fmt: skip
    assert set(KNN_DEFAULTS) == {
        "k", "temperature", "size", "min_box", "objects", "features", "context", "min_instances", "bn", "batch",
        "soco_weights",
    }  # fmt: skip
    runtime = _runtime(build_parser().parse_args(["compare", "--out", "x", "--no-progress", "--per-device-batch", "2"]))
    assert set(runtime) == {"workers", "per_device_batch", "device", "log_every", "checkpoint_every", "progress"}
    assert (runtime["progress"], runtime["per_device_batch"], runtime["log_every"]) == (False, 2, 20)
