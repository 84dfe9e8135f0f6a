"""Failing well: the same config on every rank, and a failure that names the rank that failed.

When one rank raises, the others are usually blocked in a collective: gloo/NCCL then fail with a
transport error (or a timeout) that says nothing about *why*. A failing rank therefore records its
error in the c10d store the process group already runs on, and a rank whose collective broke looks
the records up and says which rank failed first (or that none reported: killed or stuck).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from cp_plugin.compat import default_store, foreach_norm

log = logging.getLogger(__name__)

_FAILED = "cp_plugin/failed/"
NONFINITE_CHOICES = ("raise", "skip")
_TRANSPORT_ERRORS = ("Connection closed", "Connection reset", "timed out", "Timed out", "Broken pipe", "NCCL", "Gloo")


def config_fingerprint(**settings: Any) -> str:
    """A short hash of the settings every rank must agree on."""
    return hashlib.sha256(repr(sorted(settings.items())).encode()).hexdigest()[:16]


def check_same_config(**settings: Any) -> None:
    """Compare every rank's settings once at start-up; raise the same error everywhere if they differ."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (config_fingerprint(**settings), settings))
    reference = everyone[0]
    differing = [rank for rank, got in enumerate(everyone) if got[0] != reference[0]]
    if differing:
        raise ValueError(
            f"ranks {differing} were started with different settings than rank 0 (rank 0: {reference[1]}; rank "
            f"{differing[0]}: {everyone[differing[0]][1]}); launch every rank with the same config and command line"
        )


def is_transport_error(error: BaseException) -> bool:
    """A collective that broke because a peer went away or stopped answering."""
    return isinstance(error, dist.DistError) or any(marker in str(error) for marker in _TRANSPORT_ERRORS)


def record_failure(error: BaseException) -> None:
    """Leave this rank's error where its peers can read it (best effort: the store may be gone)."""
    try:
        default_store().set(f"{_FAILED}{dist.get_rank()}", f"{type(error).__name__}: {error}"[:500])
    except Exception:  # noqa: BLE001 - never mask the original error
        pass


def describe_failures(wait_s: float = 2.0) -> str:
    """Which ranks recorded a failure (waiting briefly for them to do so), for a peer's error message."""
    try:
        store, world = default_store(), dist.get_world_size()
        deadline = time.monotonic() + wait_s
        while True:
            failed = [r for r in range(world) if r != dist.get_rank() and store.check([f"{_FAILED}{r}"])]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not failed:
            return "no other rank reported an error: a rank was killed, ran out of memory, or is stuck"
        return "; ".join(f"rank {r} failed: {store.get(f'{_FAILED}{r}').decode()}" for r in failed)
    except Exception as err:  # noqa: BLE001 - the store lives on rank 0; it may be gone with it
        return (f"the failure store is unreachable ({type(err).__name__}): the launcher is shutting the job down, "
                "or the process hosting the store died")


def gradients_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite, decided alike on every rank.

    One fused norm over this rank's gradients. DDP leaves every rank the same gradients, so that is
    everyone's answer; FSDP2 leaves each rank a shard (DTensor), so one all-reduce of a flag over the
    shards' mesh (every rank: FSDP2 and HSDP shard over the whole world) makes a NaN in any shard stop
    (or skip) every rank's step.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    finite = torch.isfinite(torch.stack(foreach_norm(local))).all()
    if any(isinstance(g, DTensor) for g in grads):
        finite = finite.to(torch.int32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def check_nonfinite_option(on_nonfinite: str) -> None:
    """Validate an adapter's ``on_nonfinite`` setting before anything runs."""
    if on_nonfinite not in NONFINITE_CHOICES:
        raise ValueError(f"on_nonfinite={on_nonfinite!r} is not supported; use 'raise' or 'skip'")


def guard_step(optimizer: torch.optim.Optimizer, on_nonfinite: str, where: Callable[[], str], option: str) -> None:
    """Before an optimizer step: on non-finite gradients raise (naming ``where()`` and the ``option`` that
    skips instead) or drop every gradient so the step changes nothing. Every rank decides alike
    (:func:`gradients_finite`), so no rank steps while another raises or skips. ``where`` is only
    called on a failure: describing the step costs nothing on the steps that pass.
    """
    if gradients_finite(optimizer):
        return
    where = where()
    if on_nonfinite == "raise":
        raise FloatingPointError(
            f"non-finite gradients at {where}; find the bad batch, lower the learning rate, or pass {option} to skip "
            "such steps"
        )
    log.warning(f"skipping the optimizer step: non-finite gradients at {where}")
    optimizer.zero_grad(set_to_none=True)  # the optimizer steps no parameter without a gradient
