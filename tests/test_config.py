"""Configs: paper defaults, dict/YAML round trip, dotted overrides with clear errors."""

import pytest
import yaml

from soco_pretrain.config import DataConfig, apply_overrides, from_dict, to_dict


def test_paper_defaults():
    cfg = DataConfig()
    v, a = cfg.views, cfg.augment
    assert (v.v1_size, v.v2_size, v.v3_size, v.v4_size) == (224, 224, 112, 192)
    assert v.crop_scale == (0.5, 1.0) and v.num_proposals == 4
    assert (v.jitter_ratio, v.jitter_p) == (0.1, 0.5) and v.level_bounds == (48, 96, 192)
    assert (a.brightness, a.contrast, a.saturation, a.hue, a.colour_jitter_p) == (0.4, 0.4, 0.2, 0.1, 0.8)
    assert a.blur_p == (1.0, 0.1) and a.solarize_p == (0.0, 0.2) and a.grayscale_p == 0.2


def test_yaml_round_trip():
    cfg = apply_overrides(DataConfig(), ["views.soco_star=true", "augment.blur_p=[0.5, 0.5]"])
    text = yaml.safe_dump(to_dict(cfg))
    back = from_dict(DataConfig, yaml.safe_load(text))
    assert back == cfg and back.views.soco_star and back.augment.blur_p == (0.5, 0.5)


def test_overrides_types_and_copy():
    base = DataConfig()
    cfg = apply_overrides(base, ["views.num_proposals=8", "views.min_visible=1", "seed=3", "views.v3=independent_crop"])
    assert cfg.views.num_proposals == 8 and cfg.views.min_visible == 1.0 and isinstance(cfg.views.min_visible, float)
    assert cfg.seed == 3 and cfg.views.v3 == "independent_crop"
    assert base.views.num_proposals == 4 and base.seed == 0  # the original is untouched


@pytest.mark.parametrize(
    "item,message",
    [
        ("views.nope=1", "unknown key 'views.nope'"),
        ("views.num_proposals=four", "expected int"),
        ("augment.enabled=3", "expected true/false"),
        ("views.crop_scale=0.5", "expected a list"),
        ("seed", "expected key=value"),
    ],
)
def test_override_errors_are_one_line(item, message):
    with pytest.raises(ValueError, match=message) as info:
        apply_overrides(DataConfig(), [item])
    assert "\n" not in str(info.value)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key 'views.typo'; ViewsConfig keys: v1_size"):
        from_dict(DataConfig, {"views": {"typo": 1}})


# ---------------------------------------------------------------- one config system: types, ranges, versions

from soco_pretrain.config import (  # noqa: E402
    CONFIG_VERSION,
    SEARCH_PRESETS,
    AugmentConfig,
    ConfigError,
    FinetuneOptions,
    KnnOptions,
    LinearConfig,
    ModelConfig,
    MonitorConfig,
    PretrainConfig,
    SearchConfig,
    TrainConfig,
    ViewsConfig,
    resolve,
)
from soco_pretrain.errors import UserError  # noqa: E402


def _one_line_error(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, UserError) and info.value.exit_code == 2
    return message


def test_a_quoted_number_in_yaml_is_a_type_error_naming_key_value_and_type():
    data = yaml.safe_load('train:\n  epochs: "100"\n')
    message = _one_line_error(lambda: from_dict(PretrainConfig, data, where="my.yaml: "))
    assert message == 'my.yaml: train.epochs="100": expected int, got a string'


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("train:\n  epochs: 100.0\n", "train.epochs", "expected int, got a float"),  # ints stay ints
        ("train:\n  channels_last: 1\n", "train.channels_last", "expected true/false"),
        ("data:\n  views:\n    crop_scale: 0.5\n", "data.views.crop_scale", "expected a list of 2 floats"),
        ("data:\n  views:\n    level_bounds: [1, 2]\n", "data.views.level_bounds", "expected a list of 3 ints"),
        ("monitor:\n  json: 3\n", "monitor.json", "expected str or null"),
        ("model:\n  arch: dc5\n", "model.arch", "expected one of fpn, c4"),
        ("train: 3\n", "train", "expected a mapping of TrainConfig keys"),
    ],
)
def test_yaml_types_are_checked(text, key, expected):
    message = _one_line_error(lambda: from_dict(PretrainConfig, yaml.safe_load(text)))
    assert message.startswith(key) and expected in message


