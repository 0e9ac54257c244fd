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


from .errors import SocoError, UserError


class UsageError(UserError):
    """A problem with the command line's arguments; printed as one line, exit status 2."""


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


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


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
            "soco show views --images photos/ -o pictures/ --set views.proposal_source=random",
            "soco show views --images coco/annotations/instances_train2017.json --image-root coco/train2017 "
            "--proposals props/ -o pictures/ --augment",
        ],
    )
    p.add_argument("--images", metavar="IMAGES", required=True,
                   help="image folder, list file or COCO-style JSON the proposals were made for")
    p.add_argument("--proposals", metavar="STORE", default=None,
                   help="proposal store directory (needed with the default views.proposal_source=selective_search)")
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
    if args.proposals is not None:
        _require_dir(args.proposals, "proposal store")
    if args.image_root is not None:
        _require_dir(args.image_root, "image root")
    from .config import DataConfig, apply_overrides

    try:
        config = apply_overrides(DataConfig(seed=args.seed), args.overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if config.views.proposal_source == "selective_search" and args.proposals is None:
        raise UsageError("--proposals STORE is required with views.proposal_source=selective_search (the "
                         "default), or --set views.proposal_source=whole_image|random|coco")
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
            "soco pretrain --preset fpn-100ep --images imagenet/train --out runs/random "
            "--set data.views.proposal_source=random --set data.views.num_proposals=1   # Table 5c, no store",
        ],
    )
    p.add_argument("--preset", required=True, choices=PRETRAIN_PRESETS, metavar="NAME",
                   help=f"training preset: {', '.join(PRETRAIN_PRESETS)}")
    p.add_argument("--images", metavar="IMAGES", required=True,
                   help="image folder, list file or COCO-style JSON the proposals were made for")
    p.add_argument("--proposals", metavar="STORE", default=None,
                   help="proposal store directory (needed unless data.views.proposal_source is "
                        "whole_image, random or coco)")
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
    if args.proposals is not None:
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
    source = config.data.views.proposal_source
    if source == "selective_search" and args.proposals is None:
        raise UsageError("--proposals STORE is required with data.views.proposal_source=selective_search "
                         "(the default; make one with soco proposals), or set data.views.proposal_source="
                         "whole_image, random or coco")
    if source == "coco" and config.data.views.proposal_json and not Path(config.data.views.proposal_json).is_file():
        raise UsageError(f"data.views.proposal_json={config.data.views.proposal_json}: no such file")
    from .train.loop import pretrain

    pretrain(config, args.images, args.proposals, Path(args.out), max_steps=args.max_steps,
             resume=args.resume, image_root=args.image_root)
    return 0


# ---------------------------------------------------------------- soco export

EXPORT_TARGETS = ("torchvision", "detectron2", "mmdet")  # = transfer.export.TARGETS (no torch import here)


