"""Measure: activation memory per image of each backbone, relative to ResNet-50 (train/memory.py).

The GPU table of ``train/memory.py`` (peak memory per image of a pretraining step) was measured
with ResNet-50 only. What grows with the batch is what the online network keeps for the backward
pass (the target network runs under no_grad), so the ratio of that to ResNet-50's is the factor
``BACKBONE_MEMORY`` scales the per-image part with. Measured here on the CPU: one forward of
``SoCoModel`` (online encoder + projector + predictor on every view, the target under no_grad) on
a synthetic batch (data/synthetic.py), summing the bytes of every distinct storage
``torch.autograd.graph.saved_tensors_hooks`` sees, parameters excluded. The per-image figure is
(bytes at batch 4 - bytes at batch 2) / 2, so nothing that does not grow with the batch counts.
Saved tensors are the same on any device, so the CPU measures what the GPU keeps (fp32 here;
bf16 halves every backbone alike). Also printed: the encoder's parameter count.

    python benchmarks/backbone_memory.py                 # views 224/224/112, K = 4 (the GPU table's)
    python benchmarks/backbone_memory.py --size 64 --k 2 # the tests' small views
    python benchmarks/backbone_memory.py --archs c4 --backbones resnet50,resnet152
"""

from __future__ import annotations

import argparse
import sys

import torch
from train_step import view_sizes  # benchmarks/train_step.py

from soco_pretrain.config import apply_overrides
from soco_pretrain.data.synthetic import synthetic_batch
from soco_pretrain.model import SoCoModel
from soco_pretrain.model.backbones import BACKBONES, backbone_info
from soco_pretrain.presets import load_preset

PRESETS = {"fpn": ("fpn-100ep", 3), "c4": ("c4-100ep", 2)}


def saved_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward of ``model``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model(batch)
    del loss
    return sum(seen.values())


def measure(backbone: str, arch: str, size: int, k: int) -> tuple[float, int]:
    """(saved MiB per image, encoder parameters) of ``backbone`` in ``arch``."""
    preset, n_views = PRESETS[arch]
    sizes = view_sizes(size)
    cfg = apply_overrides(
        load_preset(preset),
        [*(f"data.views.v{i + 1}_size={s}" for i, s in enumerate(sizes)), f"model.backbone={backbone}"],
    )
    torch.manual_seed(0)
    model = SoCoModel(cfg).train()
    per_batch = {}
    for b in (2, 4):
        batch = synthetic_batch(cfg.data.views, b, k, n_views)
        per_batch[b] = saved_bytes(model, batch)
    params = sum(p.numel() for p in model.encoder.parameters())
    return (per_batch[4] - per_batch[2]) / 2 / 2**20, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, help="V1/V2 size in px (default 224, the GPU table's)")
    parser.add_argument("--k", type=int, default=4, help="proposals per image (default 4, the GPU table's)")
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="comma-separated subset")
    parser.add_argument("--archs", default=",".join(PRESETS), help="comma-separated subset of fpn, c4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [n.strip() for n in args.backbones.split(",") if n.strip()]
    rows = []
    for arch in [a.strip() for a in args.archs.split(",") if a.strip() in PRESETS]:
        for name in names:
            info = backbone_info(name)
            if arch == "c4" and not info.bottleneck:
                continue  # config refuses c4 with a basic-block ResNet
            print(f"measuring {name} {arch} ...", file=sys.stderr, flush=True)
            mib, params = measure(name, arch, args.size, args.k)
            print(f"  {mib:.1f} MiB/image, {params / 1e6:.1f} M parameters", file=sys.stderr, flush=True)
            rows.append((arch, name, info.label, mib, params))
    reference = {arch: mib for arch, name, _, mib, _ in rows if name == "resnet50"}
    print(f"\nSaved activations per image, fp32, views {'/'.join(map(str, view_sizes(args.size)[:3]))}, K={args.k}:\n")
    print("| arch | backbone | label | MiB/image | x ResNet-50 | encoder parameters |")
    print("|---|---|---|---:|---:|---:|")
    for arch, name, label, mib, params in rows:
        ratio = f"{mib / reference[arch]:.2f}" if arch in reference else "-"
        print(f"| {arch} | {name} | {label} | {mib:.1f} | {ratio} | {params / 1e6:.1f} M |")
    print(f"\ntorch {torch.__version__}")


if __name__ == "__main__":
    main()