def test_1e_minus_5_is_a_float_in_yaml_and_in_set():
    data = yaml.safe_load("train:\n  weight_decay: 1e-5\n  base_lr: 2\n")
    assert data["train"]["weight_decay"] == "1e-5"  # YAML 1.1 reads it as a string
    cfg = from_dict(PretrainConfig, data)
    assert cfg.train.weight_decay == 1e-5 and cfg.train.base_lr == 2  # an int in a file stays as written
    assert apply_overrides(cfg, ["train.final_lr=1e-6"]).train.final_lr == 1e-6
    assert apply_overrides(FinetuneOptions(), ["weight_decay=1e-4"]).weight_decay == 1e-4
    assert "expected float" in _one_line_error(lambda: apply_overrides(cfg, ["train.base_lr=fast"]))


def test_invalid_choice_lists_the_choices():
    message = _one_line_error(lambda: apply_overrides(PretrainConfig(), ["model.arch=dc5"]))
    assert message == "--set model.arch=dc5: expected one of fpn, c4"
    for item, choices in [
        ("train.compile=maybe", "true, false or null (auto)"),
        ("train.precision=fp8", "auto, bf16"),
        ("data.views.pad=zeros", "mask, repeat"),
        ("data.augment.device=tpu", "auto, cpu, gpu"),
        ("data.views.proposal_source=gt", "selective_search, whole_image, random, coco"),
    ]:
        assert choices in _one_line_error(lambda item=item: apply_overrides(PretrainConfig(), [item]))


def test_compile_and_cudnn_benchmark_are_true_false_or_auto():
    # YAML true/false/null, and "auto" (and the strings older config files hold) read as null/bools
    for text, value in [("false", False), ("true", True), ("null", None), ("auto", None), ("AUTO", None)]:
        cfg = apply_overrides(PretrainConfig(), [f"train.compile={text}", f"train.cudnn_benchmark={text}"])
        assert cfg.train.compile is value and cfg.train.cudnn_benchmark is value
    old = from_dict(PretrainConfig, {"train": {"compile": "true", "cudnn_benchmark": "auto"}})
    assert old.train.compile is True and old.train.cudnn_benchmark is None
    assert TrainConfig(compile="false").compile is False  # the Python API too
    assert to_dict(PretrainConfig())["train"]["compile"] is None  # written as YAML null


def test_unknown_key_suggests_the_close_one():
    message = _one_line_error(lambda: apply_overrides(PretrainConfig(), ["train.epoch=3"]))
    assert message == "--set train.epoch=3: unknown key 'train.epoch'; did you mean 'train.epochs'?"


@pytest.mark.parametrize(
    "cls, kwargs, words",
    [
        (TrainConfig, {"epochs": 0}, "epochs=0: must be at least 1"),
        (TrainConfig, {"batch_size": -8}, "batch_size=-8: must be at least 1"),
        (TrainConfig, {"per_device_batch": -1}, "per_device_batch=-1: must be at least 0"),
        (TrainConfig, {"base_lr": 0.0}, "base_lr=0.0: must be positive"),
        (TrainConfig, {"ema_tau": 1.5}, "ema_tau=1.5: must be in [0, 1]"),
        (TrainConfig, {"log_every": 0}, "log_every=0: must be at least 1"),
        (TrainConfig, {"checkpoint_every": 0}, "checkpoint_every=0: must be at least 1"),
        (TrainConfig, {"keep_checkpoints": -1}, "keep_checkpoints=-1: must be at least 0"),
        (TrainConfig, {"workers": -1}, "workers=-1: must be at least 0"),
        (ViewsConfig, {"crop_scale": (0.9, 0.5)}, "crop_scale=[0.9, 0.5]: must be two values 0 < low <= high <= 1"),
        (ViewsConfig, {"crop_scale": (0.5, 1.5)}, "crop_scale"),
        (ViewsConfig, {"level_bounds": (96, 48, 192)}, "level_bounds=[96, 48, 192]: must be increasing"),
        (ViewsConfig, {"v1_size": 0}, "v1_size=0: must be at least 1"),
        (AugmentConfig, {"blur_sigma": (2.0, 0.1)}, "blur_sigma=[2.0, 0.1]: must be two values 0 < low <= high"),
        (AugmentConfig, {"solarize_p": (0.0, 1.2)}, "solarize_p"),
        (ModelConfig, {"roi_size": 0}, "roi_size=0: must be at least 1"),
        (MonitorConfig, {"every": 0}, "every=0: must be at least 1"),
        (PretrainConfig, {"version": 0}, "version=0: must be at least 1"),
        (FinetuneOptions, {"fraction": 1.5}, "fraction=1.5: must be in (0, 1]"),
        (FinetuneOptions, {"max_iters": 0}, "max_iters=0: must be at least 1"),
        (LinearConfig, {"batch_size": 0}, "batch_size=0: must be at least 1"),
        (KnnOptions, {"size": 16}, "size=16: must be at least 32"),
        (
            SearchConfig,
            {"scale": 0, "sigma": 0.9, "min_size": 10, "min_box_side": 0, "fallbacks": False},
            "scale=0: must be positive",
        ),
    ],
)
def test_ranges_are_checked_once_in_post_init(cls, kwargs, words):
    assert words in _one_line_error(lambda: cls(**kwargs))