def add_export(subparsers):
    p = _add(
        subparsers,
        "export",
        help="export pretrained weights for torchvision, Detectron2 or MMDetection, with a key report",
        description=(
            "Write the pretrained encoder of RUN (a soco pretrain run folder: its\n"
            "checkpoints/last.pt; or a checkpoint file) as weights for a Mask R-CNN:\n"
            "  torchvision  state dict for maskrcnn_resnet50_fpn_v2 (C4 runs: resnet50 keys)\n"
            "  detectron2   pickle with Detectron2 v0.6 names + a ready config FILE.yaml\n"
            "  mmdet        {state_dict, meta} with MMDetection v3.3.0 names + a config FILE.py\n"
            "The projector and predictor are never exported (paper 4.2). --weights online (default,\n"
            "as BYOL and the released SoCo converters) or target (the EMA network). Prints which keys\n"
            "were loaded, which the detector must initialise (missing) and which were left (unused)."
        ),
        examples=[
            "soco export runs/fpn100 --to torchvision -o soco_r50fpn.pth",
            "soco export runs/fpn100 --to detectron2 -o soco_r50fpn.pkl   # + soco_r50fpn.yaml",
            "soco export runs/fpn100/checkpoints/step_00005000.pt --to mmdet -o soco_mmdet.pth",
            "soco export runs/c4-100ep --to torchvision --weights target -o soco_r50_c4.pth",
        ],
    )
    p.add_argument("run", metavar="RUN", help="run folder (uses RUN/checkpoints/last.pt) or a checkpoint file")
    p.add_argument("--to", required=True, choices=EXPORT_TARGETS, metavar="TARGET",
                   help=f"detector library: {', '.join(EXPORT_TARGETS)}")
    p.add_argument("--weights", choices=("online", "target"), default="online", metavar="WHICH",
                   help="online (default) or target (EMA) network")
    p.add_argument("-o", "--out", metavar="FILE", required=True, help="output weights file")
    p.add_argument("--config-out", metavar="FILE", default=None,
                   help="where to write the fine-tune config (detectron2: default FILE.yaml; mmdet: FILE.py)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    if not Path(args.run).exists():
        raise UsageError(f"{args.run}: no such run folder or checkpoint file")
    if args.config_out is not None and args.to == "torchvision":
        raise UsageError("--config-out is for --to detectron2 or mmdet (torchvision needs no config)")
    from .transfer.export import export

    report = export(args.run, args.to, weights=args.weights, out=Path(args.out),
                    config_out=Path(args.config_out) if args.config_out else None)
    print(report.format())
    return 0


# ---------------------------------------------------------------- soco linear


def add_linear(subparsers):
    p = _add(
        subparsers,
        "linear",
        help="linear probe: a linear classifier on the frozen pretrained ResNet-50 (top-1/top-5)",
        description=(
            "Train a linear classifier on the frozen ResNet-50 of WEIGHTS (paper appendix B:\n"
            "backbone and BN statistics fixed; SGD lr 30 x batch/256, momentum 0.9, weight decay 0,\n"
            "batch 256, 100 epochs, cosine after a 5-epoch warm-up as the released code; train:\n"
            "random resized crop 224 + flip; test: shorter side 256, centre crop 224). TRAIN and\n"
            "VAL are class folders (ROOT/CLASS/IMAGE, as torchvision ImageFolder) with the same\n"
            "class names. Writes OUT/metrics.json (top1, top5), OUT/metrics.jsonl (per epoch) and\n"
            "OUT/checkpoints/last.pt; rerunning the same command resumes. Unreadable images are\n"
            "skipped and listed in metrics.json. --image-size etc. shrink it for a CPU."
        ),
        examples=[
            "soco linear --weights runs/c4-100ep --train imagenet/train --val imagenet/val --out runs/c4-linear",
            "soco linear --weights runs/fpn100 --soco-weights target --train imagenet/train --val imagenet/val "
            "--out runs/fpn100-linear-ema",
            "soco linear --weights none --train shapes/train --val shapes/val --out runs/random-linear "
            "--epochs 5 --batch 32 --image-size 96   # random-init baseline, CPU-sized",
        ],
    )
    p.add_argument("--weights", required=True, metavar="RUN|CKPT|none",
                   help="soco pretrain run folder, checkpoint file, ResNet-50 / torchvision-export state "
                        "dict, or none (random init)")
    p.add_argument("--train", required=True, metavar="DIR", help="training class folder (DIR/CLASS/IMAGE)")
    p.add_argument("--val", required=True, metavar="DIR", help="validation class folder, same class names")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (metrics, checkpoint)")
    p.add_argument("--soco-weights", default="online", choices=("online", "target"),
                   help="which SoCo network: online (default; released main_linear.py, BYOL) or target (EMA)")
    p.add_argument("--epochs", type=_positive_int, default=100, metavar="N", help="epochs (default 100, paper B)")
    p.add_argument("--batch", type=_positive_int, default=256, metavar="N", help="batch size (default 256, paper B)")
    p.add_argument("--lr", type=_positive_float, default=30.0, metavar="LR",
                   help="learning rate at batch 256, scaled by batch/256 (default 30, paper B)")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "steps"),
                   help="cosine (default, released code) or steps (MoCo: x0.1 at 60%% and 80%%)")
    p.add_argument("--warmup-epochs", type=_non_negative_int, default=5, metavar="N",
                   help="linear warm-up from lr/100 (default 5, released code; 0 = none)")
    p.add_argument("--image-size", type=_positive_int, default=224, metavar="PX",
                   help="crop size (default 224); the test resize is PX x 256/224")
    p.add_argument("--workers", type=_non_negative_int, default=None, metavar="N",
                   help="data-loader processes (default: usable cores, at most 8)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--max-iters", type=_non_negative_int, default=None, metavar="N",
                   help="stop after N optimiser steps in total (the schedule keeps its length), then evaluate")
    p.add_argument("--eval-every", type=_non_negative_int, default=0, metavar="N",
                   help="also evaluate every N epochs into metrics.jsonl (default 0: only at the end)")
    p.add_argument("--resume", default="auto", choices=("auto", "none"),
                   help="auto: continue from OUT/checkpoints/last.pt if any (default); none: start over")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_linear)


