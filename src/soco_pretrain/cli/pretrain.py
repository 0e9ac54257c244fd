"""``soco pretrain`` and ``soco config show``: the pretraining config (preset < --config FILE <
flags < --set) and the training run."""

from __future__ import annotations

from pathlib import Path

from ..config import PretrainConfig, format_sources, load_file, resolve
from ..runfolder import holds_checkpoints
from .common import (
    Parser,
    UserError,
    add_command,
    add_config_sources,
    add_image_root,
    add_max_steps,
    add_out,
    add_run_folder_flags,
    check_resume,
    check_view_inputs,
    missing_subcommand,
    non_negative_int,
)

# Kept in step with soco_pretrain.presets.PRESETS (a test checks); listed here so that
# `soco --help` imports nothing.
PRETRAIN_PRESETS = (
    "fpn-100ep", "fpn-400ep", "fpn-star-400ep", "c4-100ep", "c4-400ep", "tiny", "cpu-small",
    "fpn-head-warm", "fpn-warm",
)  # fmt: skip


def _add_config_sources(p, preset_required: bool) -> None:
    """--preset, --config FILE and --set of the pretraining config."""
    add_config_sources(
        p,
        f"training preset: {', '.join(PRETRAIN_PRESETS)}"
        + (" (this or --config is required)" if preset_required else " (default: none, the defaults)"),
        "YAML config read over the preset (e.g. a run's RUN/config.yaml; keys as in it)",
        "config override, e.g. train.epochs=200 or data.views.num_proposals=8 (repeatable; applied last)",
        choices=PRETRAIN_PRESETS,
    )


def pretrain_config(args, flags: list[tuple[str, dict]] = ()):
    """(PretrainConfig, sources): the defaults < --preset < --config FILE < ``flags`` < --set.
    ``flags``: (label, nested mapping) of options with their own flag (--workers, --compile)."""
    layers = []
    if args.preset is not None:
        # here, not at the top: soco --help must not import yaml (presets imports it too)
        import yaml

        from ..presets import preset_text

        layers.append((f"preset {args.preset}", yaml.safe_load(preset_text(args.preset)) or {}))
    if args.config:
        layers.append((f"file {args.config}", load_file(args.config)))
    layers += list(flags)
    layers.append(("--set", list(args.overrides)))
    return resolve(PretrainConfig, layers)


def add_pretrain(subparsers):
    p = add_command(
        subparsers,
        "pretrain",
        help="SoCo pretraining from a preset (one CPU/GPU, or torchrun/srun for many)",
        usage="soco pretrain (--preset NAME | --config FILE) --images IMAGES -o RUN [options]",
        description=(
            "Pretrain SoCo (paper section 4.1) on IMAGES with their proposal store into RUN:\n"
            "RUN/config.yaml (the resolved config), RUN/metrics.jsonl, RUN/checkpoints/last.pt\n"
            "(+ numbered ones). Presets: fpn-100ep, fpn-400ep, fpn-star-400ep (SoCo*, 4 views),\n"
            "c4-100ep, c4-400ep (total batch 2048 = train.per_device_batch x processes x\n"
            "accumulation steps), and tiny (minutes on 2 CPU cores). The config is the defaults,\n"
            "then the preset, then --config FILE (e.g. another run's RUN/config.yaml), then\n"
            "--workers/--compile, then --set (any key: data.*, model.*, train.*, monitor.*);\n"
            "--print-config shows every key with its value and where it came from. Rerunning\n"
            "the same command resumes from the last checkpoint. For several GPUs or nodes launch\n"
            "it with torchrun or srun (DDP + SyncBN; only rank 0 logs and saves)."
        ),
        examples=[
            "soco pretrain --preset tiny --images photos/ --proposals proposals/ --out runs/tiny",
            "soco pretrain --preset fpn-100ep --images imagenet/train --proposals props/ --out runs/fpn100 "
            "--set train.per_device_batch=128",
            "torchrun --nproc-per-node 8 -m soco_pretrain pretrain --preset fpn-400ep --images imagenet/train "
            "--proposals props/ --out runs/fpn400",
            "soco pretrain --preset tiny --images photos/ --proposals proposals/ --out runs/t --max-steps 20 "
            "--set train.precision=bf16",
            "soco pretrain --preset fpn-100ep --images imagenet/train --out runs/random "
            "--set data.views.proposal_source=random --set data.views.num_proposals=1   # Table 5c, no store",
            "soco pretrain --config runs/tiny/config.yaml --set train.epochs=100 --print-config",
            "soco pretrain --preset fpn-head-warm --init resnet50_imagenet.pth --images photos/ --proposals props/ "
            "--out runs/warm   # frozen supervised backbone, FPN + head pretrained",
        ],
    )
    _add_config_sources(p, preset_required=True)
    p.add_argument(
        "--images",
        metavar="IMAGES",
        default=None,
        help="image folder, list file or COCO-style JSON the proposals were made for (required)",
    )
    p.add_argument(
        "--proposals",
        metavar="STORE",
        default=None,
        help="proposal store directory (needed unless data.views.proposal_source is whole_image, random or coco)",
    )
    add_out(p, "RUN", "run directory (config, metrics, checkpoints; required)", required=False)
    add_max_steps(p)
    p.add_argument(
        "--resume",
        default="auto",
        metavar="auto|none|PATH",
        help="auto: continue from RUN's last checkpoint if any (default); none: start at step 0; or a checkpoint file",
    )
    add_run_folder_flags(p)
    add_image_root(p)
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="data-loader processes per device (sets train.workers)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (sets train.compile=true)")
    p.add_argument(
        "--init",
        metavar="FILE",
        default=None,
        help="warm start: weights loaded before step 0 (torchvision ResNet or detection state dict, "
        "safetensors, Detectron2 .pkl, MMDetection, soco run/export; sets model.init)",
    )
    p.add_argument(
        "--init-partial",
        action="store_true",
        help="load what matches of an --init file whose backbone does not match completely (sets model.init_partial)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (every key, its value and its source) and exit",
    )
    p.set_defaults(func=cmd_pretrain)


