"""``soco export``: the pretrained encoder as torchvision, Detectron2, MMDetection or safetensors
weights, or the ResNet alone (torchvision / timm)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .common import add_command, add_out, add_renamed

# = transfer.export.TARGETS (no torch import here); timm is an alias of torchvision-backbone
EXPORT_TARGETS = ("torchvision", "detectron2", "mmdet", "safetensors", "torchvision-backbone", "timm")
CONFIG_TARGETS = ("detectron2", "mmdet")  # the targets that write a fine-tune config


def add_export(subparsers):
    p = add_command(
        subparsers,
        "export",
        help="export pretrained weights (torchvision, Detectron2, MMDetection, safetensors, timm) with a key report",
        description=(
            "Write the pretrained encoder of RUN (a soco pretrain run folder: its\n"
            "checkpoints/last.pt; or a checkpoint file) as weights for a Mask R-CNN or a ResNet:\n"
            "  torchvision  state dict with Mask R-CNN v2 names (maskrcnn_resnet50_fpn_v2 for R50;\n"
            "               other backbones: build_detector); C4 runs: the torchvision ResNet keys\n"
            "  detectron2   pickle with Detectron2 v0.6 names + a ready config FILE.yaml\n"
            "  mmdet        {state_dict, meta} with MMDetection v3.3.0 names + a config FILE.py\n"
            "  safetensors  the torchvision export as safetensors: same names, the run (arch,\n"
            "               backbone, step, config, recipe, data manifest, licence) in its\n"
            "               metadata, + a model card NAME.MODEL_CARD.md\n"
            "  torchvision-backbone, timm (the same file)\n"
            "               the ResNet alone: torchvision.models.<backbone> keys, which timm's\n"
            "               ResNets share (load with strict=False: only fc missing)\n"
            "The projector and predictor are never exported (paper 4.2). --soco-weights online\n"
            "(default, as BYOL and the released SoCo converters) or target (the EMA network). Prints\n"
            "which keys were loaded, which the detector must initialise (missing) and which were\n"
            "left (unused)."
        ),
        examples=[
            "soco export runs/fpn100 --to torchvision -o soco_r50fpn.pth",
            "soco export runs/fpn100 --to detectron2 -o soco_r50fpn.pkl   # + soco_r50fpn.yaml",
            "soco export runs/fpn100/checkpoints/step_00005000.pt --to mmdet -o soco_mmdet.pth",
            "soco export runs/c4-100ep --to torchvision --soco-weights target -o soco_r50_c4.pth",
            "soco export runs/fpn100 --to safetensors -o soco_r50.safetensors   # + soco_r50.MODEL_CARD.md",
            "soco export runs/fpn100 --to timm -o soco_r50_backbone.pth",
        ],
    )
    p.add_argument("run", metavar="RUN", help="run folder (uses RUN/checkpoints/last.pt) or a checkpoint file")
    p.add_argument(
        "--to",
        required=True,
        choices=EXPORT_TARGETS,
        metavar="TARGET",
        help=f"target: {', '.join(EXPORT_TARGETS)}",
    )
    p.add_argument(
        "--soco-weights",
        choices=("online", "target"),
        default="online",
        help="which SoCo network: online (default) or target (EMA)",
    )
    add_renamed(p, {"--weights": "--soco-weights"})
    add_out(p, "FILE", "output weights file")
    p.add_argument(
        "--config-out",
        metavar="FILE",
        default=None,
        help="where to write the fine-tune config (detectron2: default FILE.yaml; mmdet: FILE.py)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    if not Path(args.run).exists():
        raise UserError(f"{args.run}: no such run folder or checkpoint file")
    if args.config_out is not None and args.to not in CONFIG_TARGETS:
        raise UserError(f"--config-out is for --to detectron2 or mmdet ({args.to} needs no config)")
    from ..transfer.export import export  # here, not at the top: soco --help must not import torch

    report = export(
        args.run,
        args.to,
        weights=args.soco_weights,
        out=Path(args.out),
        config_out=Path(args.config_out) if args.config_out else None,
    )
    print(report.format())
    return 0