def cmd_linear(args) -> int:
    _require_dir(args.train, "training class folder")
    _require_dir(args.val, "validation class folder")
    if args.weights.lower() != "none" and not Path(args.weights).exists():
        raise UsageError(f"--weights {args.weights}: no such run folder or checkpoint (or give --weights none)")
    from .transfer.linear import LinearConfig, linear_probe

    config = LinearConfig(epochs=args.epochs, batch_size=args.batch, base_lr=args.lr, schedule=args.schedule,
                          warmup_epochs=args.warmup_epochs, image_size=args.image_size, workers=args.workers,
                          eval_every=args.eval_every, seed=args.seed)
    linear_probe(args.weights, args.train, args.val, Path(args.out), config, soco_weights=args.soco_weights,
                 resume=args.resume, max_iters=args.max_iters, device=args.device, progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------- soco finetune


def parse_sizes(text: str) -> tuple[int, ...]:
    """Short sides: ``"800"``, ``"640,672,704"`` or ``"640-800"`` (every 32 px, Detectron2's list)."""
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-"))
            if lo > hi:
                raise ValueError
            sizes = tuple(range(lo, hi + 1, 32)) + (() if (hi - lo) % 32 == 0 else (hi,))
        else:
            sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad sizes {text!r}: expected PX, PX,PX,... or LO-HI (e.g. 640-800)") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"bad sizes {text!r}: sizes must be positive")
    return sizes


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


# Fine-tune options shared by soco finetune and soco compare. RECIPE: options that change the
# results (part of a comparison's specification); the others only change how it runs.
FINETUNE_RECIPE_DEFAULTS = {
    "soco_weights": "online", "schedule": "1x", "max_iters": None, "batch": 16, "lr": None,
    "min_size": (640, 672, 704, 736, 768, 800), "max_size": 1333, "test_size": None, "roi_batch": 512,
    "test_proposals": 1000, "detections": 100, "boxes_only": False, "precise_bn": 200, "precision": "fp32",
}


def _add_coco_data(p, required: bool = True) -> None:
    """--train-json, --train-images, --val-json, --val-images (COCO-format data)."""
    p.add_argument("--train-json", required=required, metavar="JSON", help="COCO instances JSON for training")
    p.add_argument("--train-images", required=required, metavar="DIR", help="folder of the training JSON's file_names")
    p.add_argument("--val-json", required=required, metavar="JSON", help="COCO instances JSON for evaluation")
    p.add_argument("--val-images", required=required, metavar="DIR", help="folder of the val JSON's file_names")


def _check_coco_data(args) -> None:
    for flag, path in (("--train-json", args.train_json), ("--val-json", args.val_json)):
        if not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    _require_dir(args.train_images, "training image folder")
    _require_dir(args.val_images, "validation image folder")


def _add_finetune_recipe(p, unset: bool = False) -> None:
    """The fine-tune recipe and run options. ``unset``: recipe options default to None (soco
    compare tells given from not given; FINETUNE_RECIPE_DEFAULTS fills them in)."""
    d = {k: None for k in FINETUNE_RECIPE_DEFAULTS} if unset else FINETUNE_RECIPE_DEFAULTS
    p.add_argument("--soco-weights", choices=("online", "target"), default=d["soco_weights"],
                   help="for a run/checkpoint: online (default, as soco export) or target (EMA) encoder")
    p.add_argument("--schedule", choices=("1x", "2x"), default=d["schedule"],
                   help="1x (default: 90k iterations at batch 16) or 2x (180k)")
    p.add_argument("--max-iters", type=_positive_int, default=None, metavar="N",
                   help="train N iterations instead of --schedule (lr drops at 2/3 and 8/9 of N)")
    p.add_argument("--batch", type=_positive_int, default=d["batch"], metavar="N",
                   help="total batch over all processes (default 16, paper)")
    p.add_argument("--lr", type=_positive_float, default=None, metavar="LR",
                   help="peak learning rate (default 0.02 x batch / 16)")
    p.add_argument("--min-size", type=parse_sizes, default=d["min_size"], metavar="SIZES",
                   help="training short side(s), one drawn per image: PX, PX,PX,... or LO-HI in steps of "
                        "32 (default 640-800, Detectron2)")
    p.add_argument("--max-size", type=_positive_int, default=d["max_size"], metavar="PX",
                   help="long-side cap (default 1333)")
    p.add_argument("--test-size", type=_positive_int, default=None, metavar="PX",
                   help="evaluation short side (default: the largest --min-size, 800)")
    p.add_argument("--roi-batch", type=_positive_int, default=d["roi_batch"], metavar="N",
                   help="RoIs sampled per training image for the box head (default 512, Detectron2)")
    p.add_argument("--test-proposals", type=_positive_int, default=d["test_proposals"], metavar="N",
                   help="RPN proposals per image at test time (default 1000, Detectron2)")
    p.add_argument("--detections", type=_positive_int, default=d["detections"], metavar="N",
                   help="detections kept per image (default 100, COCO)")
    p.add_argument("--boxes-only", action="store_true", default=d["boxes_only"],
                   help="Faster R-CNN and bbox AP even if the data has masks")
    p.add_argument("--precise-bn", type=_non_negative_int, default=d["precise_bn"], metavar="N",
                   help="re-estimate BN statistics over N training batches before evaluating (default 200, "
                        "released config; at most the iterations; 0 = off)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=d["precision"],
                   help="fp32 (default, as Detectron2) or bf16/fp16 autocast (fp16: CUDA only)")
    p.add_argument("--workers", type=_non_negative_int, default=min(4, _default_workers()), metavar="N",
                   help=f"data-loader processes per device (default {min(4, _default_workers())})")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--log-every", type=_positive_int, default=20, metavar="N", help="metrics.jsonl period (default 20)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=5000, metavar="N",
                   help="checkpoint period in iterations (default 5000; always one at the end)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_finetune(subparsers):
    p = _add(
        subparsers,
        "finetune",
        help="fine-tune Mask R-CNN (torchvision R50-FPN v2) from SoCo weights and report COCO AP",
        description=(
            "Fine-tune torchvision's Mask R-CNN v2 (R50-FPN, 4conv1fc BN box head; Faster R-CNN when\n"
            "the training JSON has no masks, or with --boxes-only) on a COCO-format set, then evaluate\n"
            "bbox (and segm) AP with pycocotools into OUT/metrics.json. Recipe of paper 4.2: SGD\n"
            "momentum 0.9, lr 0.02 at batch 16 scaled linearly, linear warm-up 1000 iterations, x0.1\n"
            "after 2/3 and 8/9 of training, weight decay 2.5e-5; 1x = 90k iterations at batch 16\n"
            "(2x = 180k; both scaled by 16/batch). --fraction takes a seeded random subset of the\n"
            "training images (paper 4.5 Mini COCO). BN layers are trained (SyncBN under torchrun).\n"
            "Rerunning the same command resumes from OUT/checkpoints/last.pt. For a CPU, shrink\n"
            "--min-size/--max-size, --batch, --roi-batch, --test-proposals and --detections."
        ),
        examples=[
            "soco export runs/fpn100 --to torchvision -o soco.pth && soco finetune --weights soco.pth "
            "--train-json coco/annotations/instances_train2017.json --train-images coco/train2017 "
            "--val-json coco/annotations/instances_val2017.json --val-images coco/val2017 --out ft/soco-1x",
            "torchrun --nproc-per-node 8 -m soco_pretrain finetune --weights runs/fpn100 --fraction 0.05 "
            "--train-json ... --train-images ... --val-json ... --val-images ... --out ft/mini5",
            "soco finetune --weights none --train-json t.json --train-images imgs --val-json v.json "
            "--val-images imgs --out ft/scratch --max-iters 200 --batch 2 --min-size 320 --max-size 512 "
            "--roi-batch 128   # CPU-sized",
        ],
    )
    p.add_argument("--weights", required=True, metavar="FILE|RUN|none",
                   help="torchvision state dict (soco export --to torchvision), soco pretrain run folder or "
                        "checkpoint, or none (random init baseline)")
    _add_coco_data(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (metrics, checkpoints)")
    p.add_argument("--fraction", type=_fraction, default=1.0, metavar="F",
                   help="seeded random fraction of the training images, e.g. 0.05 or 0.10 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset, data order, flips and new heads (default 0)")
    _add_finetune_recipe(p)
    p.add_argument("--eval-every", type=_non_negative_int, default=0, metavar="N",
                   help="also evaluate every N iterations (default 0: only at the end)")
    p.add_argument("--eval-only", action="store_true",
                   help="only evaluate: OUT's last checkpoint if any (with --resume auto), else --weights")
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto: continue from OUT/checkpoints/last.pt if any (default); none: start over; "
                        "or a checkpoint file")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    _check_coco_data(args)
    if args.weights.lower() != "none" and not Path(args.weights).exists():
        raise UsageError(f"--weights {args.weights}: no such file or run folder (or give --weights none)")
    if args.resume not in ("auto", "none") and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume}: expected auto, none or a checkpoint file")
    from .transfer.finetune import FinetuneOptions, finetune

    options = FinetuneOptions(
        schedule=args.schedule, max_iters=args.max_iters, fraction=args.fraction, seed=args.seed, batch=args.batch,
        lr=args.lr, train_sizes=args.min_size, test_size=args.test_size, max_size=args.max_size,
        roi_batch=args.roi_batch, test_proposals=args.test_proposals, detections=args.detections,
        boxes_only=args.boxes_only, soco_weights=args.soco_weights, precise_bn=args.precise_bn,
        precision=args.precision, workers=args.workers, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, eval_only=args.eval_only,
        resume=args.resume, device=args.device, progress=not args.no_progress)
    weights = None if args.weights.lower() == "none" else args.weights
    finetune(weights, args.train_json, args.train_images, args.val_json, args.val_images, Path(args.out), options)
    return 0


