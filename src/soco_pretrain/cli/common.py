"""What every ``soco`` command shares: the one-line-error parser, argument types, path checks and
the config options (``--preset``, ``--config FILE``, ``--set KEY=VALUE`` and flags generated from
an options dataclass of soco_pretrain.config, so a default is written only there).

Nothing here imports numpy, torch or the like: ``soco --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..runfolder import default_workers

PROG = "soco"


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line ``soco: error: ...`` (exit 2)."""

    def error(self, message):  # noqa: D401 - argparse API
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps description line breaks; lines subcommand help up past the longest name."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)

    def add_argument(self, action):
        super().add_argument(action)
        # argparse forgets the extra indent of subcommand names when measuring them,
        # which pushes a long name's help onto the next line.
        listed = [sub.dest for sub in self._iter_indented_subactions(action)]
        if action.nargs == argparse.PARSER and listed:
            longest = max(map(len, listed)) + self._current_indent + 4
            self._action_max_length = max(self._action_max_length, longest)


def add_command(subparsers, name, *, help, description, examples, prog=None, usage=None):
    """Add a subcommand parser whose --help ends with an "examples:" block."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    kwargs = {"help": help} if help else {}
    return subparsers.add_parser(
        name,
        description=description,
        epilog=epilog,
        formatter_class=Formatter,
        prog=prog,
        usage=usage,
        **kwargs,
    )


def missing_subcommand(parser) -> int:
    parser.print_help(sys.stderr)
    return 2


# ---------------------------------------------------------------- argument types


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/N"`` into ``(i, N)`` with ``0 <= i < N``."""
    parts = text.split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        i, n = int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad shard {text!r}: expected i/N, e.g. 0/4 for the first of 4 shards"
        ) from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"bad shard {text!r}: need 0 <= i < N (shards are numbered 0 to N-1)")
    return i, n


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def parse_sizes(text: str) -> tuple[int, ...]:
    """Short sides: ``"800"``, ``"640,672,704"`` or ``"640-800"`` (every 32 px, Detectron2's list)."""
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-"))
            if lo > hi:
                raise ValueError
            sizes = tuple(range(lo, hi + 1, 32)) + (() if (hi - lo) % 32 == 0 else (hi,))
        else:
            sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad sizes {text!r}: expected PX, PX,PX,... or LO-HI (e.g. 640-800)"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"bad sizes {text!r}: sizes must be positive")
    return sizes


def show_sizes(sizes) -> str:
    """(640, 672, ..., 800) -> "640-800" (the LO-HI form of parse_sizes), else "PX,PX,..."."""
    sizes = tuple(sizes)
    if len(sizes) > 2 and sizes == tuple(range(sizes[0], sizes[-1] + 1, 32)):
        return f"{sizes[0]}-{sizes[-1]}"
    return ",".join(map(str, sizes))


# ---------------------------------------------------------------- paths


