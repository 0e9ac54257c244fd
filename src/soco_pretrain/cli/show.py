"""``soco show proposals|views|curves``: pictures of intermediate results to check by eye."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig, apply_overrides
from .common import (
    Parser,
    UserError,
    add_command,
    add_config_sources,
    add_image_root,
    add_out,
    check_view_inputs,
    missing_subcommand,
    positive_int,
    print_written,
    require_dir,
    require_source,
)


def add_show(subparsers):
    p = add_command(
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
    p.set_defaults(func=lambda args: missing_subcommand(p))
    sub = p.add_subparsers(title="what to show", metavar="WHAT", parser_class=Parser)
    for add in SHOW_COMMANDS:
        add(sub)


def add_show_proposals(subparsers):
    p = add_command(
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
    add_out(p, "DIR", "output directory for the pictures")
    p.add_argument("--num", type=positive_int, default=8, metavar="N", help="images to draw (default 8)")
    p.add_argument("--per-image", type=positive_int, default=10, metavar="K", help="boxes per image (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the sample (default 0)")
    p.set_defaults(func=cmd_show_proposals)


def cmd_show_proposals(args) -> int:
    require_dir(args.store, "proposal store")
    require_source(args.images)
    # here, not at the top: soco --help must not import numba
    from ..proposals import load
    from ..viz import show_proposals

    store = load(args.store)
    written = show_proposals(store, args.images, Path(args.out), num=args.num, per_image=args.per_image, seed=args.seed)
    print_written(args.out, written)
    return 0


def add_show_views(subparsers):
    p = add_command(
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
    p.add_argument(
        "--images",
        metavar="IMAGES",
        required=True,
        help="image folder, list file or COCO-style JSON the proposals were made for",
    )
    p.add_argument(
        "--proposals",
        metavar="STORE",
        default=None,
        help="proposal store directory (needed with the default views.proposal_source=selective_search)",
    )
    add_out(p, "DIR", "output directory for the pictures")
    add_image_root(p)
    p.add_argument("--num", type=positive_int, default=4, metavar="N", help="images to draw (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the images and their views (default 0)")
    p.add_argument("--augment", action="store_true", help="apply the photometric augmentation too")
    add_config_sources(p, None, None, "data config override, e.g. views.soco_star=true (repeatable)")
    p.set_defaults(func=cmd_show_views)


def cmd_show_views(args) -> int:
    check_view_inputs(args)
    config = apply_overrides(DataConfig(seed=args.seed), args.overrides)  # ConfigError: one line, exit 2
    if config.views.proposal_source == "selective_search" and args.proposals is None:
        raise UserError(
            "--proposals STORE is required with views.proposal_source=selective_search (the "
            "default), or --set views.proposal_source=whole_image|random|coco"
        )
    # here, not at the top: soco --help must not import torch
    from ..data.dataset import SoCoDataset
    from ..viz import show_views

    dataset = SoCoDataset(args.images, args.proposals, config, image_root=args.image_root)
    written = show_views(dataset, Path(args.out), num=args.num, seed=args.seed, augment=args.augment)
    print_written(args.out, written)
    return 0


def add_show_curves(subparsers):
    p = add_command(
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
    add_out(p, "DIR", "output directory (default: RUN)", required=False)
    p.set_defaults(func=cmd_show_curves)


def cmd_show_curves(args) -> int:
    run = require_dir(args.run, "run folder")
    if not (run / "metrics.jsonl").is_file():
        raise UserError(f"{args.run}: no metrics.jsonl (not a soco pretrain run folder, or no step logged yet)")
    # here, not at the top: soco --help must not import torch or matplotlib
    from ..engine.metrics import read_metrics
    from ..viz import plot_curves

    records = read_metrics(run)
    if not records:
        raise UserError(f"{run / 'metrics.jsonl'}: no step logged yet")
    written = plot_curves(run, Path(args.out) if args.out else None, records=records)
    print_written(args.out or args.run, written)
    return 0


SHOW_COMMANDS = [add_show_proposals, add_show_views, add_show_curves]
