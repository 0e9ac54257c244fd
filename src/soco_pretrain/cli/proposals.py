"""``soco proposals``, ``soco proposals merge`` and ``soco proposals verify``: proposal stores."""

from __future__ import annotations

from pathlib import Path

from ..config import SEARCH_PRESETS, SearchConfig
from .common import (
    PROG,
    Formatter,
    Parser,
    UserError,
    add_command,
    add_config_arguments,
    add_option_flags,
    add_out,
    add_workers,
    default_workers,
    non_negative_int,
    option_flags,
    parse_shard,
    require_dir,
    require_source,
    resolve_options,
)

# Fields of SearchConfig with their own flag (any field: --set KEY=VALUE), generated from its
# field metadata (config.py); defaults from the preset.
PROPOSALS_FLAGS = option_flags(SearchConfig)


# images.DEFAULT_MAX_PIXELS, written out so that --help imports neither numpy nor PIL (a test
# checks that the two agree).
MAX_PIXELS_DEFAULT_TEXT = "178956970"


class _ProposalsParser(Parser):
    """The ``soco proposals IMAGES`` parser, which hands ``soco proposals verify ...`` to the
    verify parser (cli.main rewrites ``proposals merge`` to ``proposals-merge``; ``verify`` is
    recognised here). A folder literally named "verify" can still be given as ``./verify``."""

    verify_parser = None

    def parse_known_args(self, args=None, namespace=None):
        if args and args[0] == "verify" and self.verify_parser is not None:
            return self.verify_parser.parse_known_args(list(args[1:]), namespace)
        return super().parse_known_args(args, namespace)


def add_proposals(subparsers):
    p = add_command(
        subparsers,
        "proposals",
        help="compute selective-search object proposals for a folder of images",
        description=(
            "Compute selective-search proposals for every image in IMAGES (a folder, searched\n"
            "recursively, or a text file with one image path per line) and write them to the\n"
            "proposal store STORE. An interrupted run resumes when rerun with the same command.\n"
            "Search options: the preset, then --config FILE, the flags, then --set KEY=VALUE\n"
            "(keys: scale, sigma, min_size, min_box_side, fallbacks, max_side, ratio, rel_size).\n"
            "Exit status: 0 all images done, 1 some images failed (listed), 2 bad input.\n"
            "Failed images stay failed when rerun; --retry-failed searches them again.\n"
            "A rerun searches again the images replaced since (another file size or time, then\n"
            "other bytes); --rehash compares the bytes of every image.\n"
            "Without --workers, the worker count is capped by the available memory.\n\n"
            "See also: soco proposals merge SHARD... -o STORE  (join shard stores)\n"
            "          soco proposals verify STORE           (check every file's sha256)"
        ),
        examples=[
            "soco proposals photos/ -o proposals/",
            "soco proposals imagenet/train -o props/ --workers 16 --preset released",
            "soco proposals photos/ -o shard0/ --shard 0/4   # then shard 1/4, 2/4, 3/4 and merge",
            "soco proposals photos/ -o props/ --set min_box_side=16 --set 'ratio=[0.5, 2]'",
            "soco proposals photos/ -o proposals/ --retry-failed   # after restoring missing files",
        ],
    )
    p.__class__ = _ProposalsParser
    p.verify_parser = _verify_parser()
    p.add_argument("images", metavar="IMAGES", help="image folder or text file listing images")
    add_out(p, "STORE", "output store directory")
    add_config_arguments(p, SEARCH_PRESETS, "search/filter", "min_box_side=32", default="paper")
    add_workers(p)
    p.add_argument(
        "--shard",
        type=parse_shard,
        default=None,
        metavar="i/N",
        help="only every N-th image starting at i (0-based), for splitting across machines",
    )
    add_option_flags(p, SearchConfig, PROPOSALS_FLAGS, base=SEARCH_PRESETS["paper"])
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="search again the images a previous run of this store recorded as failed",
    )
    p.add_argument(
        "--rehash",
        action="store_true",
        help=(
            "on a rerun, compare every image's sha256 with the store's, not only those whose file "
            "size or time changed (a photo replaced by one of the same size and time)"
        ),
    )
    p.add_argument(
        "--max-pixels",
        type=non_negative_int,
        default=None,
        metavar="N",
        help=(
            "fail images that would decode to more than N pixels, checked from the file header "
            "before decoding (decompression bombs; JPEGs count their reduced --max-side decode; "
            f"default {MAX_PIXELS_DEFAULT_TEXT}, PIL's own limit; 0 = none)"
        ),
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_proposals)