def require_source(path: str, what: str = "images") -> Path:
    """A folder or list file that must exist (checked before any heavy import)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such {what} folder or list file")
    return p


def require_dir(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{path}: no such {what} (expected a directory)")
    return p


def print_written(out, written) -> None:
    print(f"wrote {len(written)} files to {out}")
    for path in written:
        print(f"  {path}")


# ---------------------------------------------------------------- arguments several commands share


def add_out(p, metavar: str, help: str, *, required: bool = True, default: str | None = None) -> None:
    """-o/--out: where a command writes (every command that writes has it)."""
    p.add_argument("-o", "--out", metavar=metavar, required=required, default=default, help=help)


def add_workers(p) -> None:
    """--workers N: parallel processes, default the usable cores (soco proposals, soco demo)."""
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"parallel processes (default: the CPU cores, {default_workers()} here; soco proposals also caps them by "
        "the memory available)",
    )


def add_max_steps(p, *, allow_zero: bool = False, then: str = "") -> None:
    """--max-steps N: an early stop; the schedule keeps its length (soco pretrain, soco linear)."""
    p.add_argument(
        "--max-steps",
        type=non_negative_int if allow_zero else positive_int,
        default=None,
        metavar="N",
        help=f"stop after N optimiser steps in total (the schedule keeps its full length){then}",
    )


def add_image_root(p) -> None:
    p.add_argument(
        "--image-root",
        metavar="DIR",
        default=None,
        help="folder a COCO JSON's file names are relative to (default: the JSON's folder)",
    )


def check_view_inputs(args) -> None:
    """--images, and --proposals and --image-root where given (soco pretrain, soco show views)."""
    require_source(args.images)
    if args.proposals is not None:
        require_dir(args.proposals, "proposal store")
    if args.image_root is not None:
        require_dir(args.image_root, "image root")


def add_weights_data_out(p, metavar: str, help: str, out_help: str, coco: bool = True) -> None:
    """--weights (pretrained weights or none), the COCO data flags (``coco``) and -o/--out DIR."""
    p.add_argument("--weights", required=True, metavar=metavar, help=help)
    if coco:
        add_coco_data(p)
    add_out(p, "DIR", out_help)


def check_weights(args) -> None:
    """--weights: none or an existing run folder, checkpoint or weights file."""
    if args.weights.lower() != "none" and not Path(args.weights).exists():
        raise UserError(
            f"--weights {args.weights}: no such run folder, checkpoint or weights file (or give --weights none)"
        )


def checked_coco_paths(args) -> tuple:
    """The checked --weights and COCO data: (train_json, train_images, val_json, val_images, out)."""
    check_coco_data(args)
    check_weights(args)
    return args.train_json, args.train_images, args.val_json, args.val_images, Path(args.out)


def add_run_folder_flags(p) -> None:
    """--overwrite and --accept-changes: what a training command may do to an existing run folder."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="with --resume none: move a previous run in OUT aside to OUT.old-N (never deleted) and start over",
    )
    p.add_argument(
        "--accept-changes",
        action="store_true",
        help="resume although the settings or starting weights differ from the checkpoint's (named in a line)",
    )


def check_resume(value: str) -> None:
    """--resume: auto, none or an existing checkpoint file."""
    if value not in ("auto", "none") and not Path(value).is_file():
        raise UserError(f"--resume {value}: expected auto, none or a checkpoint file")


class Renamed(argparse.Action):
    """A flag's old spelling: a one-line error naming the new one (exit 2), never a silent other meaning."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed {self.const}")


def add_renamed(p, renamed: dict[str, str]) -> None:
    """Old flag spellings (hidden from --help) -> their new names."""
    for old, new in renamed.items():
        dest = "renamed_" + old.lstrip("-").replace("-", "_")
        hidden = argparse.SUPPRESS  # not in --help and, unless given, not on the namespace
        p.add_argument(old, dest=dest, action=Renamed, nargs="?", const=new, default=hidden, help=hidden)


def add_coco_data(p, required: bool = True) -> None:
    """--train-json, --train-images, --val-json, --val-images (COCO-format data)."""
    p.add_argument("--train-json", required=required, metavar="JSON", help="COCO instances JSON for training")
    p.add_argument("--train-images", required=required, metavar="DIR", help="folder of the training JSON's file_names")
    p.add_argument("--val-json", required=required, metavar="JSON", help="COCO instances JSON for evaluation")
    p.add_argument("--val-images", required=required, metavar="DIR", help="folder of the val JSON's file_names")


def check_coco_data(args) -> None:
    for flag, path in (("--train-json", args.train_json), ("--val-json", args.val_json)):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    require_dir(args.train_images, "training image folder")
    require_dir(args.val_images, "validation image folder")


# ---------------------------------------------------------------- config options and generated flags


@dataclass(frozen=True)
class Flag:
    """A command-line flag for one field of an options dataclass, made by :func:`option_flags`
    from the field's metadata (``config.opt``).

    The flag's type, choices and range come from the field (annotation and ``__post_init__``), its
    default from the dataclass: ``help`` may say ``{default}``. Every generated flag defaults to
    None on the parsed namespace, so "not given" is told from "given" (``soco compare`` records
    only what was given; a preset or ``--config`` file is not overridden by an absent flag).
    """

    field: str
    flag: str
    help: str
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # text -> value (else from the annotation)
    show: Callable[[Any], Any] = str  # the default as the help formats it (float: so {default:g} works)
    invert: bool = False  # --no-progress: a bool field set to False

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def parse_list(text: str) -> tuple[str, ...]:
    """``"c5, head"`` -> ("c5", "head")."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def show_list(values) -> str:
    return "none" if values is None else ",".join(map(str, values))