# ---------------------------------------------------------------- soco compare


def parse_fractions(text: str) -> tuple[float, ...]:
    """``"0.05,0.1,1"`` -> (0.05, 0.1, 1.0): label fractions in (0, 1], none twice."""
    parts = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in parts):
        raise argparse.ArgumentTypeError(f"bad fractions {text!r}: expected F,F,... e.g. 0.05,0.1,1")
    try:
        values = tuple(_fraction(t) for t in parts)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"bad fractions {text!r}: {exc}") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"bad fractions {text!r}: a fraction is listed twice")
    return values


# kNN options of soco compare --metric knn (= evaluate.knn.KnnOptions' defaults)
KNN_DEFAULTS = {"k": 20, "temperature": 0.07, "size": None, "min_box": 32.0, "bn": "precise"}
# options that only one metric uses (flag -> metric)
_METRIC_ONLY = {
    **{f"--{k.replace('_', '-')}": "finetune" for k in FINETUNE_RECIPE_DEFAULTS if k not in ("soco_weights", "batch")},
    **{f"--{k.replace('_', '-')}": "knn" for k in KNN_DEFAULTS},
}


def _add_knn_options(p, unset: bool = False) -> None:
    """The kNN protocol options of soco knn and soco compare --metric knn. ``unset``: default None
    (soco compare tells given from not given; KNN_DEFAULTS fills them in)."""
    d = {k: None for k in KNN_DEFAULTS} if unset else KNN_DEFAULTS
    p.add_argument("--k", type=_positive_int, default=d["k"], metavar="K", help="neighbours (default 20)")
    p.add_argument("--temperature", type=_positive_float, default=d["temperature"], metavar="T",
                   help="vote weight exp(cos/T) (default 0.07)")
    p.add_argument("--size", type=_int_at_least(32), default=None, metavar="PX",
                   help="square input size (default: the run's data.views.v1_size, else 224; soco compare: "
                        "the first run's, for every init)")
    p.add_argument("--min-box", type=_non_negative_float, default=d["min_box"], metavar="PX",
                   help="leave out boxes narrower or lower than this in the original image (default 32)")
    p.add_argument("--bn", choices=("precise", "running"), default=d["bn"],
                   help="precise (default): BatchNorm statistics re-estimated on the kNN train images; "
                        "running: the weights' own")