def search_config(args):
    """(SearchConfig, sources) of the command line: the preset < --config < flags < --set."""
    if args.preset not in SEARCH_PRESETS:
        raise UserError(f"unknown preset {args.preset!r} (choose from {', '.join(sorted(SEARCH_PRESETS))})")
    return resolve_options(
        SearchConfig, args, PROPOSALS_FLAGS, None, base=SEARCH_PRESETS[args.preset], base_label=f"preset {args.preset}"
    )


def cmd_proposals(args) -> int:
    source = require_source(args.images)
    config, _ = search_config(args)
    # here, not at the top: soco --help must not import numpy, PIL or numba
    from ..images import DEFAULT_MAX_PIXELS
    from ..proposals import generate
    from ..proposals.generate import memory_capped_workers

    preset = SEARCH_PRESETS[args.preset]
    overrides = {name: value for name, value in config.to_dict().items() if value != preset.to_dict()[name]}
    workers = args.workers
    if workers is None:  # one per core, as many as the available memory holds
        workers, note = memory_capped_workers(default_workers(), config.max_side)
        if note:
            print(note, flush=True)
    summary = generate(
        source,
        Path(args.out),
        preset=args.preset,
        config_overrides=overrides or None,
        workers=workers,
        shard=args.shard,
        progress=not args.no_progress,
        retry_failed=args.retry_failed,
        rehash=args.rehash,
        max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None),
    )
    print(summary.format())
    return 0 if summary.ok else 1


def add_proposals_merge(subparsers):
    # Reached as "soco proposals merge ..." (main() rewrites the first two words).
    p = add_command(
        subparsers,
        "proposals-merge",
        help=None,
        prog=f"{PROG} proposals merge",
        description=(
            "Join proposal stores made with --shard into one store, ordered by image path.\n"
            "The shards must use the same parameters and must not share images."
        ),
        examples=[
            "soco proposals merge shard0/ shard1/ shard2/ shard3/ -o proposals/",
        ],
    )
    p.add_argument("shards", metavar="SHARD", nargs="+", help="shard store directories")
    add_out(p, "STORE", "merged store directory")
    p.set_defaults(func=cmd_proposals_merge)


def cmd_proposals_merge(args) -> int:
    shards = [require_dir(s, "shard store") for s in args.shards]
    from ..proposals import load, merge  # here, not at the top: soco --help must not import numba

    result = merge(shards, Path(args.out))
    if hasattr(result, "format"):
        print(result.format())
    else:
        store = load(args.out)
        print(f"merged {len(shards)} shards into {args.out}: {len(store)} images")
    return 0


def _verify_parser():
    # Reached as "soco proposals verify STORE" (see _ProposalsParser).
    p = Parser(
        prog=f"{PROG} proposals verify",
        description=(
            "Check every file of a proposal store against the sha256 recorded in its manifest\n"
            "(opening a store checks sizes and a quick checksum only). Exit status: 0 all files\n"
            "match, 2 a file is missing, changed or the store is incomplete (one line naming it)."
        ),
        epilog="examples:\n  soco proposals verify proposals/",
        formatter_class=Formatter,
    )
    p.add_argument("store", metavar="STORE", help="proposal store directory")
    p.set_defaults(func=cmd_proposals_verify)
    return p


def cmd_proposals_verify(args) -> int:
    store = require_dir(args.store, "proposals store")
    from ..proposals import verify_store  # here, not at the top: soco --help must not import numba

    n = verify_store(store)
    print(f"ok: {n} files verified ({store}: every sha256 matches manifest.json)")
    return 0
