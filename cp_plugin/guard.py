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


def nonfinite_gradients(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """A device flag: whether any gradient the optimizer would apply is not finite, alike on every rank
    (``None``: no gradients).

    One fused norm over this rank's gradients. DDP leaves every rank the same gradients, so that is
    everyone's answer; FSDP2 leaves each rank a shard (DTensor), so one all-reduce of the flag over the
    shards' mesh (every rank: FSDP2 and HSDP shard over the whole world) makes a NaN in any shard stop
    (or skip) every rank's step. Nothing is read back: the guard reads the flag with the step's others.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return None
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    nonfinite = (~torch.isfinite(torch.stack(foreach_norm(local))).all()).to(torch.int32)
    if any(isinstance(g, DTensor) for g in grads):
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
    return nonfinite


def gradients_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite, on every rank (reads the flag at once)."""
    nonfinite = nonfinite_gradients(optimizer)
    return nonfinite is None or not bool(nonfinite)


def check_nonfinite_option(on_nonfinite: str) -> None:
    """Validate an adapter's ``on_nonfinite`` setting before anything runs."""
    if on_nonfinite not in NONFINITE_CHOICES:
        raise ValueError(f"on_nonfinite={on_nonfinite!r} is not supported; use 'raise' or 'skip'")


class StepGuard:
    """The checks of one training step, read from the device once, just before its optimizer step.

    A host read (``bool``, ``.item()``) waits until the device has run everything queued before it,
    so the host stops queueing work and the device then idles. The step's checks are kept as device
    flags instead: the CP group's batches differ (``cp_plugin.batch.BatchCheck``), this rank's loss is
    not finite (:meth:`note_loss`, every micro-batch), a gradient is not finite; :meth:`check` packs
    them into one integer and reads that once. Every rank that shares the gradients decides alike, so
    no rank steps while another raises or skips.
    """

    BATCHES, GRADIENTS, LOSS = 1, 2, 4  # bits of the step's status

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []  # this rank's losses since the last check, detached

    def note_loss(self, loss: torch.Tensor) -> None:
        """Keep a micro-batch's loss for the step's check (nothing is computed or read yet)."""
        self._losses.append(loss.detach())

    def check(
        self,
        optimizer: torch.optim.Optimizer,
        on_nonfinite: str,
        where: Callable[[], str],
        option: str,
        batches: tuple[torch.Tensor, Callable[[], Exception]] | None = None,
    ) -> None:
        """Before an optimizer step, one host read: raise the batch check's error if the CP group's batches
        differed; on non-finite gradients raise (naming ``where()``, whose loss was not finite, and the
        ``option`` that skips instead) or drop every gradient so the step changes nothing. ``where`` is
        only called on a failure: describing the step costs nothing on the steps that pass.
        """
        losses, self._losses = self._losses, []
        status = self._status(optimizer, losses, batches)
        if batches is not None and status & self.BATCHES:
            raise batches[1]()
        if status & (self.GRADIENTS | self.LOSS):
            self._nonfinite(status, losses, optimizer, on_nonfinite, where(), option)

    def _status(
        self,
        optimizer: torch.optim.Optimizer,
        losses: list[torch.Tensor],
        batches: tuple[torch.Tensor, Callable[[], Exception]] | None,
    ) -> int:
        """The step's flags as bits of one integer, read from the device once (nothing to read: 0)."""
        flags = [(self.GRADIENTS, nonfinite_gradients(optimizer))]
        if batches is not None:
            flags.append((self.BATCHES, batches[0]))
        if losses:
            flags.append((self.LOSS, ~torch.stack([torch.isfinite(loss).all() for loss in losses]).all()))
        packed = [bit * flag.to(torch.int32) for bit, flag in flags if flag is not None]
        return int(sum(packed)) if packed else 0  # the step's one host read

    def _nonfinite(
        self, status: int, losses: list[torch.Tensor], optimizer: torch.optim.Optimizer, on_nonfinite: str,
        where: str, option: str,
    ) -> None:
        """Name a non-finite loss; on non-finite gradients raise, or drop them (reads more: failures only)."""
        if status & self.LOSS:
            bad = next(loss.tolist() for loss in losses if not bool(torch.isfinite(loss).all()))
            log.warning(f"non-finite loss {bad} at {where}")
        if losses:
            where += ": this rank's loss was not finite" if status & self.LOSS else ": another rank's loss was not"
        if not status & self.GRADIENTS:
            return
        if on_nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite gradients at {where}; find the bad batch, lower the learning rate, or pass {option} to "
                "skip such steps"
            )
        log.warning(f"skipping the optimizer step: non-finite gradients at {where}")
        optimizer.zero_grad(set_to_none=True)  # the optimizer steps no parameter without a gradient