def add_knn(subparsers):
    p = _add(
        subparsers,
        "knn",
        help="object-level kNN accuracy of pretrained weights on a labelled COCO-format set (CPU-cheap)",
        description=(
            "Embed the labelled boxes of two COCO-format sets with the network being pretrained\n"
            "(whole image resized to the pretraining V1 size, RoIAlign on the box's FPN level, the\n"
            "box head; C4: the res5 head) and classify every val object by its k nearest train\n"
            "objects (cosine, k 20, weights exp(cos/0.07)). Writes OUT/knn.json: top-1, top-5, mean\n"
            "per-class top-1, the majority-class rate, the effective rank of the features (about 1 =\n"
            "collapsed) and a per-category table. Crowd boxes and boxes under --min-box px are left\n"
            "out and counted. BatchNorm statistics are re-estimated on the train images (--bn\n"
            "precise) so that every init is normalised the same way. Refuses when val images were\n"
            "in the pretraining run's data manifest (by content) unless --allow-leak."
        ),
        examples=[
            "soco knn --weights runs/tiny --train-json train.json --train-images imgs --val-json val.json "
            "--val-images imgs --out knn/tiny",
            "soco knn --weights none --seed 1 --size 96 --train-json train.json --train-images imgs "
            "--val-json val.json --val-images imgs --out knn/random   # random-init baseline",
            "python -c \"import torch, torchvision; torch.save(torchvision.models.resnet50(weights='DEFAULT')"
            ".state_dict(), 'r50.pth')\" && soco knn --weights r50.pth ...   # supervised ResNet-50 (C4 head)",
        ],
    )
    p.add_argument("--weights", required=True, metavar="RUN|FILE|none",
                   help="soco pretrain run folder or checkpoint, a torchvision state dict (soco export, "
                        "Mask R-CNN v2 or ResNet-50 keys), or none (random init, seeded by --seed)")
    _add_coco_data(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (knn.json)")
    p.add_argument("--soco-weights", choices=("online", "target"), default="online",
                   help="for a run/checkpoint: the online (default) or target (EMA) encoder")
    _add_knn_options(p)
    p.add_argument("--fraction", type=_fraction, default=1.0, metavar="F",
                   help="seeded random fraction of the train images used as neighbours (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of random init and of --fraction (default 0)")
    p.add_argument("--batch", type=_positive_int, default=16, metavar="N", help="images per forward pass (default 16)")
    p.add_argument("--workers", type=_non_negative_int, default=min(4, _default_workers()), metavar="N",
                   help=f"image-decoding processes (default {min(4, _default_workers())})")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--allow-leak", action="store_true",
                   help="evaluate even if val images were in the pretraining set")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_knn)


