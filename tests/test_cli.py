"""The ``soco`` command line: help, exit statuses, one-line errors, shard + merge."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from soco_pretrain.cli import main, parse_shard

PHOTOS = ("astronaut", "coffee", "chelsea")


def run_cli(*args, cwd=None):
    """``python -m soco_pretrain ARGS`` in a fresh process (real exit status and output)."""
    return subprocess.run(
        [sys.executable, "-m", "soco_pretrain", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def make_images(folder, names=PHOTOS, side=100):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        im = Image.fromarray(getattr(skimage.data, name)())
        im.thumbnail((side, side))
        im.save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("cli") / "images")


@pytest.fixture(scope="module")
def store(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-store") / "store"
    assert main(["proposals", str(images), "-o", str(out), "--workers", "1", "--no-progress"]) == 0
    return out


def call(argv, capsys):
    """main(argv) in-process -> (exit status, stdout, stderr); argparse exits become statuses."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command",
    [
        "",
        "proposals",
        "proposals merge",
        "show",
        "show proposals",
        "demo",
        "knn",
        "compare",
        "config",
        "config show",
        "pretrain",
        "finetune",
        "linear",
    ],
)
def test_help_of_every_command_has_an_example(command, capsys):
    status, out, _ = call([*command.split(), "--help"], capsys)
    assert status == 0
    assert "examples:" in out
    assert f"soco {command}".strip() in out.split("examples:")[1]


def test_help_runs_as_a_module_without_heavy_imports():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "proposals" in result.stdout and "demo" in result.stdout
    # --help must stay fast: the parser alone imports none of the heavy libraries.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, soco_pretrain.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('numpy', 'numba', 'torch', 'matplotlib', 'skimage') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "[]"


def test_no_command_prints_help_and_exits_2(capsys):
    status, _, err = call([], capsys)
    assert status == 2
    assert "usage: soco" in err


# ---------------------------------------------------------------- shard strings


@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 1/2", (1, 2))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("bad", ["4/4", "-1/2", "1/0", "x", "1", "1/2/3", "a/b", ""])
def test_bad_shard_is_a_one_line_error(bad, images, tmp_path, capsys):
    status, _, err = call(["proposals", str(images), "-o", str(tmp_path / "s"), "--shard", bad], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soco: error:") and "shard" in lines[0]
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- proposals


def test_proposals_writes_a_loadable_store(store, images):
    from soco_pretrain.proposals import load

    loaded = load(store)
    assert sorted(loaded.paths) == sorted(f"{n}.png" for n in PHOTOS)
    assert all(loaded.rule(i) != "failed" for i in range(len(loaded)))


def test_bad_image_exits_1_and_names_the_file(tmp_path):
    folder = make_images(tmp_path / "images", names=("chelsea",))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = run_cli("proposals", folder, "-o", tmp_path / "store", "--workers", "1", "--no-progress")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "broken.jpg" in result.stdout
    assert "Traceback" not in result.stderr
    assert (tmp_path / "store" / "manifest.json").is_file()  # the good image is still stored


def test_missing_folder_exits_2_with_one_line(tmp_path):
    result = run_cli("proposals", tmp_path / "nowhere", "-o", tmp_path / "store")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soco: error:") and "nowhere" in lines[0]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--preset", "nope"], ["unknown preset", "paper"]),
        (["--workers", "0"], ["--workers"]),
        (["--scale", "-3"], ["--scale"]),
    ],
)
def test_bad_options_are_one_line_errors(argv, words, images, tmp_path, capsys):
    status, _, err = call(["proposals", str(images), "-o", str(tmp_path / "s"), *argv], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soco: error:")
    assert all(w in lines[0] for w in words)


def test_output_used_by_something_else_is_a_one_line_error(images, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    status, _, err = call(["proposals", str(images), "-o", str(tmp_path / "taken")], capsys)
    assert status == 2
    assert err.startswith("soco: error:") and len(err.strip().splitlines()) == 1


def test_shards_merged_through_the_cli_equal_one_run(store, images, tmp_path, capsys):
    from soco_pretrain.proposals import load

    shards = []
    for i in range(2):
        shards.append(tmp_path / f"shard{i}")
        status, _, err = call(
            ["proposals", str(images), "-o", str(shards[-1]), "--shard", f"{i}/2", "--workers", "1", "--no-progress"],
            capsys,
        )
        assert status == 0, err
    status, out, err = call(["proposals", "merge", *map(str, shards), "-o", str(tmp_path / "merged")], capsys)
    assert status == 0, err
    assert "merged" in out
    whole, merged = load(store).arrays(), load(tmp_path / "merged").arrays()
    assert whole.keys() == merged.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], merged[name], err_msg=name)
    assert load(tmp_path / "merged").paths == load(store).paths


