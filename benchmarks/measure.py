"""Measuring instruments shared by the benchmarks: saved-activation bytes and robust step timing.

Saved activations are what autograd keeps alive between forward and backward, i.e. what grows
with the sequence and decides how long a sequence fits. ``saved_tensors_hooks`` sees every tensor
autograd saves; we count the storage each keeps alive, once (several ops may save the same one, and a
slice keeps its whole buffer), and leave out parameters, which autograd also saves but which do not
depend on the sequence.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of the memory a saved tensor keeps alive: its whole storage, not its view."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except RuntimeError:  # wrapper subclasses (e.g. async collective results) have no own storage
        return id(tensor), tensor.numel() * tensor.element_size()


@dataclass
class SavedBytes:
    """Bytes of distinct activation storages autograd saved inside a ``count_saved_activations`` block."""

    exclude: set[int]
    total: int = 0
    _seen: set[int] = field(default_factory=set)

    def add(self, tensor: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage(tensor)
        if key not in self.exclude and key not in self._seen and nbytes:
            self._seen.add(key)
            self.total += nbytes
        return tensor


@contextmanager
def count_saved_activations(model: torch.nn.Module) -> Iterator[SavedBytes]:
    """Count the bytes of every storage a tensor saved for backward keeps alive while the block runs.

    Whole storages, not view sizes: a saved slice of a big buffer keeps the whole buffer.

    Tensors that share storage with ``model``'s parameters (weights and their transposed views,
    which linear layers save) are left out: they do not depend on the sequence.
    """
    saved = SavedBytes(exclude={_storage(p)[0] for p in model.parameters()})
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