def test_range_boundaries_that_mean_something_are_allowed():
    assert TrainConfig(keep_checkpoints=0).keep_checkpoints == 0  # only last.pt (engine/checkpoint.py)
    assert TrainConfig(per_device_batch=0, workers=0).per_device_batch == 0  # auto batch, loading in-process
    assert ViewsConfig(crop_scale=(1.0, 1.0), min_visible=0.0).crop_scale == (1.0, 1.0)
    assert FinetuneOptions(max_iters=None, lr=None, precise_bn=0).lr is None
    assert KnnOptions(size=None, level_bounds=(21.0, 41.0, 82.0)).size is None


def test_set_range_error_names_the_full_key_and_source():
    message = _one_line_error(lambda: apply_overrides(PretrainConfig(), ["data.views.num_proposals=0"]))
    assert message == "--set data.views.num_proposals=0: must be at least 1"


def test_version_round_trip():
    cfg = apply_overrides(PretrainConfig(), ["train.epochs=7"])
    data = to_dict(cfg)
    assert list(data)[0] == "version" and data["version"] == CONFIG_VERSION == 1
    assert from_dict(PretrainConfig, yaml.safe_load(yaml.safe_dump(data, sort_keys=False))) == cfg
    del data["version"]  # a RUN/config.yaml written before the field existed is version 1
    assert from_dict(PretrainConfig, data).version == 1
    message = _one_line_error(lambda: from_dict(PretrainConfig, {**data, "version": 2}, where="run/config.yaml: "))
    assert message.startswith("run/config.yaml: version=2: written by a newer soco_pretrain")


def test_resolve_layers_and_sources():
    cfg, sources = resolve(
        PretrainConfig,
        [
            ("preset tiny", {"train": {"epochs": 50, "workers": 2}}),
            ("file my.yaml", {"train": {"epochs": 60}}),
            ("--workers", {"train": {"workers": 1}}),
            ("--set", ["train.epochs=70"]),
        ],
    )
    assert (cfg.train.epochs, cfg.train.workers) == (70, 1)
    assert sources["train.epochs"] == "--set" and sources["train.workers"] == "--workers"
    assert sources["model.arch"] == "default"
    message = _one_line_error(lambda: resolve(PretrainConfig, [("file my.yaml", {"train": {"log_every": 0}})]))
    assert message == "my.yaml: train.log_every=0: must be at least 1"


def test_choices_are_those_of_the_code_that_reads_them():
    from soco_pretrain.config import field_types, literal_choices
    from soco_pretrain.data.proposal_sources import PROPOSAL_SOURCES
    from soco_pretrain.evaluate.knn import BN_MODES
    from soco_pretrain.model.loss import MODES
    from soco_pretrain.train.loop import PRECISIONS
    from soco_pretrain.transfer import finetune, linear
    from soco_pretrain.transfer.detector import DEFAULT_SOCO_WEIGHTS

    assert set(literal_choices(field_types(ViewsConfig)["proposal_source"])) == set(PROPOSAL_SOURCES)
    assert set(literal_choices(field_types(ModelConfig)["loss"])) == set(MODES)
    assert set(literal_choices(field_types(TrainConfig)["precision"])) == set(PRECISIONS)
    assert set(literal_choices(field_types(FinetuneOptions)["schedule"])) == set(finetune.SCHEDULES)
    assert set(literal_choices(field_types(KnnOptions)["bn"])) == set(BN_MODES)
    assert FinetuneOptions().soco_weights == KnnOptions().soco_weights == DEFAULT_SOCO_WEIGHTS
    # the option classes moved here are still importable from their old modules
    from soco_pretrain.evaluate.knn import KnnOptions as K
    from soco_pretrain.proposals import PRESETS
    from soco_pretrain.proposals import SearchConfig as S

    assert finetune.FinetuneOptions is FinetuneOptions and linear.LinearConfig is LinearConfig
    assert K is KnnOptions and S is SearchConfig and PRESETS is SEARCH_PRESETS


