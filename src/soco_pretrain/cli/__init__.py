"""The ``soco`` command line.

Plain argparse, one module per command: ``add_<command>(subparsers)`` builds its parser and
``cmd_<command>(args) -> int`` runs it. Heavy modules (numpy, numba, torch, matplotlib) are
imported inside the command functions so ``soco --help`` stays fast.

Adding a command: write ``add_x`` + ``cmd_x`` in a module here and list ``add_x`` in ``COMMANDS``
(or, for ``soco show x``, in show.SHOW_COMMANDS). Options that come from a config dataclass
(soco_pretrain.config) get ``--preset``, ``--config FILE``, ``--set KEY=VALUE`` and flags
generated from its fields (common.add_option_flags), so a default is written only there.

Errors the user can fix (missing folder, bad shard, unknown preset, bad config value) are
printed as one line ``soco: error: ...`` with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import SocoError, UserError
from .common import PROG, Formatter, Parser, parse_shard, parse_sizes
from .compare import FINETUNE_RECIPE_DEFAULTS, KNN_DEFAULTS, _compare_spec, add_compare, cmd_compare, parse_fractions
from .demo import add_demo, cmd_demo
from .doctor import add_doctor, cmd_doctor
from .export import EXPORT_TARGETS, add_export, cmd_export
from .finetune import add_finetune, cmd_finetune
from .knn import add_knn, cmd_knn
from .linear import add_linear, cmd_linear
from .notices import show_notices
from .pretrain import PRETRAIN_PRESETS, add_config, add_pretrain, cmd_config_show, cmd_pretrain
from .proposals import add_proposals, add_proposals_merge, cmd_proposals, cmd_proposals_merge
from .show import SHOW_COMMANDS, add_show, cmd_show_curves, cmd_show_proposals, cmd_show_views

# Re-exported: the commands (main() dispatches through these names) and what callers import.
__all__ = [
    "main",
    "build_parser",
    "parse_shard",
    "parse_sizes",
    "parse_fractions",
    "PRETRAIN_PRESETS",
    "EXPORT_TARGETS",
    "FINETUNE_RECIPE_DEFAULTS",
    "KNN_DEFAULTS",
    "SHOW_COMMANDS",
    "UserError",
    "_compare_spec",
    "cmd_compare",
    "cmd_config_show",
    "cmd_demo",
    "cmd_doctor",
    "cmd_export",
    "cmd_finetune",
    "cmd_knn",
    "cmd_linear",
    "cmd_pretrain",
    "cmd_proposals",
    "cmd_proposals_merge",
    "cmd_show_curves",
    "cmd_show_proposals",
    "cmd_show_views",
]

COMMANDS = [
    add_proposals,
    add_proposals_merge,
    add_pretrain,
    add_doctor,
    add_config,
    add_show,
    add_export,
    add_linear,
    add_finetune,
    add_knn,
    add_compare,
    add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="SoCo object-level self-supervised pretraining for detection, on your own images.",
        epilog=(
            "examples:\n"
            "  soco demo                                   # try everything on bundled photos\n"
            "  soco proposals photos/ -o proposals/\n"
            "  soco show proposals proposals/ --images photos/ -o pictures/\n"
            "  soco doctor --preset fpn-100ep --images photos/ --proposals proposals/ --out run/  # check, price\n"
            "  soco pretrain --preset fpn-100ep --images photos/ --proposals proposals/ --out run/\n"
            "  soco config show --preset tiny --set train.epochs=3   # every key, value and source\n"
            "  soco export run/ --to torchvision -o soco_r50fpn.pth\n"
            "  soco finetune --weights soco_r50fpn.pth --train-json train.json --train-images imgs/ \\\n"
            "      --val-json val.json --val-images imgs/ --out ft/\n"
            "  soco knn --weights run/ --train-json train.json --train-images imgs/ \\\n"
            "      --val-json val.json --val-images imgs/ --out knn/      # did pretraining help? (cheap)\n"
            "  soco compare --init none --init run/ --train-json ... --seeds 3 --out cmp/\n\n"
            "Run 'soco COMMAND --help' for a command's options."
        ),
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def _rewrite(argv: list[str]) -> list[str]:
    """``proposals merge ...`` -> ``proposals-merge ...`` (merge beside ``proposals IMAGES``).

    A folder literally named "merge" can still be given as ``./merge``.
    """
    if len(argv) >= 2 and argv[0] == "proposals" and argv[1] == "merge":
        return ["proposals-merge", *argv[2:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``soco`` console script; returns the exit status."""
    argv = _rewrite(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    # A command is looked up here by name, so that replacing ``soco_pretrain.cli.cmd_x`` (as tests
    # do) replaces what runs.
    func = globals().get(getattr(args.func, "__name__", ""), args.func)
    show_notices()
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except SocoError as exc:  # every error soco reports; anything else is a bug and keeps its traceback
        print(f"{PROG}: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