def cmd_knn(args) -> int:
    _check_coco_data(args)
    if args.weights.lower() != "none" and not Path(args.weights).exists():
        raise UsageError(f"--weights {args.weights}: no such file or run folder (or give --weights none)")
    from .evaluate.knn import KnnOptions, knn_eval

    options = KnnOptions(k=args.k, temperature=args.temperature, size=args.size, min_box=args.min_box,
                         batch=args.batch, bn=args.bn, seed=args.seed, train_fraction=args.fraction,
                         soco_weights=args.soco_weights, allow_leak=args.allow_leak, workers=args.workers,
                         device=args.device, progress=not args.no_progress)
    knn_eval(args.weights, args.train_json, args.train_images, args.val_json, args.val_images, Path(args.out), options)
    return 0


def add_compare(subparsers):
    p = _add(
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
            "refused (--allow-leak to run anyway)."
        ),
        examples=[
            "soco compare --metric knn --init none --init soco=runs/ss0,runs/ss1,runs/ss2 --train-json train.json "
            "--train-images imgs --val-json val.json --val-images imgs --seeds 3 --out cmp/",
            "soco compare --init none --init runs/fpn100 --fractions 0.05,0.1,1 --seeds 3 --train-json t.json "
            "--train-images imgs --val-json v.json --val-images imgs --max-iters 2000 --batch 8 --out cmp/ "
            "--devices cuda:0,cuda:1",
            "soco compare --out cmp/ --arm 2/8   # cluster job 2 of 8 (arms 2, 10, 18, ...) of the comparison in cmp/",
            "soco compare --out cmp/ --report-only   # the report from the arms finished so far",
        ],
    )
    p.add_argument("--init", action="append", default=[], metavar="INIT",
                   help="none, PATH or NAME=PATH[,PATH,...] (repeat; the first is the baseline)")
    _add_coco_data(p, required=False)
    p.add_argument("--out", required=True, metavar="DIR", help="comparison folder (arms, compare.json, report)")
    p.add_argument("--metric", choices=("finetune", "knn"), default=None,
                   help="finetune (default: Mask R-CNN COCO AP) or knn (object-level kNN accuracy)")
    p.add_argument("--fractions", type=parse_fractions, default=None, metavar="F,F,...",
                   help="label fractions of the training images, e.g. 0.05,0.1,1 (default 1)")
    p.add_argument("--seeds", type=_positive_int, default=None, metavar="S", help="seeds 0..S-1 per arm (default 3)")
    p.add_argument("--arm", type=parse_shard, default=None, metavar="i/N",
                   help="run only arms i, i+N, i+2N, ... (cluster array jobs); the report once all are done")
    p.add_argument("--devices", default=None, metavar="DEV,DEV,...",
                   help="one process per device (e.g. cuda:0,cuda:1; logs in OUT/logs), then the report")
    p.add_argument("--report-only", action="store_true", help="only (re)build the report from the finished arms")
    p.add_argument("--allow-leak", action="store_true",
                   help="run even if validation images are in an init's pretraining set")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # --devices children
    g = p.add_argument_group("fine-tune options (as soco finetune; --soco-weights, --batch, --device and "
                             "--no-progress also apply to --metric knn)")
    _add_finetune_recipe(g, unset=True)
    _add_knn_options(p.add_argument_group("kNN options (--metric knn)"), unset=True)
    p.set_defaults(func=cmd_compare)