# The text forms a field's metadata may name (``opt(parse=...)``): (parse, show).
_TEXT_FORMS: dict[str, tuple[Callable[[str], Any], Callable[[Any], str]]] = {
    "sizes": (parse_sizes, show_sizes),
    "list": (parse_list, show_list),
}


def option_flags(cls, kind: str | None = None, exclude: tuple[str, ...] = ()) -> list[Flag]:
    """The flags of options dataclass ``cls`` (of one ``kind``, "recipe" or "run", if given),
    generated from its fields' metadata; fields in ``exclude`` left out."""
    from dataclasses import fields

    from ..config import field_types, flag_name, option_meta

    types_ = field_types(cls)
    out = []
    for f in fields(cls):
        meta, flag = option_meta(f), flag_name(f)
        if flag is None or f.name in exclude or (kind is not None and meta["kind"] != kind):
            continue
        parse, show = _TEXT_FORMS[meta["parse"]] if meta["parse"] else (None, str)
        show_: Callable[[Any], Any] = show
        if types_[f.name] is float:
            show_ = float  # so a help text may say {default:g}
        invert = types_[f.name] is bool and flag.startswith("--no-")
        out.append(Flag(f.name, flag, meta["help"] or "", meta["metavar"], parse, show_, invert))
    return out


@dataclass(frozen=True)
class LrAlias:
    """The second spelling of a command's learning rate, so ``--lr`` and ``--base-lr`` mean the
    same in every command: ``--lr`` the absolute peak rate, ``--base-lr`` the rate at the
    command's reference batch, scaled linearly by ``--batch-size / reference``. The options
    field stores one of them (``stored``); this flag is converted into it with the resolved
    batch size."""

    field: str  # the options field that holds the rate
    stored: str  # "peak" (the field is --lr) or "base" (the field is --base-lr)
    reference: int  # the reference batch of the base rate

    @property
    def flag(self) -> str:
        return "--base-lr" if self.stored == "peak" else "--lr"

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def field_flag(self) -> str:
        return "--lr" if self.stored == "peak" else "--base-lr"

    def help(self) -> str:
        if self.stored == "peak":
            return f"learning rate at batch {self.reference}, scaled by --batch-size / {self.reference} (sets --lr)"
        return (
            f"absolute peak learning rate, whatever the batch (sets --base-lr to LR x {self.reference} / --batch-size)"
        )

    def value(self, given: float, batch_size: int) -> float:
        """The field's value for ``given`` (this flag's rate) at ``batch_size``."""
        if self.stored == "peak":
            return given * batch_size / self.reference
        return given * self.reference / batch_size


def lr_alias(cls, flags: list[Flag]) -> LrAlias | None:
    """The LrAlias of ``cls`` when ``flags`` hold its learning-rate field's flag, else None."""
    from dataclasses import fields

    from ..config import option_meta

    for f in fields(cls):
        lr = option_meta(f)["lr"]
        if lr is not None and any(flag.field == f.name for flag in flags):
            return LrAlias(f.name, lr[0], lr[1])
    return None


def _from_text(text: str, tp):
    """A flag's text as a value of annotation ``tp`` (Optional unwrapped; ranges checked after)."""
    from ..config import _union_args

    args = _union_args(tp)
    if args is not None:
        tp = next(a for a in args if a is not type(None))
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return text


