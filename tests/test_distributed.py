"""Distributed helpers: launcher variables, world size 1 without a process group, a real
2-process gloo all_reduce on CPU, a process that dies or hangs named in one line."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from soco_pretrain.engine import distributed as D
from soco_pretrain.engine.distributed import (
    DistInfo,
    DistributedError,
    RankLostError,
    all_reduce_mean,
    cleanup,
    first_host,
    init_distributed,
    is_main,
    parse_launch_env,
    stop_on_lost_ranks,
)

LAUNCH_VARS = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_JOB_ID",
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_world_size_one_has_no_process_group(clean_env):
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert info.device == torch.device("cpu") and info.backend is None and info.launcher == "none"
    assert not dist.is_initialized()
    x = torch.tensor([1.0, 3.0])
    assert all_reduce_mean(x) is x and is_main()
    cleanup()  # safe without a group


def test_torchrun_world_size_one_has_no_process_group(clean_env):
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        clean_env.setenv(name, value)
    info = init_distributed(device="cpu")
    assert info.world_size == 1 and info.launcher == "torchrun" and not dist.is_initialized()


def test_parse_torchrun_env():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29400",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
    }  # torchrun inside a SLURM allocation: torchrun wins
    launch = parse_launch_env(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 5, 8, 1)
    assert (launch.master_addr, launch.master_port) == ("node0", 29400)


def test_parse_slurm_env_with_master_from_env():
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "12345",
        "SLURM_JOB_NODELIST": "gpu[1-2]",
    }
    launch = parse_launch_env(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", 3, 4, 1)
    assert (launch.master_addr, launch.master_port) == ("10.0.0.1", 12345)


def test_parse_slurm_env_master_from_nodelist(monkeypatch):
    monkeypatch.setattr(D.shutil, "which", lambda name: None)  # no scontrol on this machine
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "16",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_NODELIST": "gpu[007-009,012],cpu1",
        "SLURM_JOB_ID": "123456",
    }
    launch = parse_launch_env(env)
    assert launch.world_size == 8  # this srun step's tasks, not the whole allocation's
    assert launch.master_addr == "gpu007"
    assert launch.master_port == 15000 + 123456 % 20000


def test_slurm_uses_scontrol_when_available(monkeypatch):
    class Result:
        returncode, stdout = 0, "nodeA\nnodeB\n"

    calls = []
    monkeypatch.setattr(D.shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(D.subprocess, "run", lambda args, **kw: calls.append(args) or Result())
    launch = parse_launch_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[A-B]"})
    assert launch.master_addr == "nodeA" and calls == [["/usr/bin/scontrol", "show", "hostnames", "node[A-B]"]]


def test_slurm_without_any_address_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(D.shutil, "which", lambda name: None)
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        parse_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    with pytest.raises(DistributedError, match="MASTER_ADDR"):
        parse_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a[1-2]b[3-4]"})


def test_single_slurm_task_needs_no_address():
    launch = parse_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (launch.launcher, launch.world_size, launch.master_addr) == ("slurm", 1, None)


def test_no_launcher():
    assert parse_launch_env({}) == D.LaunchEnv("none", 0, 1, 0)


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node1", "node1"),
        ("node1,node2", "node1"),
        ("gpu[003-005]", "gpu003"),
        ("gpu[9,3-4],x[1-2]", "gpu9"),
        ("rack[2-3]-n", "rack2-n"),
        ("", None),
        ("a[1-2]b[3]", None),
    ],
)
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_bad_values_are_clear_errors():
    with pytest.raises(DistributedError, match="RANK"):
        parse_launch_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="rank 2 of world size 2"):
        init_distributed(device="cpu", env={"RANK": "2", "WORLD_SIZE": "2"})


def _worker(rank: int, world: int, port: int, launcher: str, results) -> None:
    # Each process sets its launcher's variables as torchrun / srun would.
    if launcher == "torchrun":
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    else:
        env = {
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": str(world),
            "SLURM_LOCALID": str(rank),
            "SLURM_JOB_NODELIST": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    os.environ.update(env)
    info = init_distributed(device="cpu")
    try:
        mean = all_reduce_mean(torch.tensor([float(rank), 10.0 * rank + 1.0]))
        count = all_reduce_mean(torch.tensor(rank + 1))  # integers come back as float64
        results.put((rank, info.backend, info.is_main, is_main(), mean.tolist(), count.item()))
    finally:
        cleanup()


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_process_gloo_all_reduce_mean(launcher):
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, free_port(), launcher, results), nprocs=2, join=True, start_method="spawn")
    got = sorted(results.get() for _ in range(2))
    assert got == [
        (0, "gloo", True, True, [0.5, 6.0], 1.5),
        (1, "gloo", False, False, [0.5, 6.0], 1.5),
    ]


def test_cleanup_leaves_a_process_group_it_did_not_create(clean_env, tmp_path):
    # A caller's own process group (world size 1 here, file:// rendezvous) survives a library
    # run's init_distributed / cleanup (what pretrain and finetune do), and stays usable.
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        info = init_distributed(device="cpu")
        assert not info.owns_group
        cleanup()
        assert dist.is_initialized()
        x = torch.tensor([2.0])
        dist.all_reduce(x)
        assert x.item() == 2.0
    finally:
        dist.destroy_process_group()
    cleanup()  # nothing left: safe


def _owner_worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    info = init_distributed(device="cpu")
    again = init_distributed(device="cpu")  # joins the same group: still ours
    cleanup()
    results.put((rank, info.owns_group, again.owns_group, dist.is_initialized()))


def test_cleanup_destroys_the_group_init_distributed_created():
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_owner_worker, args=(2, free_port(), results), nprocs=2, join=True, start_method="spawn")
    assert sorted(results.get() for _ in range(2)) == [(0, True, True, False), (1, True, True, False)]


def _lost_worker(rank: int, port: int, how: str, results) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    info = init_distributed(device="cpu", timeout_s=2.0)
    try:
        with stop_on_lost_ranks(info, 2.0, then="; rerun"):
            dist.all_reduce(torch.ones(1))  # both answer once
            if rank == 1:
                if how == "dies":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(60)  # hangs: answers nothing (the test kills it)
            started = time.monotonic()
            dist.all_reduce(torch.ones(1))
    except RankLostError as exc:
        results.put((rank, str(exc), time.monotonic() - started))
    finally:
        cleanup()


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_is_named_in_one_line(how):
    # Before: a dead peer was a gloo traceback naming an address ("Connection closed by peer
    # [127.0.0.1]:8358"), a hung one a 30-minute wait (gloo's default timeout).
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_lost_worker, args=(rank, port, how, results)) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        procs[0].join(60)
        assert procs[0].exitcode == 0 and not results.empty()
        rank, message, seconds = results.get()
    finally:
        procs[1].kill()
        procs[1].join()
    reason = "its connection closed" if how == "dies" else "no reply within train.dist_timeout_s=2 s"
    assert (rank, message) == (0, f"rank 1 of 2 stopped answering ({reason}); rank 0 stops too; rerun")
    assert seconds < 2.0 + 2.0 + 5.0  # the timeout (a hang), the roll call, slack for a loaded machine


def test_other_errors_pass_and_a_lost_store_is_named():
    two = DistInfo(1, 2, 1, torch.device("cpu"), False, "torchrun", "gloo")
    with pytest.raises(KeyError):  # not a collective's failure: unchanged
        with stop_on_lost_ranks(two, 5.0):
            raise KeyError("x")
    one = DistInfo(0, 1, 0, torch.device("cpu"), True)
    with pytest.raises(RuntimeError, match="Connection reset by peer"):  # no process group: unchanged
        with stop_on_lost_ranks(one, 5.0):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer")
    # No store to call the roll through (here: no process group at all; in a job: rank 0 died
    # with the store it held).
    with pytest.raises(RankLostError) as info:
        with stop_on_lost_ranks(two, 5.0):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer")
    assert str(info.value) == (
        "rank 0 or the launcher holding the rendezvous store stopped answering (its connection closed); "
        "rank 1 stops too"
    )
