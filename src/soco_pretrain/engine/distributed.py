"""Plain ``torch.distributed`` set-up for torchrun and SLURM launches.

* ``torchrun`` (one node or many) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
* ``srun`` (SLURM) sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the rendezvous address is
  MASTER_ADDR/MASTER_PORT when set, else the job's first node (``scontrol show hostnames``) and
  a port derived from the job id.
* Otherwise (plain ``python``/``soco``): one process.

With one process there is no process group at all and the model keeps plain BatchNorm (the
released code crashed converting to SyncBN on one GPU). Backends: nccl on CUDA, gloo on CPU.

Ownership: :func:`cleanup` destroys only the process group :func:`init_distributed` created. A
group that already existed (a caller's own ``init_process_group``, e.g. a notebook or a test
harness calling ``pretrain``) is joined as it is and left alone: its creator destroys it.

A process that dies or hangs: collectives wait at most ``timeout_s`` (``train.dist_timeout_s``;
gloo alone would wait 30 minutes), and a death is seen at once on gloo (its connections close).
:func:`stop_on_lost_ranks` turns that failure into one :class:`RankLostError` line naming the
ranks that did not answer a roll call through the rendezvous store. With nccl a timeout is
handled by torch's watchdog, which ends the process itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import RunError, SocoError

DEFAULT_PORT = 29500  # torchrun's default rendezvous port
# How long the survivors of a failed collective wait for each other's answer to the roll call
# (at most the collective timeout): they see the failure within a few seconds of each other.
ROLL_CALL_S = 10.0

_created: list = []  # the default process group init_distributed created (at most one), for cleanup
_groups = [0]  # process groups init_distributed created in this process: roll-call keys of one group


class DistributedError(RunError):
    """A launch environment we cannot use; the message says what to set."""


class RankLostError(RunError):
    """Another process of the job died or stopped answering a collective; one line naming its
    rank(s). The run's checkpoints are intact: rerunning the command resumes."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    launcher: str = "none"  # "torchrun" | "slurm" | "none"
    backend: str | None = None  # None: no process group (world size 1)
    owns_group: bool = False  # init_distributed created the process group (cleanup destroys it)


