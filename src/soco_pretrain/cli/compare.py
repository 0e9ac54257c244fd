"""``soco compare``: several initialisations under one budget, over label fractions and seeds.

The fine-tune and kNN options are soco finetune's and soco knn's flags (generated from
FinetuneOptions / KnnOptions) plus ``--preset``/``--config``/``--set`` of the chosen metric;
they resolve as in those commands (defaults < preset < file < flags < --set), and the resolved
recipe is what the comparison records.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..config import FINETUNE_PRESETS, KNN_PRESETS, FinetuneOptions, KnnOptions, option_names
from .common import (
    PROG,
    UserError,
    add_coco_data,
    add_command,
    add_config_sources,
    add_option_flags,
    add_out,
    add_renamed,
    check_coco_data,
    fraction,
    lr_alias,
    option_flags,
    parse_shard,
    positive_int,
    resolve_options,
)
from .finetune import FINETUNE_RENAMED, finetune_cli_defaults


def parse_fractions(text: str) -> tuple[float, ...]:
    """``"0.05,0.1,1"`` -> (0.05, 0.1, 1.0): label fractions in (0, 1], none twice."""
    parts = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in parts):
        raise argparse.ArgumentTypeError(f"bad fractions {text!r}: expected F,F,... e.g. 0.05,0.1,1")
    try:
        values = tuple(fraction(t) for t in parts)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"bad fractions {text!r}: {exc}") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"bad fractions {text!r}: a fraction is listed twice")
    return values


# The split comes from the options' field metadata (config.py). A metric's recipe options are
# what a comparison's specification records, but for those every arm sets itself (its label
# fraction and seed) and the fine-tune's backbone (each init's own; --set backbone=... records one).
_ARM_SET = ("fraction", "seed", "train_fraction")
FINETUNE_RECIPE_FLAGS = option_flags(FinetuneOptions, "recipe", exclude=(*_ARM_SET, "backbone"))
# How every arm runs (never recorded); resuming and evaluating are the arm's own.
FINETUNE_RUN_FLAGS = option_flags(FinetuneOptions, "run", exclude=("resume", "eval_only", "eval_every"))
_FINETUNE_FLAGS = {flag.flag: flag for flag in FINETUNE_RECIPE_FLAGS + FINETUNE_RUN_FLAGS}
KNN_RECIPE_FLAGS = option_flags(KnnOptions, "recipe", exclude=_ARM_SET)
# kNN recipe flags spelt as a fine-tune flag (--batch-size, --soco-weights) are that one flag here.
KNN_PROTOCOL_FLAGS = [flag for flag in KNN_RECIPE_FLAGS if flag.flag not in _FINETUNE_FLAGS]
KNN_SHARED_FLAGS = [flag for flag in KNN_RECIPE_FLAGS if flag.flag in _FINETUNE_FLAGS]
_FINETUNE_LR = lr_alias(FinetuneOptions, FINETUNE_RECIPE_FLAGS)
# The options each specification records: field -> its default.
FINETUNE_RECIPE_DEFAULTS = {flag.field: getattr(FinetuneOptions(), flag.field) for flag in FINETUNE_RECIPE_FLAGS}
KNN_DEFAULTS = {flag.field: getattr(KnnOptions(), flag.field) for flag in KNN_RECIPE_FLAGS}
# options that only one metric uses (flag -> metric)
_SHARED = {flag.flag for flag in KNN_SHARED_FLAGS}
_METRIC_ONLY = {
    **{flag.flag: "finetune" for flag in FINETUNE_RECIPE_FLAGS if flag.flag not in _SHARED},
    **({_FINETUNE_LR.flag: "finetune"} if _FINETUNE_LR else {}),
    **{flag.flag: "knn" for flag in KNN_PROTOCOL_FLAGS},
}


def _runtime(args) -> dict:
    """Settings that do not change the results (never recorded): soco finetune's defaults."""
    defaults = {name: getattr(FinetuneOptions(), name) for name in option_names(FinetuneOptions, "run")}
    defaults.update(finetune_cli_defaults())
    runtime = {}
    for flag in FINETUNE_RUN_FLAGS:
        value = getattr(args, flag.dest, None)
        if value is None:
            value = defaults[flag.field]
        elif flag.invert:  # --no-progress given: progress False
            value = not value
        runtime[flag.field] = value
    return runtime


def _runtime_args(runtime: dict) -> list[str]:
    """The run flags of ``runtime`` for a --devices child (each child gets its own --device)."""
    out = []
    for flag in FINETUNE_RUN_FLAGS:
        value = runtime.get(flag.field)
        if flag.field == "device" or value is None:
            continue
        if flag.invert:
            out += [flag.flag] if not value else []
        else:
            out += [flag.flag, str(value)]
    return out


