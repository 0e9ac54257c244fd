"""The ``soco`` command line.

Plain argparse: one ``add_<command>`` function builds each subcommand's parser and one
``cmd_<command>`` function runs it. Heavy modules (numpy, numba, torch, matplotlib) are
imported inside the command functions so ``soco --help`` stays fast.

Adding a command: write ``add_x(subparsers)`` + ``cmd_x(args) -> int`` and list ``add_x``
in ``COMMANDS`` (or, for ``soco show x``, in ``SHOW_COMMANDS``).

Errors the user can fix (missing folder, bad shard, unknown preset, missing store) are
printed as one line ``soco: error: ...`` with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PROG = "soco"


class UsageError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line ``soco: error: ...`` (exit 2)."""

    def error(self, message):  # noqa: D401 - argparse API
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps description line breaks; lines subcommand help up past the longest name."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)

    def add_argument(self, action):
        super().add_argument(action)
        # argparse forgets the extra indent of subcommand names when measuring them,
        # which pushes a long name's help onto the next line.
        listed = [sub.dest for sub in self._iter_indented_subactions(action)]
        if action.nargs == argparse.PARSER and listed:
            longest = max(map(len, listed)) + self._current_indent + 4
            self._action_max_length = max(self._action_max_length, longest)


def _add(subparsers, name, *, help, description, examples, prog=None):
    """Add a subcommand parser whose --help ends with an "examples:" block."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    kwargs = {"help": help} if help else {}
    return subparsers.add_parser(
        name,
        description=description,
        epilog=epilog,
        formatter_class=_Formatter,
        prog=prog,
        **kwargs,
    )


# ---------------------------------------------------------------- argument types


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/N"`` into ``(i, N)`` with ``0 <= i < N``."""
    parts = text.split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        i, n = int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad shard {text!r}: expected i/N, e.g. 0/4 for the first of 4 shards"
        ) from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(
            f"bad shard {text!r}: need 0 <= i < N (shards are numbered 0 to N-1)"
        )
    return i, n


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _default_workers() -> int:
    # The cores this process may use (a container or taskset can allow fewer than cpu_count).
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _require_source(path: str, what: str = "images") -> Path:
    """A folder or list file that must exist (checked before any heavy import)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such {what} folder or list file")
    return p


def _require_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{path}: no such {what} (expected a directory)")
    return p


# ---------------------------------------------------------------- soco proposals


def add_proposals(subparsers):
    p = _add(
        subparsers,
        "proposals",
        help="compute selective-search object proposals for a folder of images",
        description=(
            "Compute selective-search proposals for every image in IMAGES (a folder, searched\n"
            "recursively, or a text file with one image path per line) and write them to the\n"
            "proposal store STORE. An interrupted run resumes when rerun with the same command.\n"
            "Exit status: 0 all images done, 1 some images failed (listed), 2 bad input.\n\n"
            "See also: soco proposals merge SHARD... -o STORE  (join shard stores)"
        ),
        examples=[
            "soco proposals photos/ -o proposals/",
            "soco proposals imagenet/train -o props/ --workers 16 --preset released",
            "soco proposals photos/ -o shard0/ --shard 0/4   # then shard 1/4, 2/4, 3/4 and merge",
        ],
    )
    p.add_argument("images", metavar="IMAGES", help="image folder or text file listing images")
    p.add_argument("-o", "--out", metavar="STORE", required=True, help="output store directory")
    p.add_argument(
        "--preset",
        default="paper",
        metavar="NAME",
        help="search/filter preset: paper (default) or released",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"parallel processes (default: number of CPU cores, {_default_workers()} here)",
    )
    p.add_argument(
        "--shard",
        type=parse_shard,
        default=None,
        metavar="i/N",
        help="only every N-th image starting at i (0-based), for splitting across machines",
    )
    p.add_argument(
        "--max-side",
        type=_non_negative_int,
        default=None,
        metavar="PX",
        help="search larger images on a copy resized to this long side (0 = never; preset default 1000)",
    )
    p.add_argument("--scale", type=_positive_float, default=None, metavar="S", help="override the preset's scale")
    p.add_argument("--sigma", type=_positive_float, default=None, metavar="S", help="override the preset's sigma")
    p.add_argument("--min-size", type=_positive_int, default=None, metavar="N", help="override the preset's min_size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_proposals)


def _check_preset(name: str) -> None:
    from .proposals import PRESETS

    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r} (choose from {', '.join(sorted(PRESETS))})")


def cmd_proposals(args) -> int:
    source = _require_source(args.images)
    _check_preset(args.preset)
    from .proposals import generate

    overrides = {
        key: value
        for key, value in (
            ("scale", args.scale),
            ("sigma", args.sigma),
            ("min_size", args.min_size),
            ("max_side", args.max_side),
        )
        if value is not None
    }
    summary = generate(
        source,
        Path(args.out),
        preset=args.preset,
        config_overrides=overrides or None,
        workers=args.workers or _default_workers(),
        shard=args.shard,
        progress=not args.no_progress,
    )
    print(summary.format())
    return 0 if summary.ok else 1


def add_proposals_merge(subparsers):
    # Reached as "soco proposals merge ..." (main() rewrites the first two words).
    p = _add(
        subparsers,
        "proposals-merge",
        help=None,
        prog=f"{PROG} proposals merge",
        description=(
            "Join proposal stores made with --shard into one store, ordered by image path.\n"
            "The shards must use the same parameters and must not share images."
        ),
        examples=[
            "soco proposals merge shard0/ shard1/ shard2/ shard3/ -o proposals/",
        ],
    )
    p.add_argument("shards", metavar="SHARD", nargs="+", help="shard store directories")
    p.add_argument("-o", "--out", metavar="STORE", required=True, help="merged store directory")
    p.set_defaults(func=cmd_proposals_merge)


def cmd_proposals_merge(args) -> int:
    shards = [_require_dir(s, "shard store") for s in args.shards]
    from .proposals import load, merge

    result = merge(shards, Path(args.out))
    if hasattr(result, "format"):
        print(result.format())
    else:
        store = load(args.out)
        print(f"merged {len(shards)} shards into {args.out}: {len(store)} images")
    return 0


# ---------------------------------------------------------------- soco show ...


def add_show(subparsers):
    p = _add(
        subparsers,
        "show",
        help="draw pictures of intermediate results (proposals, views, training curves)",
        description="Draw pictures to check intermediate results by eye.",
        examples=[
            "soco show proposals proposals/ --images photos/ -o pictures/",
            "soco show views --images photos/ --proposals proposals/ -o pictures/",
            "soco show curves runs/tiny",
        ],
    )
    p.set_defaults(func=lambda args: _missing_subcommand(p))
    sub = p.add_subparsers(title="what to show", metavar="WHAT", parser_class=_Parser)
    for add in SHOW_COMMANDS:
        add(sub)


def _missing_subcommand(parser) -> int:
    parser.print_help(sys.stderr)
    return 2


def add_show_proposals(subparsers):
    p = _add(
        subparsers,
        "proposals",
        help="draw a random sample of proposals on their images, plus statistics",
        description=(
            "Draw a random subset of each sampled image's proposals in distinct colours\n"
            "(like the paper's Figure 2), a contact sheet of them, and histograms of the\n"
            "number of proposals per image and of proposal size over the whole store\n"
            "(stats.png, stats.json; like the paper's Figure 3)."
        ),
        examples=[
            "soco show proposals proposals/ --images photos/ -o pictures/",
            "soco show proposals proposals/ --images photos/ -o pictures/ --num 16 --per-image 5",
        ],
    )
    p.add_argument("store", metavar="STORE", help="proposal store directory")
    p.add_argument("--images", metavar="IMAGES", required=True, help="the image folder or list the store was made from")
    p.add_argument("-o", "--out", metavar="DIR", required=True, help="output directory for the pictures")
    p.add_argument("--num", type=_positive_int, default=8, metavar="N", help="images to draw (default 8)")
    p.add_argument("--per-image", type=_positive_int, default=10, metavar="K", help="boxes per image (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the sample (default 0)")
    p.set_defaults(func=cmd_show_proposals)


def cmd_show_proposals(args) -> int:
    _require_dir(args.store, "proposal store")
    _require_source(args.images)
    from .proposals import load
    from .viz import show_proposals

    store = load(args.store)
    written = show_proposals(
        store, args.images, Path(args.out), num=args.num, per_image=args.per_image, seed=args.seed
    )
    _print_written(args.out, written)
    return 0


def _print_written(out, written) -> None:
    print(f"wrote {len(written)} files to {out}")
    for path in written:
        print(f"  {path}")


def add_show_views(subparsers):
    p = _add(
        subparsers,
        "views",
        help="draw the training views of a few images with their boxes and FPN levels",
        description=(
            "For a few random images, draw the image and each training view side by side\n"
            "(V1, V2, V3 and, with views.soco_star=true, V4; the data part of the paper's\n"
            "Figure 1): the sampled proposals' boxes in one colour per proposal in every view,\n"
            "labelled with their FPN level (P2..P5); padded slots are not drawn. The image\n"
            "panel shows the proposals and the crops (white). Photometric augmentation is off\n"
            "unless --augment is given. --set changes the data config (dotted keys)."
        ),
        examples=[
            "soco show views --images photos/ --proposals proposals/ -o pictures/",
            "soco show views --images photos/ --proposals proposals/ -o pictures/ --set views.soco_star=true",
            "soco show views --images coco/annotations/instances_train2017.json --image-root coco/train2017 "
            "--proposals props/ -o pictures/ --augment",
        ],
    )
    p.add_argument("--images", metavar="IMAGES", required=True,
                   help="image folder, list file or COCO-style JSON the proposals were made for")
    p.add_argument("--proposals", metavar="STORE", required=True, help="proposal store directory")
    p.add_argument("-o", "--out", metavar="DIR", required=True, help="output directory for the pictures")
    p.add_argument("--image-root", metavar="DIR", default=None,
                   help="folder a COCO JSON's file names are relative to (default: the JSON's folder)")
    p.add_argument("--num", type=_positive_int, default=4, metavar="N", help="images to draw (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the images and their views (default 0)")
    p.add_argument("--augment", action="store_true", help="apply the photometric augmentation too")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="data config override, e.g. views.soco_star=true (repeatable)")
    p.set_defaults(func=cmd_show_views)


def cmd_show_views(args) -> int:
    _require_source(args.images)
    _require_dir(args.proposals, "proposal store")
    if args.image_root is not None:
        _require_dir(args.image_root, "image root")
    from .config import DataConfig, apply_overrides

    try:
        config = apply_overrides(DataConfig(seed=args.seed), args.overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from .data.dataset import SoCoDataset
    from .viz import show_views

    dataset = SoCoDataset(args.images, args.proposals, config, image_root=args.image_root)
    written = show_views(dataset, Path(args.out), num=args.num, seed=args.seed, augment=args.augment)
    _print_written(args.out, written)
    return 0


def add_show_curves(subparsers):
    p = _add(
        subparsers,
        "curves",
        help="plot a training run's loss, lr, tau and images/s against the step",
        description=(
            "Plot RUN/metrics.jsonl (written by soco pretrain) into curves.png: the loss\n"
            "(raw and smoothed), learning rate, EMA momentum tau, and images/s with the\n"
            "fraction of time spent waiting for data. Works while the run is still going."
        ),
        examples=[
            "soco show curves runs/tiny",
            "soco show curves runs/fpn-100ep -o pictures/",
        ],
    )
    p.add_argument("run", metavar="RUN", help="run folder given to soco pretrain --out")
    p.add_argument("-o", "--out", metavar="DIR", default=None, help="output directory (default: RUN)")
    p.set_defaults(func=cmd_show_curves)


def cmd_show_curves(args) -> int:
    run = _require_dir(args.run, "run folder")
    if not (run / "metrics.jsonl").is_file():
        raise UsageError(f"{args.run}: no metrics.jsonl (not a soco pretrain run folder, or no step logged yet)")
    from .train.metrics import read_metrics
    from .viz import plot_curves

    records = read_metrics(run)
    if not records:
        raise UsageError(f"{run / 'metrics.jsonl'}: no step logged yet")
    written = plot_curves(run, Path(args.out) if args.out else None, records=records)
    _print_written(args.out or args.run, written)
    return 0


# ---------------------------------------------------------------- soco pretrain

# Kept in step with soco_pretrain.presets.PRESETS (a test checks); listed here so that
# `soco --help` imports nothing.
PRETRAIN_PRESETS = ("fpn-100ep", "fpn-400ep", "fpn-star-400ep", "c4-100ep", "c4-400ep", "tiny")


def add_pretrain(subparsers):
    p = _add(
        subparsers,
        "pretrain",
        help="SoCo pretraining from a preset (one CPU/GPU, or torchrun/srun for many)",
        description=(
            "Pretrain SoCo (paper section 4.1) on IMAGES with their proposal store into RUN:\n"
            "RUN/config.yaml (the resolved config), RUN/metrics.jsonl, RUN/checkpoints/last.pt\n"
            "(+ numbered ones). Presets: fpn-100ep, fpn-400ep, fpn-star-400ep (SoCo*, 4 views),\n"
            "c4-100ep, c4-400ep (total batch 2048 = train.per_device_batch x processes x\n"
            "accumulation steps), and tiny (minutes on 2 CPU cores). --set changes any config\n"
            "key (data.*, model.*, train.*). Rerunning the same command resumes from the last\n"
            "checkpoint. For several GPUs or nodes launch it with torchrun or srun\n"
            "(DDP + SyncBN; only rank 0 logs and saves)."
        ),
        examples=[
            "soco pretrain --preset tiny --images photos/ --proposals proposals/ --out runs/tiny",
            "soco pretrain --preset fpn-100ep --images imagenet/train --proposals props/ --out runs/fpn100 "
            "--set train.per_device_batch=128",
            "torchrun --nproc-per-node 8 -m soco_pretrain pretrain --preset fpn-400ep --images imagenet/train "
            "--proposals props/ --out runs/fpn400",
            "soco pretrain --preset tiny --images photos/ --proposals proposals/ --out runs/t --max-steps 20 "
            "--set train.precision=bf16",
        ],
    )
    p.add_argument("--preset", required=True, choices=PRETRAIN_PRESETS, metavar="NAME",
                   help=f"training preset: {', '.join(PRETRAIN_PRESETS)}")
    p.add_argument("--images", metavar="IMAGES", required=True,
                   help="image folder, list file or COCO-style JSON the proposals were made for")
    p.add_argument("--proposals", metavar="STORE", required=True, help="proposal store directory")
    p.add_argument("--out", metavar="RUN", required=True, help="run directory (config, metrics, checkpoints)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.epochs=200 or data.views.num_proposals=8 (repeatable)")
    p.add_argument("--max-steps", type=_positive_int, default=None, metavar="N",
                   help="stop after N optimiser steps in total (the schedule keeps its full length)")
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto: continue from RUN's last checkpoint if any (default); none: start at step 0; "
                        "or a checkpoint file")
    p.add_argument("--image-root", metavar="DIR", default=None,
                   help="folder a COCO JSON's file names are relative to (default: the JSON's folder)")
    p.add_argument("--workers", type=_non_negative_int, default=None, metavar="N",
                   help="data-loader processes per device (default: the preset's train.workers)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (sets train.compile)")
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args) -> int:
    _require_source(args.images)
    _require_dir(args.proposals, "proposal store")
    if args.image_root is not None:
        _require_dir(args.image_root, "image root")
    if args.resume not in ("auto", "none") and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume}: expected auto, none or a checkpoint file")
    from .config import apply_overrides
    from .presets import PresetError, load_preset

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"train.workers={args.workers}")
    if args.compile:
        overrides.append("train.compile=true")
    try:
        config = apply_overrides(load_preset(args.preset), overrides)
    except (PresetError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    from .train.checkpoint import CheckpointError
    from .train.distributed import DistributedError
    from .train.loop import NonFiniteLossError, PretrainError, pretrain

    try:
        pretrain(config, args.images, args.proposals, Path(args.out), max_steps=args.max_steps,
                 resume=args.resume, image_root=args.image_root)
    except (PretrainError, CheckpointError, DistributedError) as exc:
        raise UsageError(_one_line(exc)) from None
    except NonFiniteLossError as exc:  # not the user's input: exit 1, but still one line
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- soco demo


def add_demo(subparsers):
    p = _add(
        subparsers,
        "demo",
        help="run the pipeline on 7 bundled photos (offline) and draw the results",
        description=(
            "Run the whole pipeline on 7 photos bundled with scikit-image (nothing is\n"
            "downloaded): write them to DIR/images, compute proposals into DIR/proposals and\n"
            "draw them into DIR/pictures, draw the training views into DIR/views, then run a\n"
            "short tiny-preset pretraining into DIR/run and plot its curves."
        ),
        examples=["soco demo", "soco demo -o /tmp/soco-demo --workers 2"],
    )
    p.add_argument("-o", "--out", metavar="DIR", default="soco-demo", help="output directory (default ./soco-demo)")
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"parallel processes (default: number of CPU cores, {_default_workers()} here)",
    )
    from .demo import DEMO_PRETRAIN_STEPS  # a light module (no torch)

    p.add_argument("--pretrain-steps", type=_non_negative_int, default=DEMO_PRETRAIN_STEPS, metavar="N",
                   help=f"tiny pretraining steps (default {DEMO_PRETRAIN_STEPS}; 0 skips pretraining)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), workers=args.workers or _default_workers(), pretrain_steps=args.pretrain_steps)
    return 0


# ---------------------------------------------------------------- main

COMMANDS = [add_proposals, add_proposals_merge, add_pretrain, add_show, add_demo]
SHOW_COMMANDS = [add_show_proposals, add_show_views, add_show_curves]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="SoCo object-level self-supervised pretraining for detection, on your own images.",
        epilog=(
            "examples:\n"
            "  soco demo                                   # try everything on bundled photos\n"
            "  soco proposals photos/ -o proposals/\n"
            "  soco show proposals proposals/ --images photos/ -o pictures/\n\n"
            "Run 'soco COMMAND --help' for a command's options."
        ),
        formatter_class=_Formatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def _rewrite(argv: list[str]) -> list[str]:
    """``proposals merge ...`` -> ``proposals-merge ...`` (merge beside ``proposals IMAGES``).

    A folder literally named "merge" can still be given as ``./merge``.
    """
    if len(argv) >= 2 and argv[0] == "proposals" and argv[1] == "merge":
        return ["proposals-merge", *argv[2:]]
    return argv


# The project's own error types, as (module, class). Their messages are one line naming the
# file and the problem, so they are shown as "soco: error: ..." instead of a traceback.
USER_ERRORS = [
    ("soco_pretrain.images", "ImageError"),
    ("soco_pretrain.proposals.store", "StoreError"),
    ("soco_pretrain.proposals.generate", "GenerateError"),
    ("soco_pretrain.data.dataset", "DatasetError"),
]


def _user_errors() -> tuple[type[BaseException], ...]:
    # Only modules already imported can have raised: no heavy imports on the error path.
    errors: list[type[BaseException]] = [UsageError, FileNotFoundError, NotADirectoryError]
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None:
            errors.append(getattr(module, class_name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``soco`` console script; returns the exit status."""
    argv = _rewrite(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - only user errors become one line; bugs keep their traceback
        if isinstance(exc, _user_errors()):
            print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
