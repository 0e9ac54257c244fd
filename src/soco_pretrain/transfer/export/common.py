"""What every export target shares: the error, the settings of the written configs, the
exporter interface (key mappers per arch + ``write``) and the config templates."""

from __future__ import annotations

import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ...errors import UserError
from ...model.backbones import backbone_info, build_resnet, stage_channels
from ...weights.keymaps import ARCHS, BN, BN_ALL, NETWORKS, Mapper

WEIGHTS = NETWORKS  # "online", "target"
DEFAULT_WEIGHTS = "online"  # BYOL + released SoCo converters; see the package docstring
DETECTRON2_VERSION = "v0.6"
MMDET_VERSION = "v3.3.0"

# Paper 4.2 / released Detectron2 configs (hologerry/SoCo detectron2_configs): RGB input
# normalised with the ImageNet mean/std in 0-255 (torchvision's normalisation, which SoCo
# pretrains with), stride in the 3x3 conv (torchvision ResNet), weight decay 2.5e-5.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
FINETUNE_WEIGHT_DECAY = 2.5e-5

__all__ = ["BN", "BN_ALL", "Mapper"]  # the key maps live in weights/keymaps.py, re-exported here


@dataclass(frozen=True)
class Written:
    """What an exporter wrote: the weights file's one-line layout, the detector keys it leaves to
    the detector per module, the config file (if any) and notes for the report."""

    layout: str
    missing: dict[str, int]
    config_out: Path | None = None
    notes: tuple[str, ...] = ()


class Exporter:
    """One target library. Subclasses set ``name``, ``mappers`` (arch -> :data:`Mapper`),
    ``config_suffix`` (``None``: no config file) and implement :meth:`write`."""

    name: str = ""
    mappers: dict[str, Mapper] = {}
    config_suffix: str | None = None

    def convert(self, encoder: dict[str, torch.Tensor], arch: str):
        """Rename an encoder state dict: ``(state, mapping, groups, dropped)`` -- the renamed
        tensors (same objects), exported name -> encoder key, exported name -> detector module,
        and the encoder keys left out."""
        if arch not in self.mappers:
            raise UserError(f"unknown model.arch {arch!r} (export knows {', '.join(ARCHS)})")
        mapper = self.mappers[arch]
        state, mapping, groups, dropped = {}, {}, {}, []
        for key, tensor in encoder.items():
            found = mapper(key)
            if found is None:
                dropped.append(key)
                continue
            name, group = found
            if name in state:  # a mapping bug, never the user's input
                raise RuntimeError(f"two keys export to {name}: {mapping[name]} and {key}")
            state[name], mapping[name], groups[name] = tensor, key, group
        return state, mapping, groups, dropped

    def config_path(self, out: Path, config_out) -> Path | None:
        """``config_out`` if given, else ``out`` with this target's config suffix."""
        if self.config_suffix is None:
            return None
        if config_out is not None:
            return Path(config_out)
        candidate = out.with_suffix(self.config_suffix)
        return candidate if candidate != out else out.with_name(out.name + self.config_suffix)

    def write(self, state: dict, source, out: Path, config_out: Path | None, stamp: dict) -> Written:
        """Write ``state`` (exported names, CPU tensors) to ``out`` and the config to
        ``config_out``; ``source`` is the :class:`~.encoder.EncoderWeights` it came from,
        ``stamp`` the data-manifest fields for payloads that have room for them."""
        raise NotImplementedError


def render_template(name: str, **values) -> str:
    """A config template of this package (``templates/NAME``, package data) filled with
    ``values`` (``string.Template``: ``${name}`` placeholders, every one required)."""
    text = resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")
    return string.Template(text).substitute(values)


def config_values(source) -> dict:
    """The placeholders the detectron2 / mmdet templates share."""
    return {
        "weights": source.weights,
        "checkpoint": str(source.checkpoint),
        "pixel_mean": ", ".join(map(str, PIXEL_MEAN)),
        "pixel_std": ", ".join(map(str, PIXEL_STD)),
        "detectron2_version": DETECTRON2_VERSION,
        "mmdet_version": MMDET_VERSION,
    }


def unsupported(target: str, backbone: str, arch: str, why: str) -> UserError:
    """The one-line error for a backbone/arch pair ``target`` has no model for (README "Backbones")."""
    label = backbone_info(backbone).label
    return UserError(f"no {target} export of {label}-{arch.upper()} ({backbone}, model.arch={arch}): {why}")


def resnet_channels(backbone: str) -> tuple[int, int, int, int]:
    """C2..C5 channels of ``backbone``, read from the module (built on 'meta': no memory)."""
    with torch.device("meta"):
        return stage_channels(build_resnet(backbone))
