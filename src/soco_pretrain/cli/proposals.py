"""``soco proposals`` and ``soco proposals merge``: selective-search proposal stores."""

from __future__ import annotations

from pathlib import Path

from .common import (
    PROG,
    Flag,
    UsageError,
    add_command,
    add_config_arguments,
    add_option_flags,
    add_out,
    add_workers,
    default_workers,
    parse_shard,
    require_dir,
    require_source,
    resolve_options,
)

# Fields of SearchConfig with their own flag (any field: --set KEY=VALUE); defaults from the preset.
PROPOSALS_FLAGS = [
    Flag(
        "max_side",
        "--max-side",
        "search larger images on a copy resized to this long side (0 = never; preset default {default})",
        "PX",
    ),
    Flag("scale", "--scale", "override the preset's scale (Felzenszwalb)", "S"),
    Flag("sigma", "--sigma", "override the preset's sigma (Felzenszwalb smoothing)", "S"),
    Flag("min_size", "--min-size", "override the preset's min_size (Felzenszwalb, pixels)", "N"),
]


def add_proposals(subparsers):
    from ..config import SEARCH_PRESETS, SearchConfig

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
            "Exit status: 0 all images done, 1 some images failed (listed), 2 bad input.\n\n"
            "See also: soco proposals merge SHARD... -o STORE  (join shard stores)"
        ),
        examples=[
            "soco proposals photos/ -o proposals/",
            "soco proposals imagenet/train -o props/ --workers 16 --preset released",
            "soco proposals photos/ -o shard0/ --shard 0/4   # then shard 1/4, 2/4, 3/4 and merge",
            "soco proposals photos/ -o props/ --set min_box_side=16 --set 'ratio=[0.5, 2]'",
        ],
    )
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_proposals)


def search_config(args):
    """(SearchConfig, sources) of the command line: the preset < --config < flags < --set."""
    from ..config import SEARCH_PRESETS, SearchConfig

    if args.preset not in SEARCH_PRESETS:
        raise UsageError(f"unknown preset {args.preset!r} (choose from {', '.join(sorted(SEARCH_PRESETS))})")
    return resolve_options(
        SearchConfig, args, PROPOSALS_FLAGS, None, base=SEARCH_PRESETS[args.preset], base_label=f"preset {args.preset}"
    )


def cmd_proposals(args) -> int:
    source = require_source(args.images)
    config, _ = search_config(args)
    from ..config import SEARCH_PRESETS
    from ..proposals import generate

    preset = SEARCH_PRESETS[args.preset]
    overrides = {name: value for name, value in config.to_dict().items() if value != preset.to_dict()[name]}
    summary = generate(
        source,
        Path(args.out),
        preset=args.preset,
        config_overrides=overrides or None,
        workers=args.workers or default_workers(),
        shard=args.shard,
        progress=not args.no_progress,
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
    from ..proposals import load, merge

    result = merge(shards, Path(args.out))
    if hasattr(result, "format"):
        print(result.format())
    else:
        store = load(args.out)
        print(f"merged {len(shards)} shards into {args.out}: {len(store)} images")
    return 0
