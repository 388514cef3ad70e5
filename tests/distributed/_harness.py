"""Run a function on N local ranks (gloo, CPU, 127.0.0.1 only) and collect what each returns.

One spawn per call: the worker function runs many cases inside one process
group, so the start-up cost (a Python and torch import per rank) is paid once.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    world_size: int,
    port: int,
    outdir: str,
    fn: Callable[[int, int, Any], Any],
    payload: Any,
) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{HOST}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        result = fn(rank, world_size, payload)
    finally:
        dist.destroy_process_group()
    Path(outdir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def run_ranks(
    fn: Callable[[int, int, Any], Any],
    world_size: int,
    payload: Any = None,
    *,
    timeout: float = 240,
) -> list[Any]:
    """``[fn(rank, world_size, payload) for rank in range(world_size)]``, each in its own process.

    A hang (a collective that never completes) fails after `timeout` seconds
    with the processes killed, instead of blocking the test run.
    """
    with tempfile.TemporaryDirectory() as outdir:
        context = mp.start_processes(
            _entry,
            args=(world_size, free_port(), outdir, fn, payload),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for p in context.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{world_size} ranks did not finish in {timeout} s (a hang?)")
        return [pickle.loads(Path(outdir, f"rank{r}.pkl").read_bytes()) for r in range(world_size)]
