"""``soco finetune``: Mask R-CNN fine-tune and COCO AP. Its flags are generated from
``FinetuneOptions`` (soco_pretrain.config), where every default lives."""

from __future__ import annotations

from .common import (
    Flag,
    add_command,
    add_config_arguments,
    add_option_flags,
    add_renamed,
    add_run_folder_flags,
    add_weights_data_out,
    check_resume,
    checked_coco_paths,
    default_workers,
    parse_sizes,
    resolve_options,
    show_sizes,
)

# Options that change the results (part of a soco compare specification) ...
FINETUNE_RECIPE_FLAGS = [
    Flag(
        "soco_weights",
        "--soco-weights",
        "for a run/checkpoint: the online (as soco export) or target (EMA) encoder (default {default})",
    ),
    Flag("schedule", "--schedule", "1x: 90k iterations at batch 16, 2x: 180k (default {default})"),
    Flag(
        "max_iters",
        "--max-iters",
        "schedule length: train N iterations in all, in place of --schedule (warm-up and lr drops "
        "at 2/3 and 8/9 of N follow it; not an early stop)",
        "N",
    ),
    Flag("batch", "--batch", "total batch over all processes (default {default}, paper)", "N"),
    Flag("lr", "--lr", "peak learning rate (default 0.02 x batch / 16)", "LR"),
    Flag(
        "train_sizes",
        "--train-sizes",
        "training short side(s), one drawn per image: PX, PX,PX,... or LO-HI in "
        "steps of 32 (default {default}, Detectron2)",
        "SIZES",
        parse=parse_sizes,
        show=show_sizes,
    ),
    Flag("max_size", "--max-size", "long-side cap (default {default})", "PX"),
    Flag("test_size", "--test-size", "evaluation short side (default: the largest --train-sizes, 800)", "PX"),
    Flag(
        "roi_batch",
        "--roi-batch",
        "RoIs sampled per training image for the box head (default {default}, Detectron2)",
        "N",
    ),
    Flag(
        "test_proposals",
        "--test-proposals",
        "RPN proposals per image at test time (default {default}, Detectron2)",
        "N",
    ),
    Flag("detections", "--detections", "detections kept per image (default {default}, COCO)", "N"),
    Flag("boxes_only", "--boxes-only", "Faster R-CNN and bbox AP even if the data has masks"),
    Flag(
        "precise_bn",
        "--precise-bn",
        "re-estimate BN statistics over N training batches before evaluating "
        "(default {default}, released config; at most the iterations; 0 = off)",
        "N",
    ),
    Flag("precision", "--precision", "fp32 (as Detectron2) or bf16/fp16 autocast (fp16: CUDA only; default {default})"),
]
# ... and options that only change how it runs (soco compare passes them to every arm).
FINETUNE_RUN_FLAGS = [
    Flag("workers", "--workers", "data-loader processes per device (default {default})", "N"),
    Flag(
        "per_device_batch",
        "--per-device-batch",
        "images per forward pass on each process, gradient accumulation makes up --batch "
        "(default {default}: auto, the largest that fits the memory)",
        "N",
    ),
    Flag("device", "--device", "default: cuda when available"),
    Flag("log_every", "--log-every", "metrics.jsonl period (default {default})", "N"),
    Flag(
        "checkpoint_every",
        "--checkpoint-every",
        "checkpoint period in iterations (default {default}; always one at the end)",
        "N",
    ),
    Flag("progress", "--no-progress", "no progress bars", invert=True),
]
FINETUNE_ONLY_FLAGS = [
    Flag(
        "backbone",
        "--backbone",
        "the detector's ResNet (default: the weights' own; resnet50 for --weights none); refused "
        "when it contradicts the weights",
    ),
    Flag(
        "fraction",
        "--fraction",
        "seeded random fraction of the training images, e.g. 0.05 or 0.10 (default {default:g})",
        "F",
        show=float,
    ),
    Flag("seed", "--seed", "seed of the subset, data order, flips and new heads (default {default})"),
    Flag("eval_every", "--eval-every", "also evaluate every N iterations (default {default}: only at the end)", "N"),
    Flag(
        "eval_only", "--eval-only", "only evaluate: OUT's last checkpoint if any (with --resume auto), else --weights"
    ),
    Flag(
        "resume",
        "--resume",
        "auto: continue from OUT/checkpoints/last.pt if any (default); none: start over; or a checkpoint file",
        "auto|none|PATH",
    ),
]
FINETUNE_FLAGS = FINETUNE_RECIPE_FLAGS + FINETUNE_RUN_FLAGS + FINETUNE_ONLY_FLAGS
# Old spellings of the recipe flags (also in soco compare): a one-line error naming the new one.
FINETUNE_RENAMED = {"--min-size": "--train-sizes"}


def finetune_cli_defaults() -> dict:
    """The command line's own defaults: FinetuneOptions' workers capped at the usable cores."""
    from ..config import FinetuneOptions

    return {"workers": min(FinetuneOptions().workers, default_workers())}


def add_finetune(subparsers):
    from ..config import FINETUNE_PRESETS, FinetuneOptions

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
            "(2x = 180k; both scaled by 16/batch). --fraction takes a seeded random subset of the\n"
            "training images (paper 4.5 Mini COCO). BN layers are trained (SyncBN under torchrun).\n"
            "Rerunning the same command resumes from OUT/checkpoints/last.pt. For a CPU, shrink\n"
            "--train-sizes/--max-size, --batch, --roi-batch, --test-proposals and --detections\n"
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
            "--val-images imgs -o ft/scratch --max-iters 200 --batch 2 --train-sizes 320 --max-size 512 "
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
    from ..config import FINETUNE_PRESETS, FinetuneOptions

    options, _ = resolve_options(
        FinetuneOptions, args, FINETUNE_FLAGS, FINETUNE_PRESETS, cli_defaults=finetune_cli_defaults()
    )
    check_resume(options.resume)
    from ..transfer.finetune import finetune

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