def test_merge_of_a_missing_or_non_store_is_a_one_line_error(store, tmp_path, capsys):
    status, _, err = call(["proposals", "merge", str(store), str(tmp_path / "nope"), "-o", str(tmp_path / "m")], capsys)
    assert status == 2 and err.startswith("soco: error:") and "nope" in err
    (tmp_path / "empty").mkdir()
    status, _, err = call(
        ["proposals", "merge", str(store), str(tmp_path / "empty"), "-o", str(tmp_path / "m")], capsys
    )
    assert status == 2 and err.startswith("soco: error:") and "empty" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- show proposals


def test_show_proposals_through_the_cli(store, images, tmp_path, capsys):
    out_dir = tmp_path / "pictures"
    status, out, err = call(
        [
            "show",
            "proposals",
            str(store),
            "--images",
            str(images),
            "-o",
            str(out_dir),
            "--num",
            "2",
            "--per-image",
            "3",
        ],
        capsys,
    )
    assert status == 0, err
    assert len(list(out_dir.glob("proposals_*.png"))) == 2
    for name in ("contact_sheet.png", "stats.png", "stats.json"):
        assert (out_dir / name).is_file()
        assert name in out


def test_show_proposals_of_a_missing_store_exits_2(images, tmp_path):
    result = run_cli("show", "proposals", tmp_path / "nostore", "--images", images, "-o", tmp_path / "p")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("soco: error:") and "nostore" in result.stderr


def test_show_proposals_of_a_non_store_folder_exits_2(images, tmp_path, capsys):
    status, _, err = call(
        ["show", "proposals", str(images), "--images", str(images), "-o", str(tmp_path / "p")], capsys
    )
    assert status == 2
    assert err.startswith("soco: error:") and "manifest" in err


# ---------------------------------------------------------------- show views


@pytest.fixture(scope="module")
def views_data(tmp_path_factory):
    """(images folder, store): four photos and a store written directly (known boxes)."""
    from data_fixtures import make_photos, make_store

    root = tmp_path_factory.mktemp("views")
    images = root / "images"
    paths = make_photos(images, ("astronaut", "coffee", "chelsea", "rocket"), side=150)
    return images, make_store(root / "store", images, paths)


def test_show_views_help_has_an_example(capsys):
    status, out, _ = call(["show", "views", "--help"], capsys)
    assert status == 0 and "soco show views" in out.split("examples:")[1]


@pytest.mark.parametrize("extra, panels", [([], 4), (["--set", "views.soco_star=true", "--augment"], 5)])
def test_show_views_writes_one_picture_per_image(views_data, tmp_path, capsys, extra, panels):
    images, store = views_data
    out_dir = tmp_path / "pictures"
    status, out, err = call(
        [
            "show",
            "views",
            "--images",
            str(images),
            "--proposals",
            str(store),
            "-o",
            str(out_dir),
            "--num",
            "2",
            "--seed",
            "1",
            *extra,
        ],
        capsys,
    )
    assert status == 0, err
    written = sorted(out_dir.glob("views_*.png"))
    assert len(written) == 2 and all(p.name in out for p in written)
    with Image.open(written[0]) as im:
        picture = np.asarray(im.convert("RGB"))
    # Panels (image, V1, V2, V3[, V4]) on white, each separated by a white gap column.
    content = (picture < 250).any(axis=(0, 2))
    starts = np.flatnonzero(content[1:] & ~content[:-1])
    assert len(starts) == panels
    assert picture.shape[0] >= 2 * 224  # views drawn enlarged 2x


def test_show_views_from_a_coco_json(views_data, tmp_path, capsys):
    images, store = views_data
    ann = tmp_path / "instances.json"
    ann.write_text('{"images": [{"id": 1, "file_name": "coffee.png"}]}')
    status, out, err = call(
        [
            "show",
            "views",
            "--images",
            str(ann),
            "--image-root",
            str(images),
            "--proposals",
            str(store),
            "-o",
            str(tmp_path / "p"),
        ],
        capsys,
    )
    assert status == 0, err
    assert [p.name for p in (tmp_path / "p").glob("*.png")] == ["views_00_coffee.png"]


