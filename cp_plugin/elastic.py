"""A default process group that survives ``torchrun --max-restarts``.

torchrun's c10d rendezvous shares one TCP store, hosted by its agent, across every attempt of a run,
and workers join the default process group through it with keys that do not name the attempt. After a
restart the new workers may read the addresses the dead attempt's workers left under those keys, and
gloo (or NCCL) fails with "Connection refused" or hangs, depending on which rank writes first. Joining
through the same store with the attempt number as a key prefix keeps the attempts apart.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def attempt_store(timeout: timedelta) -> dist.Store | None:
    """The agent's store seen through an ``attempt_<n>/`` prefix, or ``None`` outside torchelastic's shared store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def init_for_restarts(backend: str, rank: int, world_size: int, timeout: timedelta, device: torch.device) -> None:
    """Create the default process group through :func:`attempt_store` when torchelastic shares its store
    (a later ``init_process_group`` call by the framework then finds it made); otherwise do nothing."""
    store = attempt_store(timeout)
    if store is None or dist.is_initialized():
        return
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device if device.type != "cpu" else None)
