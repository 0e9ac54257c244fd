"""Per-device batch from the card's memory: ``train.per_device_batch: 0`` (auto).

The paper's total batch (2048) stays fixed; what fits one card only sets the split into
per-device batch x processes x accumulation steps (loop.make_plan). Measured on an H200
(``benchmarks/gpu.py``, torch 2.11, bf16 autocast, channels_last, eager, views 224/224/112 and 192
for SoCo*, K = 4): peak allocated memory grows linearly with the batch,

    FPN    17.1 GiB at 128, 33.4 at 256  -> 0.127 GiB/image + 0.8
    C4     18.2 GiB at 128, 35.8 at 256  -> 0.138 GiB/image + 0.6
    SoCo*  21.8 GiB at 128, 42.9 at 256  -> 0.165 GiB/image + 0.7

fp32 doubles the activations (FPN at 128: 33.2 GiB); the per-image part scales with the view
area. Auto picks the largest power of two whose estimate stays under 85% of the card's memory
(room for cuDNN workspaces and the allocator's fragmentation) and that divides the total batch
per process. For 24 / 48 / 80 / 141 GB cards (23.6 / 45 / 79.6 / 139.8 GiB as torch reports them)
that gives FPN 128 / 256 / 512 / 512, C4 128 / 256 / 256 / 512 and SoCo* 64 / 128 / 256 / 512
(tests/test_memory.py); at the paper's 2048 on 8 cards that is 2 / 1 / 1 / 1 accumulation steps
for FPN.

What accumulation does to BatchNorm: statistics are per forward pass, i.e. over the per-device
batch (x world size under SyncBN), never over the whole 2048. The paper trained without
accumulation; a larger per-device batch keeps BN statistics closer to its setting, which is one
more reason to take the largest batch that fits.

Other backbones (``model.backbone``): the table above is ResNet-50's. What grows with the batch
is what the online network keeps for the backward pass, so each backbone's per-image part is
ResNet-50's times the ratio of those saved activations (``BACKBONE_MEMORY``, measured below).
The fixed part (weights, gradients, LARS momentum, EMA target: about 16 bytes per parameter)
grows too, by up to 1 GiB for the ResNeXt-101s (105 M encoder parameters against ResNet-50's
42 M), which the headroom absorbs on the cards above.

``soco finetune`` picks its per-device batch the same way from measured CPU peaks of its Mask
R-CNN: ``transfer/detector_memory.py``.
"""

from __future__ import annotations

# (GiB per image at 224 px in bf16, fixed GiB) per model, from the measurements above (ResNet-50).
MEMORY_MODEL = {"fpn": (0.127, 0.8), "c4": (0.138, 0.6), "fpn*": (0.165, 0.7)}
# Per-image memory of each backbone relative to ResNet-50, per arch (SoCo* uses fpn's): saved
# activations per image of the online forward, fp32, views 224/224/112, K = 4 (the table's),
# measured on the CPU (torch 2.14.1) by
#     python benchmarks/backbone_memory.py
# (autograd saved-tensor bytes at batch 4 minus batch 2, halved; the same tensors on a GPU),
# the factor being each row's value over ResNet-50's:
#
#     MiB/image        R18   R34    R50    R101   R152   X50-32x4d  X101-32x8d  X101-64x4d
#     fpn              83.9  105.6  220.9  308.6  417.2  277.5      565.9       566.2
#     c4                 -     -    216.4  294.5  390.9  283.7      574.7       574.7
BACKBONE_MEMORY = {
    "fpn": {
        "resnet18": 0.38,
        "resnet34": 0.48,
        "resnet50": 1.0,
        "resnet101": 1.40,
        "resnet152": 1.89,
        "resnext50_32x4d": 1.26,
        "resnext101_32x8d": 2.56,
        "resnext101_64x4d": 2.56,
    },
    "c4": {
        "resnet50": 1.0,
        "resnet101": 1.36,
        "resnet152": 1.81,
        "resnext50_32x4d": 1.31,
        "resnext101_32x8d": 2.66,
        "resnext101_64x4d": 2.66,
    },
}
HEADROOM = 0.85  # fraction of the card's memory the estimate may use
CPU_PER_DEVICE_BATCH = 64  # auto on a CPU: memory is rarely the limit there, time is
CANDIDATES = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


def estimate_gib(
    arch: str,
    soco_star: bool,
    batch: int,
    v1_size: int = 224,
    precision: str = "bf16",
    backbone: str = "resnet50",
) -> float:
    """Estimated peak device memory (GiB) of one training step at ``batch`` images."""
    per_image, fixed = MEMORY_MODEL["fpn*" if soco_star and arch == "fpn" else arch]
    per_image *= BACKBONE_MEMORY[arch][backbone] * (v1_size / 224) ** 2
    if precision == "fp32":
        per_image *= 2
    return fixed + per_image * batch


def auto_per_device_batch(
    arch: str,
    soco_star: bool,
    card_gib: float | None,
    batch_size: int,
    world_size: int,
    v1_size: int = 224,
    precision: str = "bf16",
    backbone: str = "resnet50",
) -> int:
    """The per-device batch for ``train.per_device_batch: 0``; ``card_gib`` None means a CPU."""
    per_process = max(1, batch_size // max(1, world_size))
    if card_gib is None:
        choices = [b for b in CANDIDATES if b <= CPU_PER_DEVICE_BATCH]
    else:
        choices = [
            b
            for b in CANDIDATES
            if estimate_gib(arch, soco_star, b, v1_size, precision, backbone) <= HEADROOM * card_gib
        ]
    for b in choices:
        if b <= per_process and per_process % b == 0:
            return b
    return 1