def test_show_views_errors_are_one_line(views_data, tmp_path, capsys):
    images, store = views_data
    out = str(tmp_path / "p")
    (images.parent / "more").mkdir(exist_ok=True)
    extra = images.parent / "more"
    Image.new("RGB", (40, 30)).save(extra / "new.png")
    cases = [
        (["--images", str(extra), "--proposals", str(store)], "1 of 1 images have no proposals"),
        (["--images", str(images), "--proposals", str(store), "--set", "views.nope=1"], "views.nope"),
        (["--images", str(images), "--proposals", str(tmp_path / "nostore")], "nostore"),
        (["--images", str(images), "--proposals", str(store), "--set", "views.pad=zeros"], "views.pad"),
    ]
    for args, expected in cases:
        status, _, err = call(["show", "views", *args, "-o", out], capsys)
        assert status == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("soco: error:") and expected in lines[0], err


# ---------------------------------------------------------------- one config system: --config, --preset, --set


@pytest.fixture(scope="module")
def option_inputs(images, tmp_path_factory):
    """Inputs that pass each command's path checks, so that the config is what fails."""
    root = tmp_path_factory.mktemp("options")
    for name in ("train.json", "val.json"):
        (root / name).write_text('{"images": [], "annotations": [], "categories": []}')
    for split in ("train", "val"):
        (root / split / "red").mkdir(parents=True)
    coco = [
        "--weights",
        "none",
        "--train-json",
        root / "train.json",
        "--train-images",
        images,
        "--val-json",
        root / "val.json",
        "--val-images",
        images,
    ]
    return {
        "root": root,
        "pretrain": ["pretrain", "--preset", "tiny", "--images", images, "--out", root / "run"],
        "finetune": ["finetune", *coco, "--out", root / "ft"],
        "knn": ["knn", *coco, "--out", root / "knn"],
        "linear": [
            "linear",
            "--weights",
            "none",
            "--train",
            root / "train",
            "--val",
            root / "val",
            "--out",
            root / "lin",
        ],
        "proposals": ["proposals", images, "-o", root / "store"],
    }


# (command, --set item, words of the one-line error): a wrong type, an unknown key, an invalid
# choice and an out-of-range value for every command with options.
BAD_SETS = [
    ("pretrain", "train.epochs=many", "--set train.epochs=many: expected int, got a string"),
    ("pretrain", "train.epoch=3", "unknown key 'train.epoch'; did you mean 'train.epochs'?"),
    ("pretrain", "model.arch=dc5", "--set model.arch=dc5: expected one of fpn, c4"),
    ("pretrain", "train.ema_tau=1.5", "--set train.ema_tau=1.5: must be in [0, 1]"),
    ("pretrain", "train.optimizer=sdg", "--set train.optimizer=sdg: expected one of lars, sgd"),
    ("pretrain", "train.optimiser=sgd", "unknown key 'train.optimiser'; did you mean 'train.optimizer'?"),
    ("pretrain", "train.warmup_steps=-1", "--set train.warmup_steps=-1: must be at least 0"),
    ("finetune", "batch_size=two", "--set batch_size=two: expected int, got a string"),
    ("finetune", "bach_size=2", "unknown key 'bach_size'; did you mean 'batch_size'?"),
    ("finetune", "batch=2", "unknown key 'batch': renamed 'batch_size'"),
    ("finetune", "schedule=3x", "--set schedule=3x: expected one of 1x, 2x"),
    ("finetune", "fraction=1.5", "--set fraction=1.5: must be in (0, 1]"),
    ("linear", "epochs=[1]", "--set epochs=[1]: expected int, got a list of 1"),
    ("linear", "nope=1", "unknown key 'nope'"),
    ("linear", "schedule=linear", "--set schedule=linear: expected one of cosine, steps"),
    ("linear", "crop_scale=[0.9, 0.1]", "crop_scale=[0.9, 0.1]: must be two values 0 < low <= high <= 1"),
    ("knn", "k=many", "--set k=many: expected int, got a string"),
    ("knn", "kk=3", "unknown key 'kk'"),
    ("knn", "bn=batch", "--set bn=batch: expected one of precise, running"),
    ("knn", "temperature=0", "--set temperature=0.0: must be positive"),
    ("proposals", "fallbacks=maybe", "--set fallbacks=maybe: expected true/false, got a string"),
    ("proposals", "scael=3", "unknown key 'scael'; did you mean 'scale'?"),
    ("proposals", "min_size=1.5", "--set min_size=1.5: expected int, got a float"),
    ("proposals", "rel_size=[0.8, 0.3]", "rel_size=[0.8, 0.3]: must be two values 0 <= low <= high"),
]


