"""Speed settings ``soco pretrain`` applies itself: cuDNN autotuning, TF32, torch.compile and its mode.

Every one is a ``train.*`` key (config.py says what each does and why it is the default), resolved
here for the device the job runs on, applied once when the job's model is built
(``loop.model_parts``: training and the step benchmarks alike, so ``benchmarks/gpu.py`` times the
settings a user gets) and named in the start-up line. CPUs get none of them: cuDNN and TF32 do
not exist there, and compiling costs minutes for little.

The process-wide flags (``torch.backends.cudnn.benchmark``, the TF32 switches) are set, never
reset: one training job per process, as ``soco pretrain`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._dynamo.exc import BackendCompilerFailed

from ..config import ConfigError, auto_bool
from ..errors import UserError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Speed:
    """The resolved settings of one job."""

    compile: bool
    compile_mode: str  # meaningful when compile is True
    cudnn_benchmark: bool
    tf32: bool
    prefetch: bool  # the next batch prepared on a side CUDA stream

    @property
    def cuda_graphs(self) -> bool:
        """The compiled step is replayed as CUDA graphs (compile modes reduce-overhead / max-autotune)."""
        return self.compile and self.compile_mode in ("reduce-overhead", "max-autotune")

    def describe(self) -> str:
        """For the start-up line, e.g. 'torch.compile (reduce-overhead: CUDA graphs), cudnn.benchmark, TF32'."""
        parts = []
        if self.compile:
            graphs = ": CUDA graphs" if self.cuda_graphs else ""
            mode = "" if self.compile_mode == "default" else f" ({self.compile_mode}{graphs})"
            parts.append(f"torch.compile{mode}")
        if self.cudnn_benchmark:
            parts.append("cudnn.benchmark")
        if self.tf32:
            parts.append("TF32")
        if self.prefetch:
            parts.append("prefetch stream")
        return ", ".join(parts)


def _tristate(key: str, value, default: bool) -> bool:
    """A true/false/auto setting (None = auto; the strings an older config.yaml holds read as
    such) resolved for this device: ``default`` when auto."""
    try:
        chosen = auto_bool(key, value)
    except ConfigError:
        raise UserError(f"train.{key}={value!r}: expected true, false or null (auto)") from None
    return default if chosen is None else chosen


def resolve_compile(value, device) -> bool:
    """``train.compile``: null = auto (on for CUDA, where benchmarks/gpu.py measured 1.5x images/s
    for the FPN step; off on CPUs, where compiling costs minutes for little) | true | false."""
    return _tristate("compile", value, torch.device(device).type == "cuda")


def resolve_speed(train_cfg, device) -> Speed:
    """The settings ``train_cfg`` (a TrainConfig) asks for on ``device``."""
    cuda = torch.device(device).type == "cuda"
    mode = train_cfg.compile_mode
    if mode not in COMPILE_MODES:
        raise UserError(f"train.compile_mode={mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    return Speed(
        compile=resolve_compile(train_cfg.compile, device),
        compile_mode=mode,
        cudnn_benchmark=cuda and _tristate("cudnn_benchmark", train_cfg.cudnn_benchmark, True),
        tf32=cuda and bool(train_cfg.tf32),
        prefetch=cuda and bool(train_cfg.prefetch),
    )


def apply_speed(speed: Speed) -> None:
    """Set the process-wide flags ``speed`` names (CUDA only; nothing to set on a CPU)."""
    if not torch.cuda.is_available():
        return
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = speed.tf32
    torch.backends.cudnn.allow_tf32 = speed.tf32


def compiled(model, mode: str = "default"):
    """torch.compile(model, mode=mode), falling back to eager (with a one-line note) if compiling
    fails, e.g. where no compiler toolchain is installed: a slower run beats no run."""
    fast = torch.compile(model, mode=None if mode == "default" else mode)
    state = {"fn": fast}

    def forward(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - only compiler failures fall back; the rest re-raise
            if state["fn"] is model or not isinstance(exc, BackendCompilerFailed):
                raise
            print(
                f"note: torch.compile failed ({type(exc).__name__}); training without it "
                "(--set train.compile=false silences this)",
                flush=True,
            )
            state["fn"] = model
            return model(*args, **kwargs)

    return forward


def mark_step_begin(speed: Speed) -> None:
    """Before each forward of a CUDA-graph-replayed model: tells torch that the previous step's
    outputs are dead, so the graphs' static output buffers may be reused (else every step would
    allocate and warn)."""
    if speed.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
