"""One small launcher for every multi-process test: real processes, gloo, a deadline, results back.

Processes come from a ``forkserver`` that has already imported torch, diffusers and lightning, so
a 4-rank test starts in a fraction of a second instead of re-importing everything per rank (this
suite runs on 2 cores). Each rank gets torchrun's environment variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so code under test sees exactly what a user's
``torchrun`` gives it: Lightning's Trainer and Accelerate pick the process group up from there.

A rank that raises sends its traceback; the parent gives the others ``ERROR_GRACE_S`` to send theirs
(the first to fail is not always the cause: a rank whose peer failed first may report only a reset
connection), then kills them, so a failing rank never leaves the suite hanging, and a rank that is
silent past ``timeout`` fails the test.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_PRELOAD = ["torch", "torch.distributed", "diffusers", "lightning", "cp_plugin"]
ERROR_GRACE_S = 5.0  # after one rank fails, how long the others may take to report their own errors


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for one rank on one node."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "NODE_RANK": "0",
    }


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    init_process_group: bool,
    pg_timeout_s: float,
    results: Any,
) -> None:
    os.environ.update(torchrun_env(rank, world_size, port))
    torch.set_num_threads(1)
    try:
        if init_process_group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s))
        out = fn(*args)
        results.put((rank, "ok", _serialize(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if init_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _later_errors(results: Any, pending: int) -> dict[int, str]:
    """The errors of up to ``pending`` more ranks that report one within ``ERROR_GRACE_S``."""
    errors: dict[int, str] = {}
    end = time.monotonic() + ERROR_GRACE_S
    while len(errors) < pending and (left := end - time.monotonic()) > 0:
        try:
            rank, status, payload = results.get(timeout=left)
        except queue.Empty:
            break
        if status == "error":
            errors[rank] = payload
    return errors


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 240.0,
    init_process_group: bool = True,
    pg_timeout_s: float = 60.0,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh processes and return each rank's result, rank order.

    ``fn`` must be importable (a module-level function). With ``init_process_group`` the default
    gloo group is ready when ``fn`` starts; otherwise ``fn`` (e.g. a Lightning Trainer) makes it.
    Raises ``RuntimeError`` with the tracebacks of the ranks that failed, or ``TimeoutError``.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, fn, args, init_process_group, pg_timeout_s, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(collected))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in collected]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
                continue
            if status == "error":
                errors = {rank: payload, **_later_errors(results, world_size - len(collected) - 1)}
                raise RuntimeError("\n".join(f"rank {r} failed:\n{p}" for r, p in sorted(errors.items())))
            collected[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(timeout=10)
    return [collected[rank] for rank in range(world_size)]
