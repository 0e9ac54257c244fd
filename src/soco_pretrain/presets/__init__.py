"""Named training presets: YAML files beside this module, each read over PretrainConfig's defaults.

A preset file only names what differs from (or is worth restating over) the defaults in
config.py, each with its source. ``load_preset("fpn-100ep")`` -> PretrainConfig.
"""

from __future__ import annotations

from importlib import resources

import yaml

from ..config import PretrainConfig, from_dict
from ..errors import UserError

# The paper's schedules (section 4.1), a CPU-sized one for trying the pipeline, the CPU-budget
# experiment's (cpu-small: ResNet-18-FPN at 64 px) and two warm starts from supervised weights
# (fpn-head-warm: frozen backbone; fpn-warm: all trainable, lower lr).
PRESETS = (
    "fpn-100ep", "fpn-400ep", "fpn-star-400ep", "c4-100ep", "c4-400ep", "tiny", "cpu-small", "fpn-head-warm", "fpn-warm"
)  # fmt: skip


def preset_text(name: str) -> str:
    """The YAML text of preset ``name``."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return (resources.files(__package__) / f"{name}.yaml").read_text(encoding="utf-8")


def load_preset(name: str):
    """PretrainConfig for preset ``name``: the YAML values over PretrainConfig's defaults."""
    data = yaml.safe_load(preset_text(name)) or {}
    try:
        return from_dict(PretrainConfig, data)
    except (TypeError, ValueError) as exc:
        raise UserError(f"preset {name!r}: {exc}") from exc