@pytest.mark.parametrize("command, item, words", BAD_SETS, ids=[f"{c}:{i}" for c, i, _ in BAD_SETS])
def test_bad_set_is_a_one_line_error(command, item, words, option_inputs, capsys):
    status, _, err = call([*map(str, option_inputs[command]), "--set", item], capsys)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soco: error: ") and words in lines[0], err


@pytest.mark.parametrize(
    "command, text, words",
    [
        ("pretrain", 'train:\n  epochs: "100"\n', 'train.epochs="100": expected int, got a string'),
        ("finetune", "precision: fp8\n", 'precision="fp8": expected one of fp32, bf16, fp16'),
        ("linear", "warmup_epochs: -1\n", "warmup_epochs=-1: must be at least 0"),
        ("knn", "k: 0\n", "k=0: must be at least 1"),
        ("proposals", "- 1\n", "expected a mapping of config keys"),
    ],
)
def test_bad_config_file_is_a_one_line_error_naming_the_file(command, text, words, option_inputs, tmp_path, capsys):
    path = tmp_path / "options.yaml"
    path.write_text(text)
    status, _, err = call([*map(str, option_inputs[command]), "--config", str(path)], capsys)
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith(f"soco: error: {path}: ") and words in err, err


@pytest.mark.parametrize(
    "command, argv, words",
    [
        ("finetune", ["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        ("finetune", ["--fraction", "2"], "argument --fraction: must be in (0, 1], got 2"),
        ("knn", ["--size", "16"], "argument --size: must be at least 32, got 16"),
        ("linear", ["--lr", "x"], "argument --lr: not a number: 'x'"),
        ("proposals", ["--scale", "-3"], "argument --scale: must be positive, got -3"),
        ("finetune", ["--preset", "huge"], "unknown preset 'huge' (choose from 1x, 2x, cpu)"),
    ],
)
def test_generated_flags_check_types_and_ranges(command, argv, words, option_inputs, capsys):
    status, _, err = call([*map(str, option_inputs[command]), *argv], capsys)
    assert status == 2 and err.count("\n") == 1 and words in err, err


def _resolved(command, argv):
    """The options a command line resolves to, and their sources (no command is run)."""
    from soco_pretrain import config as c
    from soco_pretrain.cli import build_parser
    from soco_pretrain.cli.common import resolve_options
    from soco_pretrain.cli.finetune import FINETUNE_FLAGS, finetune_cli_defaults
    from soco_pretrain.cli.knn import KNN_FLAGS, knn_cli_defaults
    from soco_pretrain.cli.linear import LINEAR_FLAGS
    from soco_pretrain.cli.proposals import search_config

    args = build_parser().parse_args(list(map(str, argv)))
    if command == "finetune":
        return resolve_options(
            c.FinetuneOptions, args, FINETUNE_FLAGS, c.FINETUNE_PRESETS, cli_defaults=finetune_cli_defaults()
        )
    if command == "knn":
        return resolve_options(c.KnnOptions, args, KNN_FLAGS, c.KNN_PRESETS, cli_defaults=knn_cli_defaults())
    if command == "linear":
        return resolve_options(c.LinearConfig, args, LINEAR_FLAGS, c.LINEAR_PRESETS)
    return search_config(args)


@pytest.mark.parametrize("command", ["finetune", "knn", "linear", "proposals"])
def test_generated_flags_match_the_dataclass_defaults(command, option_inputs):
    """Every flag is a field of the command's options dataclass; with no flag given the command runs
    with the dataclass's defaults (the command line's own: only the capped worker count)."""
    from soco_pretrain import config as c
    from soco_pretrain.cli import build_parser
    from soco_pretrain.cli.common import default_workers
    from soco_pretrain.cli.finetune import FINETUNE_FLAGS
    from soco_pretrain.cli.knn import KNN_FLAGS
    from soco_pretrain.cli.linear import LINEAR_FLAGS
    from soco_pretrain.cli.proposals import PROPOSALS_FLAGS

    cls, flags, expected = {
        "finetune": (c.FinetuneOptions, FINETUNE_FLAGS, c.FinetuneOptions(workers=min(4, default_workers()))),
        "knn": (c.KnnOptions, KNN_FLAGS, c.KnnOptions(workers=min(4, default_workers()))),
        "linear": (c.LinearConfig, LINEAR_FLAGS, c.LinearConfig()),
        "proposals": (c.SearchConfig, PROPOSALS_FLAGS, c.SEARCH_PRESETS["paper"]),
    }[command]
    names = set(c.field_types(cls))
    assert all(flag.field in names for flag in flags)
    options, sources = _resolved(command, option_inputs[command])
    assert options == expected
    assert set(sources.values()) <= {"default", "preset paper"}
    # the parser holds no default of its own: every generated flag is None until given
    args = build_parser().parse_args(list(map(str, option_inputs[command])))
    assert all(getattr(args, flag.dest) is None for flag in flags)
    # and the help shows the dataclass's default
    base = c.SEARCH_PRESETS["paper"] if command == "proposals" else cls()
    helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices[command]._actions}
    for flag in flags:
        if "{default" in flag.help and flag.field != "workers":
            assert flag.help.format(default=flag.show(getattr(base, flag.field))) == helps[flag.dest]


# ---------------------------------------------------------------- one grammar: -o/--out, renamed flags


@pytest.mark.parametrize("spelling", ["-o", "--out"])
@pytest.mark.parametrize("command", ["pretrain", "finetune", "knn", "linear", "compare", "export", "proposals"])
def test_every_writing_command_takes_o_and_out(command, spelling, option_inputs):
    from soco_pretrain.cli import build_parser

    argv = {
        "compare": ["compare", "--init", "none"],
        "export": ["export", "run", "--to", "torchvision"],
    }.get(command) or [a for a in option_inputs[command] if a not in ("-o", "--out")][:-1]
    args = build_parser().parse_args([*map(str, argv), spelling, "somewhere"])
    assert args.out == "somewhere"


@pytest.mark.parametrize(
    "argv, old, new",
    [
        (["finetune", "--min-size", "320"], "--min-size", "--train-sizes"),
        (["compare", "--min-size=320"], "--min-size", "--train-sizes"),
        (["linear", "--max-iters", "5"], "--max-iters", "--max-steps"),
        (["finetune", "--batch", "4"], "--batch", "--batch-size"),
        (["compare", "--batch", "4"], "--batch", "--batch-size"),
        (["linear", "--batch", "32"], "--batch", "--batch-size"),
        (["knn", "--batch=8"], "--batch", "--batch-size"),
        (["export", "run", "--weights", "target"], "--weights", "--soco-weights"),
    ],
)
def test_renamed_flags_are_a_one_line_error_naming_the_new_one(argv, old, new, capsys):
    status, _, err = call(argv, capsys)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"soco: error: {old} was renamed {new}"), err


