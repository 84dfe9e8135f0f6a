"""Measuring instruments shared by the benchmarks: saved-activation bytes and robust step timing.

Saved activations are what autograd keeps alive between forward and backward, i.e. what grows
with the sequence and decides how long a sequence fits. ``saved_tensors_hooks`` sees every tensor
autograd saves; we count each tensor once (several ops may save the same one) and leave out
parameters, which autograd also saves but which do not depend on the sequence.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def _storage_key(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except RuntimeError:  # wrapper subclasses (e.g. async collective results) have no own storage
        return id(tensor)


@dataclass
class SavedBytes:
    """Bytes of distinct activation tensors autograd saved inside a ``count_saved_activations`` block."""

    exclude: set[int]
    total: int = 0
    _seen: set[tuple[int, int]] = field(default_factory=set)

    def add(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = _storage_key(tensor)
        key = (storage, tensor.storage_offset())
        if storage not in self.exclude and key not in self._seen and tensor.numel():
            self._seen.add(key)
            self.total += tensor.numel() * tensor.element_size()
        return tensor


@contextmanager
def count_saved_activations(model: torch.nn.Module) -> Iterator[SavedBytes]:
    """Count (view-sized) bytes of every tensor saved for backward while the block runs.

    Tensors that share storage with ``model``'s parameters (weights and their transposed views,
    which linear layers save) are left out: they do not depend on the sequence.
    """
    saved = SavedBytes(exclude={_storage_key(p) for p in model.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(saved.add, lambda tensor: tensor):
        yield saved


@dataclass(frozen=True)
class Timing:
    median_s: float
    low_s: float
    high_s: float

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        return cls(statistics.median(samples), min(samples), max(samples))


def time_steps(step: Callable[[], None], repeats: int, warmup: int = 1, barrier: Callable[[], None] | None = None) -> Timing:
    """Median, min and max wall time of ``step`` over ``repeats`` runs after ``warmup`` runs.

    ``barrier`` (e.g. ``dist.barrier``) lines ranks up before each timed step so a step's time is
    the slowest rank's, as in training.
    """
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(repeats):
        if barrier is not None:
            barrier()
        start = time.perf_counter()
        step()
        if barrier is not None:
            barrier()
        samples.append(time.perf_counter() - start)
    return Timing.of(samples)