# Presets whose recipe starts from trained weights (--init); without them they would train a
# random network with a warm start's lr and schedule.
WARM_PRESETS = ("fpn-warm", "fpn-head-warm")


def cmd_pretrain(args) -> int:
    if args.preset is None and args.config is None:
        raise UserError("give --preset NAME or --config FILE (or both: the file is read over the preset)")
    flags = []
    if args.workers is not None:
        flags.append(("--workers", {"train": {"workers": args.workers}}))
    if args.compile:
        flags.append(("--compile", {"train": {"compile": True}}))
    if args.init is not None:
        if not Path(args.init).exists():
            # a rerun of the command that started the run, after its init file moved
            resumes = args.out is not None and args.resume != "none" and holds_checkpoints(args.out)
            hint = f" (resuming {args.out} needs no --init: the checkpoint holds the weights)" if resumes else ""
            raise UserError(f"--init {args.init}: no such file or run folder{hint}")
        flags.append(("--init", {"model": {"init": str(Path(args.init).resolve())}}))
    if args.init_partial:
        flags.append(("--init-partial", {"model": {"init_partial": True}}))
    if args.print_config:
        print(format_sources(*pretrain_config(args, flags)))
        return 0
    missing = [flag for flag, value in (("--images", args.images), ("--out", args.out)) if value is None]
    if missing:
        raise UserError(f"the following arguments are required: {', '.join(missing)}")
    check_view_inputs(args)
    check_resume(args.resume)
    config, _ = pretrain_config(args, flags)
    if args.preset in WARM_PRESETS and not config.model.init:
        raise UserError(
            f"--preset {args.preset} is a warm start (its lr and schedule assume trained weights): give --init FILE "
            "(e.g. a supervised torchvision ResNet state dict), or --preset fpn-100ep to train from scratch"
        )
    source = config.data.views.proposal_source
    if source == "selective_search" and args.proposals is None:
        raise UserError(
            "--proposals STORE is required with data.views.proposal_source=selective_search "
            "(the default; make one with soco proposals), or set data.views.proposal_source="
            "whole_image, random or coco"
        )
    if source == "coco" and config.data.views.proposal_json and not Path(config.data.views.proposal_json).is_file():
        raise UserError(f"data.views.proposal_json={config.data.views.proposal_json}: no such file")
    from ..train.loop import pretrain  # here, not at the top: soco --help must not import torch

    hooks = []
    if config.monitor.json:  # the learning curve (evaluate/monitor.py)
        from ..evaluate.monitor import monitor_hook

        hooks.append(monitor_hook)
    pretrain(
        config,
        args.images,
        args.proposals,
        Path(args.out),
        max_steps=args.max_steps,
        resume=args.resume,
        image_root=args.image_root,
        overwrite=args.overwrite,
        accept_changes=args.accept_changes,
        hooks=hooks,
    )
    return 0


# ---------------------------------------------------------------- soco config show


def add_config(subparsers):
    p = add_command(
        subparsers,
        "config",
        help="show the resolved pretraining config: every key, its value and its source",
        description="Inspect the pretraining config that soco pretrain would use.",
        examples=[
            "soco config show --preset tiny",
            "soco config show --preset fpn-100ep --set train.epochs=200 --config my.yaml",
        ],
    )
    p.set_defaults(func=lambda args: missing_subcommand(p))
    sub = p.add_subparsers(title="what to do", metavar="WHAT", parser_class=Parser)
    show = add_command(
        sub,
        "show",
        help="print every key of the pretraining config with its value and source",
        description=(
            "Print the pretraining config resolved as soco pretrain resolves it (the defaults <\n"
            "--preset < --config FILE < --set): one line per key, 'key: value  # source', the\n"
            "source being default, preset NAME, file FILE or --set. Same as soco pretrain ...\n"
            "--print-config."
        ),
        examples=[
            "soco config show --preset tiny",
            "soco config show --preset fpn-100ep --set train.epochs=200",
            "soco config show --config runs/tiny/config.yaml",
        ],
    )
    _add_config_sources(show, preset_required=False)
    show.set_defaults(func=cmd_config_show)


def cmd_config_show(args) -> int:
    print(format_sources(*pretrain_config(args)))
    return 0