def _given_spec_flags(args) -> list[str]:
    """The comparison options given on the command line (they default to None in soco compare)."""
    names = ["train_json", "train_images", "val_json", "val_images", "metric", "fractions", "seeds",
             *FINETUNE_RECIPE_DEFAULTS, *KNN_DEFAULTS]
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) not in (None, False)]


def _compare_spec(args, runtime: dict):
    """The CompareSpec of the command line (--init given) or of OUT/compare.json (no --init)."""
    from .evaluate.compare import CompareSpec, parse_init, read_spec

    given = _given_spec_flags(args)
    if not args.init:
        if given:
            raise UsageError(f"{', '.join(given)} given without --init: give every --init too, or none of the "
                             f"comparison options to reuse {Path(args.out) / 'compare.json'}")
        return read_spec(args.out, runtime)
    missing = [f for f, v in (("--train-json", args.train_json), ("--train-images", args.train_images),
                              ("--val-json", args.val_json), ("--val-images", args.val_images)) if v is None]
    if missing:
        raise UsageError(f"the following arguments are required with --init: {', '.join(missing)}")
    _check_coco_data(args)
    metric = args.metric or "finetune"
    wrong = [flag for flag in given if _METRIC_ONLY.get(flag, metric) != metric]
    if wrong:
        raise UsageError(f"{', '.join(wrong)}: not an option of --metric {metric}")
    inits = [parse_init(text, must_exist=not args.report_only) for text in args.init]

    def value(name, defaults):
        v = getattr(args, name)
        return defaults[name] if v is None else v

    if metric == "finetune":
        f = FINETUNE_RECIPE_DEFAULTS
        options = {name: value(name, f) for name in f if name != "min_size"}
        options["train_sizes"] = list(value("min_size", f))
    else:
        options = {name: value(name, KNN_DEFAULTS) for name in KNN_DEFAULTS}
        if options["size"] is None:  # one input size for every arm: the first run's V1 size, else 224
            from .evaluate.knn import common_size

            options["size"] = common_size([p for init in inits for p in init.paths if p])
        options.update(batch=value("batch", FINETUNE_RECIPE_DEFAULTS),
                       soco_weights=value("soco_weights", FINETUNE_RECIPE_DEFAULTS))
    absolute = os.path.abspath
    return CompareSpec(tuple(inits), args.fractions or (1.0,), args.seeds or 3, metric, absolute(args.train_json),
                       absolute(args.train_images), absolute(args.val_json), absolute(args.val_images), options,
                       runtime)


def _write_compare_report(spec, out) -> int:
    """Write the report from the finished arms; returns how many are missing."""
    from .evaluate.compare import collect
    from .evaluate.report import write_report

    done, missing = collect(spec, out)
    if not done:
        raise UsageError(f"{out}: no finished arm yet ({len(missing)} to run)")
    paths = write_report(spec, out, done, missing)
    print(f"report of {len(done)}/{len(done) + len(missing)} arms: {', '.join(str(p) for p in paths)}")
    if missing:
        names = ", ".join(arm.label for arm in missing[:8]) + (" ..." if len(missing) > 8 else "")
        print(f"missing {len(missing)} arm(s): {names}")
    return len(missing)


