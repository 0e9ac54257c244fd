"""``soco doctor``: the preflight of ``soco pretrain`` (same config flags, --images, --proposals,
--out; torchrun's variables): checks and the plan with an ETA, without training."""

from __future__ import annotations

import sys

from .common import UserError, add_command, add_image_root, add_out, check_view_inputs, positive_int
from .pretrain import _add_config_sources, pretrain_config


def add_doctor(subparsers):
    p = add_command(
        subparsers,
        "doctor",
        help="check and price a soco pretrain run before starting it (no training)",
        usage="soco doctor (--preset NAME | --config FILE) --images IMAGES -o RUN [options]",
        description=(
            "Check what soco pretrain with the same arguments needs, without training: torch,\n"
            "torchvision, CUDA and NCCL versions, every device and its memory, a sample of the\n"
            "images (decoded) and their entries in the proposal store, the disk space at RUN for\n"
            "the planned checkpoints and the per-device batch; then the plan (steps, images\n"
            "seen) and an ETA from the project's measured throughputs ('unknown card' where\n"
            "none was measured). Under torchrun each rank checks its own share of the sample\n"
            "and rank 0 reports them. One line per check (ok, note or problem); exit status 2\n"
            "when a problem blocks the run, each said in one line on stderr."
        ),
        examples=[
            "soco doctor --preset cpu-small --images photos/ --proposals proposals/ --out runs/small",
            "torchrun --nproc-per-node 8 -m soco_pretrain doctor --preset fpn-400ep --images imagenet/train "
            "--proposals props/ --out runs/fpn400",
        ],
    )
    _add_config_sources(p, preset_required=True)
    p.add_argument("--images", metavar="IMAGES", required=True, help="image folder, list file or COCO-style JSON")
    p.add_argument("--proposals", metavar="STORE", default=None, help="proposal store directory (as soco pretrain)")
    add_out(p, "RUN", "the run directory soco pretrain would write (its disk space is checked; nothing is written)")
    add_image_root(p)
    p.add_argument(
        "--sample",
        type=positive_int,
        default=32,
        metavar="N",
        help="images decoded, spread over the list and split over the ranks (default: 32)",
    )
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    if args.preset is None and args.config is None:
        raise UserError("give --preset NAME or --config FILE (or both: the file is read over the preset)")
    check_view_inputs(args)
    config, _ = pretrain_config(args)
    from ..train.doctor import diagnose  # here, not at the top: soco --help must not import torch

    report = diagnose(config, args.images, args.proposals, args.out, image_root=args.image_root, sample=args.sample)
    if report.checks:  # rank 0 (the others' report is empty)
        print(report.text(), flush=True)
        for problem in report.problems:
            print(f"soco doctor: problem: {problem.name}: {problem.detail}", file=sys.stderr)
    return report.exit_code
