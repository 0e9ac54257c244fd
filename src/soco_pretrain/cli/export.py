"""``soco export``: the pretrained encoder as torchvision, Detectron2 or MMDetection weights."""

from __future__ import annotations

from pathlib import Path

from .common import UsageError, add_command, add_out, add_renamed

EXPORT_TARGETS = ("torchvision", "detectron2", "mmdet")  # = transfer.export.TARGETS (no torch import here)


def add_export(subparsers):
    p = add_command(
        subparsers,
        "export",
        help="export pretrained weights for torchvision, Detectron2 or MMDetection, with a key report",
        description=(
            "Write the pretrained encoder of RUN (a soco pretrain run folder: its\n"
            "checkpoints/last.pt; or a checkpoint file) as weights for a Mask R-CNN:\n"
            "  torchvision  state dict for maskrcnn_resnet50_fpn_v2 (C4 runs: resnet50 keys)\n"
            "  detectron2   pickle with Detectron2 v0.6 names + a ready config FILE.yaml\n"
            "  mmdet        {state_dict, meta} with MMDetection v3.3.0 names + a config FILE.py\n"
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
        ],
    )
    p.add_argument("run", metavar="RUN", help="run folder (uses RUN/checkpoints/last.pt) or a checkpoint file")
    p.add_argument(
        "--to",
        required=True,
        choices=EXPORT_TARGETS,
        metavar="TARGET",
        help=f"detector library: {', '.join(EXPORT_TARGETS)}",
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
        raise UsageError(f"{args.run}: no such run folder or checkpoint file")
    if args.config_out is not None and args.to == "torchvision":
        raise UsageError("--config-out is for --to detectron2 or mmdet (torchvision needs no config)")
    from ..transfer.export import export

    report = export(
        args.run,
        args.to,
        weights=args.soco_weights,
        out=Path(args.out),
        config_out=Path(args.config_out) if args.config_out else None,
    )
    print(report.format())
    return 0
