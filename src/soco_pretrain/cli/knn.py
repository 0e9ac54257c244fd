"""``soco knn``: object-level kNN accuracy of pretrained weights. Its flags are generated from
``KnnOptions`` (soco_pretrain.config), where every default lives."""

from __future__ import annotations

from ..config import KNN_PRESETS, KnnOptions
from .common import (
    add_command,
    add_config_arguments,
    add_option_flags,
    add_renamed,
    add_weights_data_out,
    checked_coco_paths,
    default_workers,
    option_flags,
    resolve_options,
)

# Generated from KnnOptions' field metadata (config.py): the protocol ("recipe", also soco compare
# --metric knn's options) and how it runs.
KNN_FLAGS = option_flags(KnnOptions)
KNN_RENAMED = {"--batch": "--batch-size"}  # old spelling: a one-line error naming the new one


def knn_cli_defaults() -> dict:
    # The command line decodes with up to 4 processes, as soco finetune (the API's default is 2).
    return {"workers": min(4, default_workers())}


def add_knn(subparsers):
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
    add_renamed(p, KNN_RENAMED)
    p.set_defaults(func=cmd_knn)


def cmd_knn(args) -> int:
    paths = checked_coco_paths(args)
    options, _ = resolve_options(KnnOptions, args, KNN_FLAGS, KNN_PRESETS, cli_defaults=knn_cli_defaults())
    from ..evaluate.knn import knn_eval  # here, not at the top: soco --help must not import torch

    knn_eval(args.weights, *paths, options)
    return 0