def test_renamed_flags_set_what_the_old_ones_did(option_inputs):
    from soco_pretrain.cli import build_parser

    parse = build_parser().parse_args
    assert _resolved("finetune", [*option_inputs["finetune"], "--train-sizes", "320"])[0].train_sizes == (320,)
    assert parse([*map(str, option_inputs["linear"]), "--max-steps", "0"]).max_steps == 0
    assert parse(["export", "run", "--to", "mmdet", "--soco-weights", "target", "-o", "w"]).soco_weights == "target"
    # soco proposals --min-size keeps its own meaning: a region size of the search
    assert parse([*map(str, option_inputs["proposals"]), "--min-size", "50"]).min_size == 50


def test_layers_preset_file_flag_set(option_inputs, tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("batch_size: 4\nmax_size: 600\nweight_decay: 1e-5\n")
    argv = [
        *option_inputs["finetune"],
        "--preset",
        "cpu",
        "--config",
        path,
        "--max-size",
        "700",
        "--set",
        "max_size=800",
        "--no-progress",
    ]
    options, sources = _resolved("finetune", argv)
    assert (options.batch_size, options.max_size, options.weight_decay, options.progress) == (4, 800, 1e-5, False)
    assert options.train_sizes == (320,) and options.roi_batch == 128  # from the cpu preset
    assert (sources["batch_size"], sources["max_size"], sources["train_sizes"], sources["progress"]) == (
        f"file {path}",
        "--set",
        "preset cpu",
        "--no-progress",
    )


def test_config_show_prints_every_key_with_value_and_source(tmp_path, capsys):
    from soco_pretrain.config import PretrainConfig, flatten

    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 7\n  weight_decay: 1e-5\n")
    status, out, err = call(
        ["config", "show", "--preset", "tiny", "--config", str(path), "--set", "model.arch=c4"], capsys
    )
    assert status == 0, err
    rows = {line.split(":")[0]: line for line in out.strip().splitlines()}
    assert list(rows) == [key for key, _ in flatten(PretrainConfig())]
    assert rows["version"].split() == ["version:", "1", "#", "default"]
    assert rows["data.views.v1_size"].split() == ["data.views.v1_size:", "96", "#", "preset", "tiny"]
    assert rows["train.epochs"].split() == ["train.epochs:", "7", "#", "file", str(path)]
    assert rows["train.weight_decay"].split() == ["train.weight_decay:", "1e-05", "#", "file", str(path)]
    assert rows["model.arch"].split() == ["model.arch:", "c4", "#", "--set"]
    assert rows["train.momentum"].split() == ["train.momentum:", "0.9", "#", "default"]
    # soco pretrain --print-config prints the same and trains nothing (no --images/--out needed)
    status, printed, _ = call(
        ["pretrain", "--preset", "tiny", "--config", str(path), "--set", "model.arch=c4", "--print-config"], capsys
    )
    assert status == 0 and printed == out


def test_config_file_version_round_trip(tmp_path, capsys):
    from soco_pretrain.config import PretrainConfig, apply_overrides, to_dict

    cfg = apply_overrides(PretrainConfig(), ["train.epochs=9"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml_dump(to_dict(cfg)))  # as RUN/config.yaml is written
    status, out, err = call(["config", "show", "--config", str(path)], capsys)
    assert status == 0, err
    assert all(line.endswith(f"# file {path}") for line in out.strip().splitlines())
    path.write_text(path.read_text().replace("version: 1", "version: 2"))
    status, _, err = call(["config", "show", "--config", str(path)], capsys)
    assert status == 2 and err.count("\n") == 1 and f"{path}: version=2: written by a newer soco_pretrain" in err


def test_pretrain_needs_a_preset_or_a_config(option_inputs, capsys):
    argv = [str(a) for a in option_inputs["pretrain"] if str(a) not in ("--preset", "tiny")]
    status, _, err = call(argv, capsys)
    assert status == 2 and "give --preset NAME or --config FILE" in err


def yaml_dump(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------- one meaning of --lr, --base-lr, --batch-size


@pytest.mark.parametrize(
    "command, flags, peak",
    [
        # --lr: the peak rate the optimiser gets, whatever the batch
        ("finetune", ["--lr", "0.05"], 0.05),
        ("finetune", ["--lr", "0.05", "--batch-size", "4"], 0.05),
        ("linear", ["--lr", "3.75", "--batch-size", "32"], 3.75),
        ("linear", ["--preset", "cpu", "--lr", "1"], 1.0),  # the preset's batch 32
        # --base-lr: the rate at the reference batch (16 fine-tuning, 256 the probe), scaled
        ("finetune", ["--base-lr", "0.04", "--batch-size", "8"], 0.02),
        ("finetune", ["--batch-size", "32"], 0.04),  # the default: 0.02 at batch 16
        ("linear", ["--base-lr", "30", "--batch-size", "32"], 3.75),
        ("linear", [], 30.0),  # the default: 30 at batch 256
    ],
)
def test_lr_is_the_peak_and_base_lr_the_rate_at_the_reference_batch(command, flags, peak, option_inputs):
    from soco_pretrain.engine.schedule import scaled_lr

    options, _ = _resolved(command, [*option_inputs[command], *flags])
    if command == "finetune":
        from soco_pretrain.transfer.finetune import make_plan

        got = make_plan(options).lr
    else:
        got = scaled_lr(options.base_lr, options.batch_size)  # what transfer/linear.py trains with
    assert got == pytest.approx(peak)


@pytest.mark.parametrize("command", ["finetune", "linear"])
def test_lr_and_base_lr_together_are_refused(command, option_inputs):
    from soco_pretrain.errors import UserError

    with pytest.raises(UserError, match="give --(base-)?lr or --(base-)?lr, not both"):
        _resolved(command, [*option_inputs[command], "--lr", "0.1", "--base-lr", "0.1"])