def add_compare(subparsers):
    p = add_command(
        subparsers,
        "compare",
        help="compare several initialisations under one budget over label fractions and seeds, with a report",
        description=(
            "Run every (init, label fraction, seed) arm of a comparison with one metric and the\n"
            "same options (finetune: soco finetune's COCO AP; knn: object-level kNN on frozen\n"
            "features), then write OUT/report.md, report.json and report.png: mean ± sd over seeds\n"
            "and the paired difference of each init against the FIRST init with a 95% Student-t\n"
            "interval. For one (fraction, seed) every init gets the same labelled subset.\n"
            "INIT: none (random init, seeded by the arm's seed), PATH (run folder, checkpoint or\n"
            "exported file; named by its basename) or NAME=PATH[,PATH,...] (a group, e.g. one recipe\n"
            "pretrained with several seeds: seed s uses member s % len). Arms live in\n"
            "OUT/arms/INIT/fF/sS; rerunning skips finished arms and resumes the others. OUT/compare.json\n"
            "records the comparison: a rerun with other options is refused; without --init it is\n"
            "reused. Before running, validation images found in an init's pretraining manifest are\n"
            "refused (--allow-leak to run anyway). Every arm records the weights it was computed from\n"
            "(sha256 of the checkpoint file, soco step); a rerun after an init's weights changed is\n"
            "refused until --reevaluate NAME evaluates that init's arms again."
        ),
        examples=[
            "soco compare --metric knn --init none --init soco=runs/ss0,runs/ss1,runs/ss2 --train-json train.json "
            "--train-images imgs --val-json val.json --val-images imgs --seeds 3 --out cmp/",
            "soco compare --init none --init runs/fpn100 --fractions 0.05,0.1,1 --seeds 3 --train-json t.json "
            "--train-images imgs --val-json v.json --val-images imgs --max-iters 2000 --batch-size 8 --out cmp/ "
            "--devices cuda:0,cuda:1",
            "soco compare --out cmp/ --arm 2/8   # cluster job 2 of 8 (arms 2, 10, 18, ...) of the comparison in cmp/",
            "soco compare --out cmp/ --report-only   # the report from the arms finished so far",
            "soco compare --out cmp/ --reevaluate soco   # soco's run went on training: its arms again, new weights",
        ],
    )
    p.add_argument(
        "--init",
        action="append",
        default=[],
        metavar="INIT",
        help="none, PATH or NAME=PATH[,PATH,...] (repeat; the first is the baseline)",
    )
    add_coco_data(p, required=False)
    add_out(p, "DIR", "comparison folder (arms, compare.json, report)")
    p.add_argument(
        "--metric",
        choices=("finetune", "knn"),
        default=None,
        help="finetune (default: Mask R-CNN COCO AP) or knn (object-level kNN accuracy)",
    )
    p.add_argument(
        "--fractions",
        type=parse_fractions,
        default=None,
        metavar="F,F,...",
        help="label fractions of the training images, e.g. 0.05,0.1,1 (default 1)",
    )
    p.add_argument("--seeds", type=positive_int, default=None, metavar="S", help="seeds 0..S-1 per arm (default 3)")
    p.add_argument(
        "--arm",
        type=parse_shard,
        default=None,
        metavar="i/N",
        help="run only arms i, i+N, i+2N, ... (cluster array jobs); the report once all are done",
    )
    p.add_argument(
        "--devices",
        default=None,
        metavar="DEV,DEV,...",
        help="one process per device (e.g. cuda:0,cuda:1; logs in OUT/logs), then the report",
    )
    p.add_argument("--report-only", action="store_true", help="only (re)build the report from the finished arms")
    p.add_argument(
        "--allow-leak", action="store_true", help="run even if validation images are in an init's pretraining set"
    )
    p.add_argument(
        "--reevaluate",
        action="append",
        default=[],
        metavar="NAME",
        help="move aside the arms of init NAME computed from other weights than it has now (e.g. its run "
        "trained on) and evaluate them again (repeat, or all; with --arm: that shard's arms)",
    )
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # --devices children
    also = [flag.flag for flag in KNN_SHARED_FLAGS] + [
        flag.flag for flag in FINETUNE_RUN_FLAGS if flag.field in option_names(KnnOptions, "run")
    ]
    g = p.add_argument_group(f"fine-tune options (as soco finetune; {', '.join(also)} also apply to --metric knn)")
    add_option_flags(
        g, FinetuneOptions, FINETUNE_RECIPE_FLAGS + FINETUNE_RUN_FLAGS, cli_defaults=finetune_cli_defaults()
    )
    add_option_flags(p.add_argument_group("kNN options (--metric knn)"), KnnOptions, KNN_PROTOCOL_FLAGS)
    add_config_sources(
        p.add_argument_group("the metric's recipe as in soco finetune / soco knn"),
        f"named options of the metric: finetune {', '.join(FINETUNE_PRESETS)}; knn {', '.join(KNN_PRESETS)}",
        "YAML file of the metric's options (keys as --set), read over the preset",
        "any recipe option of the metric, e.g. weight_decay=1e-4 (finetune) or k=50 (knn); repeatable",
    )
    add_renamed(p, FINETUNE_RENAMED)
    p.set_defaults(func=cmd_compare)


