"""``soco demo``: the whole pipeline on 7 bundled photos, offline."""

from __future__ import annotations

from pathlib import Path

from ..demo import DEMO_FINETUNE_ITERS, DEMO_PRETRAIN_STEPS, run_demo  # a light module (no torch)
from .common import add_command, add_out, add_workers, default_workers, non_negative_int


def add_demo(subparsers):
    p = add_command(
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
    add_out(p, "DIR", "output directory (default ./soco-demo)", required=False, default="soco-demo")
    add_workers(p)
    p.add_argument(
        "--pretrain-steps",
        type=non_negative_int,
        default=DEMO_PRETRAIN_STEPS,
        metavar="N",
        help=f"tiny pretraining steps (default {DEMO_PRETRAIN_STEPS}; 0 skips pretraining, export and fine-tune)",
    )
    p.add_argument(
        "--finetune-iters",
        type=non_negative_int,
        default=DEMO_FINETUNE_ITERS,
        metavar="N",
        help=f"Mask R-CNN fine-tune iterations (default {DEMO_FINETUNE_ITERS}; 0 skips the fine-tune)",
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    run_demo(
        Path(args.out),
        workers=args.workers or default_workers(),
        pretrain_steps=args.pretrain_steps,
        finetune_iters=args.finetune_iters,
    )
    return 0
