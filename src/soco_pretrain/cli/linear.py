"""``soco linear``: the linear probe (paper appendix B). Its recipe flags are generated from
``LinearConfig`` (soco_pretrain.config), where every default lives."""

from __future__ import annotations

from pathlib import Path

from ..config import LINEAR_PRESETS, LinearConfig
from .common import (
    add_command,
    add_config_arguments,
    add_max_steps,
    add_option_flags,
    add_renamed,
    add_run_folder_flags,
    add_weights_data_out,
    check_weights,
    option_flags,
    require_dir,
    resolve_options,
)

LINEAR_FLAGS = option_flags(LinearConfig)  # generated from LinearConfig's field metadata (config.py)
# old spellings: a one-line error naming the new one
LINEAR_RENAMED = {"--max-iters": "--max-steps", "--batch": "--batch-size"}


def add_linear(subparsers):
    p = add_command(
        subparsers,
        "linear",
        help="linear probe: a linear classifier on the frozen pretrained ResNet (top-1/top-5)",
        description=(
            "Train a linear classifier on the frozen ResNet of WEIGHTS (its own backbone; ResNet-50\n"
            "for none) as paper appendix B: backbone and BN statistics fixed; SGD lr 30 x batch/256\n"
            "(--base-lr 30 at batch 256; --lr gives the peak rate itself, whatever --batch-size),\n"
            "momentum 0.9, weight decay 0, batch 256, 100 epochs, cosine after a 5-epoch warm-up as\n"
            "the released code; train: random resized crop 224 + flip; test: shorter side 256,\n"
            "centre crop 224. TRAIN and VAL are class folders (ROOT/CLASS/IMAGE, as torchvision\n"
            "ImageFolder) with the same class names. Writes OUT/metrics.json (top1, top5),\n"
            "OUT/metrics.jsonl (per epoch) and OUT/checkpoints/last.pt; rerunning the same command\n"
            "resumes. Unreadable images are skipped and listed in metrics.json. --image-size etc.\n"
            "shrink it for a CPU (--preset cpu). Recipe: the defaults, --preset, --config FILE, the\n"
            "flags, then --set (any LinearConfig field, e.g. crop_scale, weight_decay)."
        ),
        examples=[
            "soco linear --weights runs/c4-100ep --train imagenet/train --val imagenet/val -o runs/c4-linear",
            "soco linear --weights runs/fpn100 --soco-weights target --train imagenet/train --val imagenet/val "
            "--out runs/fpn100-linear-ema",
            "soco linear --weights none --train shapes/train --val shapes/val --out runs/random-linear "
            "--epochs 5 --batch-size 32 --image-size 96   # random-init baseline, CPU-sized",
            "soco linear --preset moco --weights runs/c4-100ep --train imagenet/train --val imagenet/val --out lin/",
        ],
    )
    add_weights_data_out(
        p,
        "RUN|CKPT|none",
        "soco pretrain run folder, checkpoint file, torchvision ResNet / torchvision-export state dict, or none "
        "(random-init ResNet-50)",
        "output folder (metrics, checkpoint)",
        coco=False,
    )
    p.add_argument("--train", required=True, metavar="DIR", help="training class folder (DIR/CLASS/IMAGE)")
    p.add_argument("--val", required=True, metavar="DIR", help="validation class folder, same class names")
    add_config_arguments(p, LINEAR_PRESETS, "linear-probe", "'crop_scale=[0.2, 1]'")
    p.add_argument(
        "--soco-weights",
        default="online",
        choices=("online", "target"),
        help="which SoCo network: online (default; released main_linear.py, BYOL) or target (EMA)",
    )
    add_option_flags(p, LinearConfig, LINEAR_FLAGS)
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    add_max_steps(p, allow_zero=True, then=", then evaluate")
    add_renamed(p, LINEAR_RENAMED)
    p.add_argument(
        "--resume",
        default="auto",
        choices=("auto", "none"),
        help="auto: continue from OUT/checkpoints/last.pt if any (default); none: start over",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_run_folder_flags(p)  # other weights or classes are refused whatever the flag: use another --out
    p.set_defaults(func=cmd_linear)


def cmd_linear(args) -> int:
    require_dir(args.train, "training class folder")
    require_dir(args.val, "validation class folder")
    check_weights(args)
    config, _ = resolve_options(LinearConfig, args, LINEAR_FLAGS, LINEAR_PRESETS)
    from ..transfer.linear import linear_probe  # here, not at the top: soco --help must not import torch

    linear_probe(
        args.weights,
        args.train,
        args.val,
        Path(args.out),
        config,
        soco_weights=args.soco_weights,
        resume=args.resume,
        max_steps=args.max_steps,
        overwrite=args.overwrite,
        accept_changes=args.accept_changes,
        device=args.device,
        progress=not args.no_progress,
    )
    return 0