def cmd_compare(args) -> int:
    if args.devices and args.arm:
        raise UsageError("--devices and --arm exclude each other (--devices gives each device its own --arm)")
    if args.report_only and (args.devices or args.arm):
        raise UsageError("--report-only runs nothing: leave out --devices and --arm")
    out = Path(args.out)
    runtime = {"workers": args.workers, "device": args.device, "log_every": args.log_every,
               "checkpoint_every": args.checkpoint_every, "progress": not args.no_progress}
    from .evaluate.compare import check_leaks, collect, parse_devices, prepare_out, run_compare, run_devices

    spec = _compare_spec(args, runtime)
    if args.report_only:
        if not (out / "compare.json").is_file():
            raise UsageError(f"{out}: no compare.json (nothing run there yet)")
        prepare_out(spec, out)  # the same comparison as the one recorded
        _write_compare_report(spec, out)
        return 0
    devices = parse_devices(args.devices) if args.devices else None
    prepare_out(spec, out)
    if not args.allow_leak:
        check_leaks(spec, progress=runtime["progress"])
    arms = spec.arms()
    print(f"comparing {len(spec.inits)} init(s) ({', '.join(i.name for i in spec.inits)}; baseline "
          f"{spec.baseline.name}) x {len(spec.fractions)} fraction(s) x {spec.seeds} seed(s) = {len(arms)} arms, "
          f"metric {spec.metric}, in {out}", flush=True)
    if devices:
        runtime_args = ["--workers", str(args.workers), "--log-every", str(args.log_every),
                        "--checkpoint-every", str(args.checkpoint_every)]
        if args.no_progress:
            runtime_args.append("--no-progress")
        statuses = run_devices(out, devices, runtime_args)
        missing = _write_compare_report(spec, out) if collect(spec, out)[0] else len(arms)
        return 1 if any(statuses) or missing else 0
    summary = run_compare(spec, out, shard=args.arm, log=lambda line: print(line, flush=True))
    done, missing = collect(spec, out)
    if args.no_report:
        pass
    elif missing and args.arm is not None:
        print(f"{len(done)} of {len(arms)} arms finished; the report is written when all are "
              f"(or now: soco compare --out {args.out} --report-only)")
    elif done:
        _write_compare_report(spec, out)
    for arm, message in summary.failed:
        print(f"{PROG}: error: arm {arm.index + 1} ({arm.label}) failed: {message}", file=sys.stderr)
    return 1 if summary.failed else 0


# ---------------------------------------------------------------- soco demo


def add_demo(subparsers):
    p = _add(
        subparsers,
        "demo",
        help="run the pipeline on 7 bundled photos (offline) and draw the results",
        description=(
            "Run the whole pipeline on 7 photos bundled with scikit-image (nothing is\n"
            "downloaded): write them to DIR/images, compute proposals into DIR/proposals and\n"
            "draw them into DIR/pictures, draw the training views into DIR/views, run a short\n"
            "tiny-preset pretraining into DIR/run and plot its curves, export the encoder for\n"
            "torchvision (DIR/export), then fine-tune Mask R-CNN v2 from it on shapes painted onto\n"
            "the photos (DIR/labelled) and print COCO AP (DIR/finetune/metrics.json)."
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
    from .demo import DEMO_FINETUNE_ITERS, DEMO_PRETRAIN_STEPS  # a light module (no torch)

    p.add_argument("--pretrain-steps", type=_non_negative_int, default=DEMO_PRETRAIN_STEPS, metavar="N",
                   help=f"tiny pretraining steps (default {DEMO_PRETRAIN_STEPS}; 0 skips pretraining, "
                        "export and fine-tune)")
    p.add_argument("--finetune-iters", type=_non_negative_int, default=DEMO_FINETUNE_ITERS, metavar="N",
                   help=f"Mask R-CNN fine-tune iterations (default {DEMO_FINETUNE_ITERS}; 0 skips the fine-tune)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), workers=args.workers or _default_workers(), pretrain_steps=args.pretrain_steps,
             finetune_iters=args.finetune_iters)
    return 0


# ---------------------------------------------------------------- main

COMMANDS = [add_proposals, add_proposals_merge, add_pretrain, add_show, add_export, add_linear, add_finetune,
            add_knn, add_compare, add_demo]
SHOW_COMMANDS = [add_show_proposals, add_show_views, add_show_curves]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="SoCo object-level self-supervised pretraining for detection, on your own images.",
        epilog=(
            "examples:\n"
            "  soco demo                                   # try everything on bundled photos\n"
            "  soco proposals photos/ -o proposals/\n"
            "  soco show proposals proposals/ --images photos/ -o pictures/\n"
            "  soco pretrain --preset fpn-100ep --images photos/ --proposals proposals/ --out run/\n"
            "  soco export run/ --to torchvision -o soco_r50fpn.pth\n"
            "  soco finetune --weights soco_r50fpn.pth --train-json train.json --train-images imgs/ \\\n"
            "      --val-json val.json --val-images imgs/ --out ft/\n"
            "  soco knn --weights run/ --train-json train.json --train-images imgs/ \\\n"
            "      --val-json val.json --val-images imgs/ --out knn/      # did pretraining help? (cheap)\n"
            "  soco compare --init none --init run/ --train-json ... --seeds 3 --out cmp/\n\n"
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
    except SocoError as exc:  # every error soco reports; anything else is a bug and keeps its traceback
        print(f"{PROG}: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except (FileNotFoundError, NotADirectoryError) as exc:  # a path the user gave
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