def _given_spec_flags(args) -> list[str]:
    """The comparison options given on the command line (they default to None in soco compare)."""
    names = ["train_json", "train_images", "val_json", "val_images", "metric", "fractions", "seeds"]
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) not in (None, False)]
    lr = [(_FINETUNE_LR.flag, _FINETUNE_LR.dest)] if _FINETUNE_LR else []
    flags = dict.fromkeys((f.flag, f.dest) for f in FINETUNE_RECIPE_FLAGS + KNN_PROTOCOL_FLAGS)
    given += [flag for flag, dest in [*flags, *lr] if getattr(args, dest, None) not in (None, False)]
    return given + [flag for flag, dest in _SOURCES if getattr(args, dest, None)]


_SOURCES = (("--preset", "preset"), ("--config", "config"), ("--set", "overrides"))


def _recipe(args, metric: str) -> dict:
    """The metric's resolved recipe, as soco finetune / soco knn resolve it. It records the flag
    options plus what --preset, --config and --set name (so a comparison made without them keeps
    the specification it always had)."""
    from ..config import load_file

    cls: type
    presets: dict  # FINETUNE_PRESETS or KNN_PRESETS
    if metric == "finetune":
        cls, flags, presets, names = FinetuneOptions, FINETUNE_RECIPE_FLAGS, FINETUNE_PRESETS, FINETUNE_RECIPE_DEFAULTS
        cli_defaults = None
    else:  # a shared flag (--batch-size, --soco-weights) defaults to fine-tuning's default
        cls, flags, presets, names = KnnOptions, KNN_RECIPE_FLAGS, KNN_PRESETS, KNN_DEFAULTS
        cli_defaults = {
            flag.field: getattr(FinetuneOptions(), _FINETUNE_FLAGS[flag.flag].field) for flag in KNN_SHARED_FLAGS
        }
    allowed = set(option_names(cls, "recipe")) - set(_ARM_SET)
    if args.preset is not None and args.preset not in presets:
        raise UserError(f"--preset {args.preset}: not a {metric} preset (choose from {', '.join(presets)})")
    named = list(presets.get(args.preset, {})) + list(load_file(args.config) if args.config else [])
    named += [item.split("=", 1)[0].strip() for item in args.overrides or []]
    for key in named:
        if key not in allowed:
            raise UserError(
                f"{key} is not a {metric} recipe option of soco compare (a run setting, set by the arm, or "
                f"unknown; recipe options: {', '.join(sorted(allowed))})"
            )
    resolved, _ = resolve_options(cls, args, flags, presets, cli_defaults=cli_defaults)
    return {name: getattr(resolved, name) for name in [*names, *named]}


def _compare_spec(args, runtime: dict):
    """The CompareSpec of the command line (--init given) or of OUT/compare.json (no --init)."""
    from ..evaluate.compare import CompareSpec, parse_init, read_spec

    given = _given_spec_flags(args)
    if not args.init:
        if given:
            raise UserError(
                f"{', '.join(given)} given without --init: give every --init too, or none of the "
                f"comparison options to reuse {Path(args.out) / 'compare.json'}"
            )
        return read_spec(args.out, runtime)
    missing = [
        f
        for f, v in (
            ("--train-json", args.train_json),
            ("--train-images", args.train_images),
            ("--val-json", args.val_json),
            ("--val-images", args.val_images),
        )
        if v is None
    ]
    if missing:
        raise UserError(f"the following arguments are required with --init: {', '.join(missing)}")
    check_coco_data(args)
    metric = args.metric or "finetune"
    wrong = [flag for flag in given if _METRIC_ONLY.get(flag, metric) != metric]
    if wrong:
        raise UserError(f"{', '.join(wrong)}: not an option of --metric {metric}")
    inits = [parse_init(text, must_exist=not args.report_only) for text in args.init]

    options = _recipe(args, metric)
    if metric == "finetune":
        options["train_sizes"] = list(options["train_sizes"])
    elif options["size"] is None:  # one input size for every arm: the first run's V1 size, else 224
        from ..evaluate.knn import common_size

        options["size"] = common_size([p for init in inits for p in init.paths if p])
    absolute = os.path.abspath
    return CompareSpec(
        tuple(inits),
        args.fractions or (1.0,),
        args.seeds or 3,
        metric,
        absolute(args.train_json),
        absolute(args.train_images),
        absolute(args.val_json),
        absolute(args.val_images),
        options,
        runtime,
    )


