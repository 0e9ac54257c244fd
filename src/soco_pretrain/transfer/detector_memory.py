"""The fine-tune detector's memory model: ``soco finetune``'s per-device batch for
``FinetuneOptions.per_device_batch: 0`` (auto). Pretraining's (measured on GPUs) is
``train/memory.py``.

The total batch (16, paper 4.2) and with it the lr and the schedule stay; the per-device batch x
processes x accumulation steps make it up (transfer/finetune.py). Peak resident memory
(/proc/self/status VmHWM) of a CPU process doing SGD steps of the fine-tune's Mask R-CNN v2
(transfer/detector.py, 81 classes, 20 instances with masks per image, RoI batch 512, fp32, one
thread; torch 2.14.1), two SGD steps per process, on random-pixel images of the given size
(padded to multiples of 32 as the detector does):

    320 x 533 px, padded 320 x 544 (0.174 MP):   2.18 GiB at batch 1, 3.09 at 2  -> 0.91 GiB/image
    800 x 1333 px, padded 800 x 1344 (1.075 MP): 4.62 GiB at batch 1, 6.99 at 2  -> 2.37 GiB/image

Fitted on these four points, with P the padded megapixels of one image:
    peak GiB = 1.38 + 1.09 P + batch x (0.63 + 1.62 P)
(a part that grows with the image but not with the batch, and one per image); the fit's fixed
part (1.08) is raised by 0.3 GiB so that it also bounds a fifth, middle point it was not fitted
on (640 x 1088 px, batch 2: 5.63 GiB measured, 5.36 from the plain fit). The default
recipe (800 px short side, long side <= 1333) thus needs about 40 GiB at batch 16 on a CPU, which
is why it was killed on a 24 GB machine. The estimate uses the largest short side and the
long-side cap; a batch of several images mixes orientations (nothing groups them by aspect ratio
as Detectron2's AspectRatioGroupedDataset does), so its images pad to max_size x max_size.

CUDA: not measured on a GPU here. The same figures serve as an estimate of the allocated memory
(the activations kept for the backward pass are the same tensors on either device), plus 1 GiB
for the CUDA context and the allocator's cache, checked against the card's total memory.
Detectron2's model zoo reports 3.4 GB per GPU at 2 images for its R50-FPN Mask R-CNN 1x (a
lighter box head), below what this estimate gives, so it errs on the safe side.
"""

from __future__ import annotations

FINETUNE_MEMORY = (1.38, 1.09, 0.63, 1.62)  # GiB: fixed, fixed per MP, per image, per image per MP
FINETUNE_CUDA_EXTRA_GIB = 1.0  # CUDA context and allocator cache (estimate)
FINETUNE_HEADROOM = 0.8  # fraction of the available memory the estimate may use (loader workers, pinned batches)


def _padded(side: int, divisor: int = 32) -> int:
    return -(-int(side) // divisor) * divisor  # torchvision's GeneralizedRCNNTransform pads to 32


def finetune_peak_gib(batch: int, megapixels: float) -> float:
    """The fitted CPU peak (GiB) of a fine-tune step of ``batch`` images padded to ``megapixels``."""
    fixed, fixed_mp, per_image, per_image_mp = FINETUNE_MEMORY
    return fixed + fixed_mp * megapixels + batch * (per_image + per_image_mp * megapixels)


def finetune_estimate_gib(batch: int, short: int, max_size: int, cuda: bool = False) -> float:
    """Estimated peak memory (GiB) of one fine-tune step of ``batch`` images on one device: one
    image at the largest short side and the long-side cap; several pad to max_size x max_size."""
    short_side, long_side = _padded(min(short, max_size)), _padded(max_size)
    pixels = (long_side * long_side if batch > 1 else short_side * long_side) / 1e6
    return finetune_peak_gib(batch, pixels) + (FINETUNE_CUDA_EXTRA_GIB if cuda else 0.0)


def auto_finetune_batch(per_process: int, memory_gib: float, short: int, max_size: int, cuda: bool = False) -> int:
    """The largest divisor of ``per_process`` (the total batch / processes) whose estimate stays
    within FINETUNE_HEADROOM of ``memory_gib``; 1 when none does."""
    for b in range(max(1, per_process), 0, -1):
        if per_process % b == 0 and finetune_estimate_gib(b, short, max_size, cuda) <= FINETUNE_HEADROOM * memory_gib:
            return b
    return 1


def cpu_available_gib(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> float | None:
    """Memory this process may still take (GiB): MemAvailable, capped by a cgroup v2 (or v1)
    limit less its usage; None where neither can be read (not Linux)."""
    found = []
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),  # cgroup v1
    ):
        try:
            with open(f"{cgroup}/{limit_file}") as f:
                limit = f.read().strip()
            with open(f"{cgroup}/{usage_file}") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            found.append(max(0, int(limit) - usage))
        break
    return min(found) / 2**30 if found else None
