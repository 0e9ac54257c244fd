"""``soco finetune``: Mask R-CNN fine-tune and COCO AP. Its flags are generated from
``FinetuneOptions`` (soco_pretrain.config), where every default lives."""

from __future__ import annotations

from ..config import FINETUNE_PRESETS, FinetuneOptions
from .common import (
    add_command,
    add_config_arguments,
    add_option_flags,
    add_renamed,
    add_run_folder_flags,
    add_weights_data_out,
    check_resume,
    checked_coco_paths,
    default_workers,
    option_flags,
    resolve_options,
)

# Every flag is generated from FinetuneOptions' field metadata (config.py): the options that
# change the results ("recipe") and those that only change how it runs ("run").
FINETUNE_FLAGS = option_flags(FinetuneOptions)
# Old spellings (also in soco compare): a one-line error naming the new one.
FINETUNE_RENAMED = {"--min-size": "--train-sizes", "--batch": "--batch-size"}


def finetune_cli_defaults() -> dict:
    """The command line's own defaults: FinetuneOptions' workers capped at the usable cores."""
    return {"workers": min(FinetuneOptions().workers, default_workers())}


def add_finetune(subparsers):
    p = add_command(
        subparsers,
        "finetune",
        help="fine-tune Mask R-CNN (torchvision v2, R50-FPN or the weights' backbone) and report COCO AP",
        description=(
            "Fine-tune torchvision's Mask R-CNN v2 (ResNet-FPN, 4conv1fc BN box head; Faster R-CNN when\n"
            "the training JSON has no masks, or with --boxes-only) on a COCO-format set, then evaluate\n"
            "bbox (and segm) AP with pycocotools into OUT/metrics.json. Recipe of paper 4.2: SGD\n"
            "momentum 0.9, lr 0.02 at batch 16 scaled linearly, linear warm-up 1000 iterations, x0.1\n"
            "after 2/3 and 8/9 of training, weight decay 2.5e-5; 1x = 90k iterations at batch 16\n"
            "(2x = 180k; both scaled by 16/batch). --lr is the peak rate itself, --base-lr the rate at\n"
            "batch 16 (scaled by --batch-size / 16). --fraction takes a seeded random subset of the\n"
            "training images (paper 4.5 Mini COCO). BN layers are trained (SyncBN under torchrun).\n"
            "Rerunning the same command resumes from OUT/checkpoints/last.pt. For a CPU, shrink\n"
            "--train-sizes/--max-size, --batch-size, --roi-batch, --test-proposals and --detections\n"
            "(--preset cpu). The ResNet is the weights' own (R50 for --weights none; --backbone).\n"
            "Options: the defaults, --preset, --config FILE, the flags, then --set\n"
            "(any FinetuneOptions field, e.g. weight_decay, warmup_iters, rpn_train_proposals)."
        ),
        examples=[
            "soco export runs/fpn100 --to torchvision -o soco.pth && soco finetune --weights soco.pth "
            "--train-json coco/annotations/instances_train2017.json --train-images coco/train2017 "
            "--val-json coco/annotations/instances_val2017.json --val-images coco/val2017 --out ft/soco-1x",
            "torchrun --nproc-per-node 8 -m soco_pretrain finetune --weights runs/fpn100 --fraction 0.05 "
            "--train-json ... --train-images ... --val-json ... --val-images ... --out ft/mini5",
            "soco finetune --weights none --train-json t.json --train-images imgs --val-json v.json "
            "--val-images imgs -o ft/scratch --max-iters 200 --batch-size 2 --train-sizes 320 --max-size 512 "
            "--roi-batch 128   # CPU-sized",
            "soco finetune --preset cpu --set weight_decay=1e-4 --weights none ... --out ft/wd",
        ],
    )
    add_weights_data_out(
        p,
        "FILE|RUN|none",
        "torchvision state dict (soco export --to torchvision), soco pretrain run folder or "
        "checkpoint, or none (random init baseline)",
        "output folder (metrics, checkpoints)",
    )
    add_config_arguments(p, FINETUNE_PRESETS, "fine-tune", "weight_decay=1e-4")
    add_option_flags(p, FinetuneOptions, FINETUNE_FLAGS, cli_defaults=finetune_cli_defaults())
    add_renamed(p, FINETUNE_RENAMED)
    add_run_folder_flags(p)
    p.add_argument(
        "--allow-leak",
        action="store_true",
        help="fine-tune even if val images are in the pretraining data manifest of --weights (byte-identical files)",
    )
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    paths = checked_coco_paths(args)
    options, _ = resolve_options(
        FinetuneOptions, args, FINETUNE_FLAGS, FINETUNE_PRESETS, cli_defaults=finetune_cli_defaults()
    )
    check_resume(options.resume)
    from ..transfer.finetune import finetune  # here, not at the top: soco --help must not import torch

    weights = None if args.weights.lower() == "none" else args.weights
    finetune(
        weights,
        *paths,
        options,
        overwrite=args.overwrite,
        accept_changes=args.accept_changes,
        allow_leak=args.allow_leak,
    )
    return 0
