"""``soco knn``: object-level kNN accuracy of pretrained weights. Its flags are generated from
``KnnOptions`` (soco_pretrain.config), where every default lives."""

from __future__ import annotations

from .common import (
    Flag,
    add_command,
    add_config_arguments,
    add_option_flags,
    add_weights_data_out,
    checked_coco_paths,
    default_workers,
    resolve_options,
)

# The kNN protocol (also soco compare --metric knn's options) ...
KNN_PROTOCOL_FLAGS = [
    Flag("k", "--k", "neighbours (default {default})", "K"),
    Flag("temperature", "--temperature", "vote weight exp(cos/T) (default {default})", "T"),
    Flag(
        "size",
        "--size",
        "square input size (default: the run's data.views.v1_size, else 224; soco compare: "
        "the first run's, for every init)",
        "PX",
    ),
    Flag(
        "min_box",
        "--min-box",
        "leave out boxes narrower or lower than this in the original image (default {default:g})",
        "PX",
        show=float,
    ),
    Flag(
        "objects",
        "--objects",
        "roi: each box RoIAligned from the whole resized image (the detector's view); crop: each box cut "
        "from its photo with --context, squared, resized to --size (default {default})",
    ),
    Flag(
        "features",
        "--features",
        "comma list, the first primary: c5 / c4 (pooled ResNet stage, crop only), head (detector path) "
        "(default: crop c5,head; roi head)",
        "LIST",
        parse=lambda text: tuple(part.strip() for part in text.split(",") if part.strip()),
    ),
    Flag("context", "--context", "crop side = box's longer side x this (default {default:g})", "F", show=float),
    Flag(
        "min_instances",
        "--min-instances",
        "leave out classes with fewer train objects, counted and listed (default {default}: keep all)",
        "N",
    ),
    Flag(
        "bn",
        "--bn",
        "precise: BatchNorm statistics re-estimated on the kNN train images; running: the "
        "weights' own (default {default})",
    ),
]
# ... and the rest of soco knn's options.
KNN_RUN_FLAGS = [
    Flag(
        "soco_weights", "--soco-weights", "for a run/checkpoint: the online or target (EMA) encoder (default {default})"
    ),
    Flag(
        "train_fraction",
        "--fraction",
        "seeded random fraction of the train images used as neighbours (default {default:g})",
        "F",
        show=float,
    ),
    Flag("seed", "--seed", "seed of random init and of --fraction (default {default})"),
    Flag("batch", "--batch", "images per forward pass (default {default})", "N"),
    Flag("workers", "--workers", "image-decoding processes (default {default})", "N"),
    Flag("device", "--device", "default: cuda when available"),
    Flag("allow_leak", "--allow-leak", "evaluate even if val images were in the pretraining set"),
    Flag("progress", "--no-progress", "no progress bars", invert=True),
]
KNN_FLAGS = KNN_PROTOCOL_FLAGS + KNN_RUN_FLAGS


def knn_cli_defaults() -> dict:
    # The command line decodes with up to 4 processes, as soco finetune (the API's default is 2).
    return {"workers": min(4, default_workers())}


def add_knn(subparsers):
    from ..config import KNN_PRESETS, KnnOptions

    p = add_command(
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
            "in the pretraining run's data manifest (byte-identical files) unless --allow-leak.\n"
            "Options: the defaults, --preset, --config FILE, the flags, then --set (any KnnOptions\n"
            "field, e.g. precise_images, level_bounds)."
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
    add_weights_data_out(
        p,
        "RUN|FILE|none",
        "soco pretrain run folder or checkpoint, a torchvision state dict (soco export, "
        "Mask R-CNN v2 or ResNet keys, any backbone), or none (random init, seeded by --seed)",
        "output folder (knn.json)",
    )
    add_config_arguments(p, KNN_PRESETS, "kNN", "precise_images=500")
    add_option_flags(p, KnnOptions, KNN_FLAGS, cli_defaults=knn_cli_defaults())
    p.set_defaults(func=cmd_knn)


def cmd_knn(args) -> int:
    paths = checked_coco_paths(args)
    from ..config import KNN_PRESETS, KnnOptions

    options, _ = resolve_options(KnnOptions, args, KNN_FLAGS, KNN_PRESETS, cli_defaults=knn_cli_defaults())
    from ..evaluate.knn import knn_eval

    knn_eval(args.weights, *paths, options)
    return 0
