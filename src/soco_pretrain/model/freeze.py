"""Frozen parts of the SoCo encoder (``train.freeze``), for warm starts from supervised weights.

A frozen part keeps the weights it starts with: its parameters get ``requires_grad=False`` (no
gradient, no optimiser state, LARS never sees them; DDP does not reduce them) and its BatchNorms
run in eval mode, normalising with the running statistics they start with and never updating
them -- in the target network too, so online and target compute the same frozen features. Autograd
records nothing for a part whose parameters and input need no gradient, so the backward stops
where the trainable part begins (a frozen backbone: at the FPN's inputs).

Modes (names relative to ``SoCoEncoder``):
- ``stem``: conv1 + bn1 (Detectron2's ``FREEZE_AT: 1``);
- ``backbone``: the whole ResNet before the RoIAlign -- FPN: ``backbone.body`` (C2-C5); C4:
  conv1 .. layer3 (res5 is the R-CNN head and trains);
- ``backbone+fpn``: FPN only, the body and the FPN; the box head, projector and predictor train.
"""

from __future__ import annotations

from torch import nn

FREEZE_MODES = ("none", "stem", "backbone", "backbone+fpn")


def frozen_parts(arch: str, mode: str) -> list[str]:
    """Names (relative to a SoCoEncoder of ``arch``) of the submodules ``mode`` freezes. Names,
    not modules: SyncBN conversion replaces BatchNorm modules after the model is built."""
    if mode not in FREEZE_MODES:
        raise ValueError(f"train.freeze must be one of {', '.join(FREEZE_MODES)}, got {mode!r}")
    if mode == "none":
        return []
    resnet = "backbone.body" if arch == "fpn" else "backbone"
    if mode == "stem":
        return [f"{resnet}.conv1", f"{resnet}.bn1"]
    if mode == "backbone":
        return [resnet] if arch == "fpn" else [f"backbone.{m}" for m in ("conv1", "bn1", "layer1", "layer2", "layer3")]
    if arch != "fpn":
        raise ValueError("train.freeze=backbone+fpn needs model.arch=fpn (c4 has no FPN)")
    return [resnet, "backbone.fpn"]


def freeze(model: nn.Module, names: list[str]) -> None:
    """No gradients for the parameters of ``model``'s submodules ``names``, and those in eval mode."""
    for name in names:
        part = model.get_submodule(name)
        for p in part.parameters():
            p.requires_grad_(False)
        part.eval()


def keep_frozen_in_eval(model: nn.Module, names: list[str]) -> None:
    """Put the frozen submodules back in eval mode after ``model.train()`` set them training."""
    for name in names:
        model.get_submodule(name).eval()