@dataclass(frozen=True)
class LaunchEnv:
    """The launcher's variables, parsed (see :func:`parse_launch_env`)."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedError(f"environment variable {name}={env[name]!r} is not an integer") from None


def parse_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address from the launcher's variables.

    torchrun's variables win over SLURM's (torchrun run inside a SLURM allocation). The
    rendezvous address is only resolved for SLURM jobs with more than one task.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        port = env.get("MASTER_PORT")
        return LaunchEnv(
            "torchrun",
            _int(env, "RANK"),
            _int(env, "WORLD_SIZE"),
            _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            env.get("MASTER_ADDR"),
            int(port) if port else None,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # SLURM_STEP_NUM_TASKS is the size of this srun step (SLURM_NTASKS: the whole allocation).
        world_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world = _int(env, world_key)
        rank = _int(env, "SLURM_PROCID")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if world == 1:
            return LaunchEnv("slurm", rank, world, local)
        addr = env.get("MASTER_ADDR") or _slurm_first_host(env)
        slurm_port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else _slurm_port(env)
        return LaunchEnv("slurm", rank, world, local, addr, slurm_port)
    return LaunchEnv("none", 0, 1, 0)


def _slurm_port(env: Mapping[str, str]) -> int:
    # Our choice: two jobs whose first node is the same must not pick the same port.
    job = env.get("SLURM_JOB_ID", "")
    return 15000 + int(job) % 20000 if job.isdigit() else DEFAULT_PORT


def _slurm_first_host(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise DistributedError(
            "SLURM launch without MASTER_ADDR or SLURM_JOB_NODELIST: set MASTER_ADDR to the first node's address"
        )
    scontrol = shutil.which("scontrol")
    if scontrol:
        result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
        hosts = result.stdout.split()
        if result.returncode == 0 and hosts:
            return hosts[0]
    host = first_host(nodelist)
    if host is None:
        raise DistributedError(
            f"cannot find the first host of SLURM_JOB_NODELIST={nodelist!r} (no scontrol here): "
            "set MASTER_ADDR (and MASTER_PORT) to the first node's address"
        )
    return host


def first_host(nodelist: str) -> str | None:
    """First host of a SLURM node list such as ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``.

    Handles one bracket group in the first entry (the common forms); returns None otherwise.
    """
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first entry
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    if not entry:
        return None
    if "[" not in entry:
        return entry if "]" not in entry else None
    m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", entry)
    if m is None:
        return None
    first = m.group(2).split(",")[0].split("-")[0].strip()
    return f"{m.group(1)}{first}{m.group(3)}" if first else None


def init_distributed(
    device: str | None = None, env: Mapping[str, str] | None = None, timeout_s: float | None = None
) -> DistInfo:
    """Join the job described by the launcher's environment variables (see module docstring).

    ``device``: "cuda" or "cpu" to force one (default: CUDA when available). One process: no
    process group, device cuda:0/cpu. Several: ``init_process_group`` (nccl on CUDA, gloo on
    CPU) with this process on ``cuda:LOCAL_RANK``, unless a process group exists already (it is
    used as it is). Calling it again returns the same answer. ``owns_group``: this call or an
    earlier one created the group, which :func:`cleanup` then destroys (and only then).
    ``timeout_s``: how long a collective (and the rendezvous) waits for the other processes
    (None: torch's default, 30 minutes for gloo).
    """
    launch = parse_launch_env(env)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise DistributedError("device 'cuda' requested but CUDA is not available")
    if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
        raise DistributedError(f"bad launch: rank {launch.rank} of world size {launch.world_size}")

    if launch.world_size == 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return DistInfo(0, 1, 0, dev, True, launch.launcher, None)

    if use_cuda:
        if launch.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {launch.local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                "start one process per GPU (torchrun --nproc-per-node / srun --ntasks-per-node)"
            )
        dev = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"

    if not dist.is_initialized():
        if launch.master_addr is None or launch.master_port is None:
            raise DistributedError("MASTER_ADDR and MASTER_PORT must be set for a multi-process launch")
        # torchrun: env:// (the standard path; it reuses torchrun's own store where torchrun
        # provides one). SLURM: an explicit tcp:// address, nothing written to os.environ.
        if launch.launcher == "torchrun" and env is None:
            init_method = "env://"
        else:
            init_method = f"tcp://{_url_host(launch.master_addr)}:{launch.master_port}"
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=None if timeout_s is None else timedelta(seconds=timeout_s),  # None: torch's default
        )
        _created[:] = [_default_group()]
        _groups[0] += 1
    owns = bool(_created) and _created[0] is _default_group()
    return DistInfo(
        launch.rank, launch.world_size, launch.local_rank, dev, launch.rank == 0, launch.launcher, backend, owns
    )


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr  # IPv6 literal


def _default_group():
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def cleanup() -> None:
    """Destroy the process group if :func:`init_distributed` created it (safe to call always).

    A group created elsewhere (before ``init_distributed`` joined it, or after ours was destroyed)
    stays initialised: its creator destroys it.
    """
    group = _default_group()
    owned = bool(_created) and group is not None and _created[0] is group
    _created.clear()
    if owned:
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and whenever there is no process group)."""
    return get_rank() == 0


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (a new tensor; the input itself when world size is 1).

    Asynchronous on the device like any collective: no host sync unless the caller reads it.
    """
    world = get_world_size()
    if world == 1:
        return tensor
    out = tensor.detach().clone() if tensor.is_floating_point() else tensor.detach().double()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(world)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (a new tensor; the input itself when world size is 1).

    Asynchronous on the device like any collective: no host sync unless the caller reads it.
    """
    if get_world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if get_world_size() > 1:
        dist.barrier()


# What a collective raises when a peer is gone: gloo's connection and timeout errors are plain
# RuntimeErrors naming gloo's sources; torch's own are DistError subclasses.
_PEER_LOST = re.compile(r"gloo/|Connection (closed|reset) by peer|Timed out waiting|Broken pipe")


@contextmanager
def stop_on_lost_ranks(info: DistInfo, timeout_s: float | None, then: str = "") -> Iterator[None]:
    """Turn a collective that failed because another process died or hung into one
    :class:`RankLostError` line naming the ranks that did not answer the roll call (``then``:
    what to do next, appended). Without a process group, or for any other error, nothing changes.
    """
    try:
        yield
    except Exception as exc:
        if info.world_size == 1 or isinstance(exc, SocoError) or not _peer_lost(exc):
            raise
        lost = _roll_call(info, min(ROLL_CALL_S, timeout_s or ROLL_CALL_S))
        if re.search("timed out|timeout", str(exc), re.IGNORECASE):
            how = f"no reply within train.dist_timeout_s={timeout_s:g} s" if timeout_s else "timed out"
        else:
            how = "its connection closed"
        if lost is None:
            who = "rank 0 or the launcher holding the rendezvous store stopped answering"
        elif lost:
            ranks = ", ".join(map(str, lost))
            who = f"rank{'s' if len(lost) > 1 else ''} {ranks} of {info.world_size} stopped answering"
        else:  # everyone answered: the network between two live processes failed
            who = f"a collective failed although all {info.world_size} processes answer"
        raise RankLostError(f"{who} ({how}); rank {info.rank} stops too{then}") from exc


def _peer_lost(exc: BaseException) -> bool:
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and bool(_PEER_LOST.search(str(exc))))


def _roll_call(info: DistInfo, window_s: float) -> list[int] | None:
    """The ranks that did not check in through the rendezvous store within ``window_s`` (each
    survivor writes its key, then polls for the others'; ``check`` rather than ``wait``: a
    store wait that times out prints socket warnings). None when the store is unreachable."""
    try:
        store = dist.distributed_c10d._get_default_store()
        key = f"soco/roll-call/{_groups[0]}/{{}}".format
        store.set(key(info.rank), "1")
        pending = [r for r in range(info.world_size) if r != info.rank]
        deadline = time.monotonic() + window_s
        while pending:
            pending = [r for r in pending if not store.check([key(r)])]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        return pending
    except (RuntimeError, ValueError):  # store gone (its host died), or no default group any more
        return None