def _flag_type(cls, base, flag: Flag, tp):
    from ..config import field_problem

    def convert(text: str):
        value = flag.parse(text) if flag.parse else _from_text(text, tp)
        problem = field_problem(cls, base, flag.field, value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    convert.__name__ = flag.dest  # argparse names the type in some messages
    return convert


def add_option_flags(p, cls, flags: list[Flag], base=None, cli_defaults: dict | None = None) -> None:
    """Add ``flags`` (fields of options dataclass ``cls``) to parser or group ``p``; defaults shown
    in the help are ``base``'s (default ``cls()``) or ``cli_defaults``'s."""
    from ..config import field_types, literal_choices

    base = cls() if base is None else base
    types_ = field_types(cls)
    alias = lr_alias(cls, flags)
    for flag in flags:
        tp = types_[flag.field]
        default = (cli_defaults or {}).get(flag.field, getattr(base, flag.field))
        text = flag.help.format(default=flag.show(default))
        if tp is bool:  # given: True on the namespace (--no-progress too; resolve_options inverts it)
            p.add_argument(flag.flag, dest=flag.dest, action="store_const", const=True, default=None, help=text)
            continue
        choices = literal_choices(tp)
        p.add_argument(
            flag.flag,
            dest=flag.dest,
            default=None,
            choices=choices,
            metavar=None if choices else flag.metavar,
            type=_flag_type(cls, base, flag, tp),
            help=text,
        )
        if alias is not None and flag.field == alias.field:  # the rate's other spelling, listed next to it
            p.add_argument(
                alias.flag, dest=alias.dest, default=None, type=positive_float, metavar="LR", help=alias.help()
            )


def add_config_sources(p, preset_help, config_help, set_help, *, choices=None, default=None) -> None:
    """--preset NAME and --config FILE (each where its help is given) and --set KEY=VALUE."""
    if preset_help is not None:
        p.add_argument("--preset", default=default, choices=choices, metavar="NAME", help=preset_help)
    if config_help is not None:
        p.add_argument("--config", default=None, metavar="FILE", help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def add_config_arguments(p, presets, what: str, set_example: str, default: str | None = None) -> None:
    """--preset NAME, --config FILE and --set KEY=VALUE for the options of ``what``."""
    add_config_sources(
        p,
        f"named {what} options: {', '.join(presets)} (default {default or 'none: the defaults'})",
        f"YAML file of {what} options (keys as --set), read over the preset",
        f"any {what} option, e.g. {set_example} (repeatable; applied last)",
        default=default,
    )


def resolve_options(
    cls,
    args,
    flags: list[Flag],
    presets: dict | None,
    *,
    base=None,
    base_label: str = "default",
    cli_defaults: dict | None = None,
):
    """(options, sources): ``cls``'s defaults (or ``base``) < ``cli_defaults`` < --preset <
    --config FILE < the flags given < --set, each value type- and range-checked (ConfigError)."""
    from ..config import load_file, resolve

    layers: list[tuple[str, Any]] = []
    if cli_defaults:
        layers.append(("default", cli_defaults))
    preset = getattr(args, "preset", None)
    if presets is not None and preset is not None:
        if preset not in presets:
            raise UserError(f"unknown preset {preset!r} (choose from {', '.join(presets)})")
        layers.append((f"preset {preset}", presets[preset]))
    if getattr(args, "config", None):
        layers.append((f"file {args.config}", load_file(args.config)))
    for flag in flags:
        value = getattr(args, flag.dest, None)
        if value is not None:
            layers.append((flag.flag, {flag.field: (not value) if flag.invert else value}))
    overrides = ("--set", list(getattr(args, "overrides", []) or []))
    alias = lr_alias(cls, flags)
    given = None if alias is None else getattr(args, alias.dest, None)
    if alias is None or given is None:
        return resolve(cls, [*layers, overrides], base=base, base_label=base_label)
    if any(getattr(args, flag.dest, None) is not None for flag in flags if flag.field == alias.field):
        raise UserError(f"give {alias.field_flag} or {alias.flag}, not both")
    # The other spelling of the rate: converted at the batch size everything else resolves to.
    resolved, _ = resolve(cls, [*layers, overrides], base=base, base_label=base_label)
    layers.append((alias.flag, {alias.field: alias.value(given, resolved.batch_size)}))
    return resolve(cls, [*layers, overrides], base=base, base_label=base_label)
