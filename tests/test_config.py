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
    with pytest.raises(ValueError, match="unknown ViewsConfig key"):
        from_dict(DataConfig, {"views": {"typo": 1}})