def _reevaluate_names(values: list[str], spec) -> list[str]:
    """The init names ``--reevaluate`` gives (``all``: every init with a weights file), each checked
    against ``spec``."""
    from ..evaluate.compare import safe_name

    if any(v.strip().lower() == "all" for v in values):
        return [init.name for init in spec.inits if any(p is not None for p in init.paths)]
    names = []
    for value in values:
        found = [i.name for i in spec.inits if value in (i.name, safe_name(i.name))]
        if not found:
            known = ", ".join(repr(i.name) for i in spec.inits)
            raise UserError(f"--reevaluate {value}: no init of this comparison has that name ({known}, or all)")
        names += [n for n in found if n not in names]
    return names


def _write_compare_report(spec, out) -> int:
    """Write the report from the finished arms; returns how many are missing."""
    from ..evaluate.compare import collect, write_compare_report

    done, missing = collect(spec, out)
    if not done:
        raise UserError(f"{out}: no finished arm yet ({len(missing)} to run)")
    paths, warnings = write_compare_report(spec, out, done, missing)
    print(f"report of {len(done)}/{len(done) + len(missing)} arms: {', '.join(str(p) for p in paths)}")
    for warning in warnings:
        print(f"warning: {warning}")
    if missing:
        names = ", ".join(arm.label for arm in missing[:8]) + (" ..." if len(missing) > 8 else "")
        print(f"missing {len(missing)} arm(s): {names}")
    return len(missing)


def cmd_compare(args) -> int:
    if args.devices and args.arm:
        raise UserError("--devices and --arm exclude each other (--devices gives each device its own --arm)")
    if args.report_only and (args.devices or args.arm or args.reevaluate):
        raise UserError("--report-only runs nothing: leave out --devices, --arm and --reevaluate")
    out = Path(args.out)
    runtime = _runtime(args)
    from ..evaluate.compare import (
        InitWeights,
        check_leaks,
        check_out,
        collect,
        parse_devices,
        prepare_out,
        reevaluate,
        refuse_stale,
        run_compare,
        run_devices,
        stale_arms,
    )

    spec = _compare_spec(args, runtime)
    if args.report_only:
        if not (out / "compare.json").is_file():
            raise UserError(f"{out}: no compare.json (nothing run there yet)")
        prepare_out(spec, out)  # the same comparison as the one recorded
        _write_compare_report(spec, out)
        return 0
    again = _reevaluate_names(args.reevaluate, spec)
    devices = parse_devices(args.devices) if args.devices else None
    # Every check before OUT is written to: a refused comparison leaves OUT as it was.
    check_out(spec, out)
    if not args.allow_leak:
        check_leaks(spec, progress=runtime["progress"])
    weights = InitWeights()
    weights.pin(spec)  # each init's file resolved and hashed once
    stale = stale_arms(spec, out, weights)
    refuse_stale([s for s in stale if s.arm.init.name not in again])
    unrecorded = [s.arm for s in stale if s.recorded is None and s.arm.init.name not in again]
    prepare_out(spec, out)
    reevaluate(spec, out, again, stale, shard=args.arm, log=lambda line: print(line, flush=True))
    if unrecorded:
        names = ", ".join(dict.fromkeys(arm.init.name for arm in unrecorded))
        print(
            f"note: {len(unrecorded)} finished arm(s) of {names} have no record of their weights (finished "
            "before soco compare recorded them); the report says so, --reevaluate NAME evaluates them again",
            flush=True,
        )
    arms = spec.arms()
    print(
        f"comparing {len(spec.inits)} init(s) ({', '.join(i.name for i in spec.inits)}; baseline "
        f"{spec.baseline.name}) x {len(spec.fractions)} fraction(s) x {spec.seeds} seed(s) = {len(arms)} arms, "
        f"metric {spec.metric}, in {out}",
        flush=True,
    )
    if devices:
        statuses = run_devices(out, devices, _runtime_args(runtime))
        unfinished = _write_compare_report(spec, out) if collect(spec, out)[0] else len(arms)
        return 1 if any(statuses) or unfinished else 0
    summary = run_compare(spec, out, shard=args.arm, log=lambda line: print(line, flush=True), weights=weights)
    done, missing = collect(spec, out)
    if args.no_report:
        pass
    elif missing and args.arm is not None:
        print(
            f"{len(done)} of {len(arms)} arms finished; the report is written when all are "
            f"(or now: soco compare --out {args.out} --report-only)"
        )
    elif done:
        _write_compare_report(spec, out)
    for arm, message in summary.failed:
        print(f"{PROG}: error: arm {arm.index + 1} ({arm.label}) failed: {message}", file=sys.stderr)
    return 1 if summary.failed else 0


# ---------------------------------------------------------------- soco demo
