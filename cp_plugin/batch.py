"""Checks every adapter runs on a batch: the ranks of a CP group must hold the very same batch.

If they do not (a sampler over all ranks, augmentation seeded by global rank, ragged lengths),
context parallelism would silently stitch different samples into one sequence. A four-number
fingerprint all-gathered over the CP group catches it for the price of one tiny collective.

The check reads nothing back from the device on a steady step: the fingerprint is computed,
gathered and compared on the device, and the mismatch flag waits for the step's guard, which reads
it together with the loss and gradient checks (``cp_plugin.guard.StepGuard``). Shapes a rank has not
verified yet are compared at once instead (a host read on the first batch of each shape): ranks
holding different shapes would hand each other tensors of different sizes in the forward's
collectives, which hang rather than fail.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from functools import lru_cache, partial
from typing import Any

import torch
import torch.distributed as dist

from cp_plugin.compat import all_gather_single
from cp_plugin.mesh import ParallelMesh

Layout = tuple[tuple[tuple[int, ...], torch.dtype], ...]  # every tensor's shape and dtype, in batch order


def batch_tensors(batch: Any) -> list[torch.Tensor]:
    """Every tensor in ``batch``, through nested mappings, lists, tuples and dataclasses, in order."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        items = [getattr(batch, field.name) for field in dataclasses.fields(batch)]
    else:
        return []
    return [tensor for item in items for tensor in batch_tensors(item)]


def layout_of(tensors: list[torch.Tensor]) -> Layout:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


@lru_cache(maxsize=256)
def _digest(layout: Layout) -> float:
    """The layout as a number float64 holds exactly: 48 bits of a hash that every process computes alike."""
    return float(int.from_bytes(hashlib.blake2b(repr(layout).encode(), digest_size=6).digest(), "big"))


def fingerprint(tensors: list[torch.Tensor], layout: Layout, device: torch.device) -> torch.Tensor:
    """Tensor count, a digest of their ``layout``, sum and absolute sum: four float64 on ``device``.

    Made on the device from host numbers (``torch.full``, no copy from host memory) and the tensors'
    sums, so that building it waits for nothing the device is still doing.
    """
    head = [torch.full((), value, dtype=torch.float64, device=device)
            for value in (float(len(tensors)), _digest(layout))]
    values = [t.detach().to(device, torch.float64, non_blocking=True) for t in tensors]
    zero = torch.zeros((), dtype=torch.float64, device=device)
    total, absolute = sum((v.sum() for v in values), zero), sum((v.abs().sum() for v in values), zero)
    return torch.stack([*head, total, absolute])


def differs_across(mine: torch.Tensor, mesh: ParallelMesh) -> torch.Tensor:
    """A device flag: whether any rank of the CP group has another fingerprint (count and digest exactly,
    sums to 1e-9); the same on every rank of the group, since each compares the gathered fingerprints.
    NaN sums on every rank count as the same: a batch that is not finite everywhere is the loss check's to name."""
    everyone = torch.empty(mesh.cp_size * mine.numel(), dtype=mine.dtype, device=mine.device)
    all_gather_single(everyone, mine, group=mesh.cp_group)
    everyone = everyone.view(mesh.cp_size, -1)
    same_layout = (everyone[:, :2] == everyone[:1, :2]).all()
    same_sums = torch.isclose(everyone[:, 2:], everyone[:1, 2:], rtol=1e-9, atol=0.0, equal_nan=True).all()
    return ~(same_layout & same_sums)


def different_batches(mesh: ParallelMesh, layout: Layout) -> ValueError:
    """The error every rank of a CP group raises when its ranks were fed different batches."""
    return ValueError(
        f"the ranks of context-parallel group {dist.get_process_group_ranks(mesh.cp_group)} received different "
        f"batches (this rank {dist.get_rank()}: shapes {[shape for shape, _ in layout]}); every rank of a CP group "
        "must read the same samples: shard data over dp ranks only (the strategy/plugin's sampler does) and do not "
        "seed data augmentation by global rank"
    )


class BatchCheck:
    """Compares every batch across the CP group; the verdict on a steady step stays on the device.

    A batch whose layout (shapes, dtypes) this rank has not verified is decided at once, before any
    collective of the forward: one host read per new layout. A batch of a verified layout leaves its
    mismatch flag for :meth:`take` (the step's guard), and so does every further batch until then
    (gradient accumulation). A batch loaded with gradients disabled (evaluation) is decided at once:
    no optimizer step follows whose guard would read it.
    """

    def __init__(self) -> None:
        self._verified: set[Layout] = set()
        self._pending: torch.Tensor | None = None
        self._error: Callable[[], ValueError] | None = None

    def __call__(self, batch: Any, mesh: ParallelMesh, device: torch.device) -> None:
        tensors = batch_tensors(batch)
        layout = layout_of(tensors)
        differs = differs_across(fingerprint(tensors, layout, device), mesh)
        if layout not in self._verified or not torch.is_grad_enabled():
            if bool(differs):  # read now: no rank may enter the forward's collectives with other shapes
                raise different_batches(mesh, layout)
            self._verified.add(layout)
            return
        self._pending = differs if self._pending is None else self._pending | differs
        self._error = partial(different_batches, mesh, layout)

    def take(self) -> tuple[torch.Tensor, Callable[[], ValueError]] | None:
        """The mismatch flag of the batches since the last call, still on the device, and the error it means."""
        if self._pending is None or self._error is None:
            return None
        taken = (self._pending, self._error)
        self._pending = self._error = None
        return taken