def test_search_config_round_trip_and_overrides():
    paper = SEARCH_PRESETS["paper"]
    assert SearchConfig.from_dict(paper.to_dict()) == paper
    assert apply_overrides(paper, ["min_box_side=16", "ratio=[0.5, 2]"]).ratio == (0.5, 2.0)
    assert "min_size" in _one_line_error(lambda: SearchConfig.from_dict({"scale": 1, "sigma": 0.9}))


# ---------------------------------------------------------------- field metadata: one option vocabulary

# What a resumed run may change, as each command's resume policy has always had it (written out
# here, independently of the field metadata the code generates it from).
FINETUNE_RESUME_FREE = ("workers", "per_device_batch", "device", "log_every", "checkpoint_every", "progress",
                        "precision", "eval_every", "eval_only", "resume", "test_size", "test_proposals", "detections",
                        "precise_bn")  # fmt: skip
LINEAR_RESUME_FREE = ("workers", "eval_every")
PRETRAIN_RESUME_FREE = ("version", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                        "train.workers", "train.dist_timeout_s", "train.compile", "train.per_device_batch",
                        "train.channels_last", "train.precision", "train.cudnn_benchmark", "train.tf32",
                        "train.prefetch", "data.augment.device", "data.decode", "model.roi_pool",
                        "monitor.")  # fmt: skip


def test_the_resume_policies_are_generated_from_the_field_metadata():
    from soco_pretrain.train import loop
    from soco_pretrain.transfer import finetune, linear

    for generated, expected in [
        (finetune.RESUME_FREE, FINETUNE_RESUME_FREE),
        (linear.RESUME_FREE, LINEAR_RESUME_FREE),
        (loop.RESUME_FREE, PRETRAIN_RESUME_FREE),
    ]:
        assert isinstance(generated, tuple) and len(set(generated)) == len(generated)
        assert set(generated) == set(expected)


def test_every_option_with_a_flag_has_help_and_one_flag_name():
    from dataclasses import fields

    from soco_pretrain.config import flag_name, option_meta

    for cls in (FinetuneOptions, LinearConfig, KnnOptions, SearchConfig):
        flags = []
        for f in fields(cls):
            meta = option_meta(f)
            assert meta["help"], f"{cls.__name__}.{f.name} has no help text"
            assert meta["kind"] in ("recipe", "run"), f"{cls.__name__}.{f.name}"
            if flag_name(f):
                flags.append(flag_name(f))
        assert len(flags) == len(set(flags)), cls.__name__
    # a flag is --field-name unless the metadata names another spelling
    names = {f.name: flag_name(f) for f in fields(KnnOptions)}
    assert (names["min_box"], names["train_fraction"], names["batch"]) == ("--min-box", "--fraction", "--batch-size")
    assert names["progress"] == "--no-progress" and names["precise_images"] is None


def test_recipe_and_run_options_split_by_kind():
    from soco_pretrain.config import option_names

    assert set(option_names(FinetuneOptions, "run")) == {
        "workers", "log_every", "checkpoint_every", "eval_every", "eval_only", "resume", "device", "progress",
        "per_device_batch",
    }  # fmt: skip
    assert set(option_names(KnnOptions, "run")) == {"allow_leak", "workers", "device", "progress"}
    assert {"batch_size", "lr", "schedule", "train_sizes", "weight_decay"} <= set(
        option_names(FinetuneOptions, "recipe")
    )


def test_the_monitor_probe_has_soco_knns_defaults():
    # the monitor's kNN settings of the same name as soco knn's default to the same values
    monitor, knn = MonitorConfig(), KnnOptions()
    assert (monitor.k, monitor.temperature, monitor.min_box, monitor.batch) == (20, 0.07, 32.0, 16)
    for name in ("k", "temperature", "min_box", "batch", "objects", "features", "context", "min_instances"):
        assert getattr(monitor, name) == getattr(knn, name), name


def test_one_name_for_the_batch_and_a_renamed_key_says_the_new_one():
    assert FinetuneOptions().batch_size == LinearConfig().batch_size // 16 == 16
    message = _one_line_error(lambda: from_dict(FinetuneOptions, {"batch": 4}, where="old.yaml: "))
    assert message == "old.yaml: unknown key 'batch': renamed 'batch_size'"
