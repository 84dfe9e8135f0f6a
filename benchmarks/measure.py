"""Measuring instruments shared by the benchmarks: saved-activation bytes, peak memory, robust step timing.

Saved activations are what autograd keeps alive between forward and backward, i.e. what grows
with the sequence and decides how long a sequence fits. ``saved_tensors_hooks`` sees every tensor
autograd saves; we count the storage each keeps alive while it is alive, once (several ops may save
the same one, and a slice keeps its whole buffer), and leave out parameters, which autograd also
saves but which do not depend on the sequence.

Saved tensors are not all a step holds: transient buffers (a gathered KV, a received block, the
gradients being formed) come and go between them, and they are where a ring's p2p and all-gather
variants differ. :class:`PeakMemory` measures the high-water mark of every tensor the step
allocates, on any device, CPU included (which has no allocator statistics to read), and what was
live at that mark by kind: allocated in the forward (what the forward keeps: saved activations, or
a checkpointed model's block inputs), in the backward (recomputes and gradients), or inside a
:func:`phase` a benchmark names (attention, communication buffers).
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


class _LiveStorages:
    """Bytes of distinct storages that are still alive, and their high-water mark, by kind.

    A storage is known by its ``StorageImpl`` (``_cdata``) and forgotten when it is freed (a weakref
    callback), so a later storage at the same address is a new one, not a repeat. Each is counted
    under the kind it was allocated as; ``at_peak`` is the live bytes of each kind at the high-water mark.
    """

    def __init__(self, labelled: bool = False) -> None:
        self.live = 0
        self.peak = 0
        self.labelled = labelled  # keep a label per storage, and which were live at the high-water mark
        self._labels: dict[int, str] = {}
        self.labels_at_peak: dict[str, int] = {}
        self.allocated = 0  # every storage's bytes, freed or not: unlike the peak, not moved by when a buffer is freed
        self._sizes: dict[int, tuple[int, str]] = {}
        self.live_by_kind: dict[str, int] = {}
        self.at_peak: dict[str, int] = {}

    def add(self, storage: torch.UntypedStorage, kind: str = "all", label: str = "") -> None:
        key = storage._cdata
        if key in self._sizes or not storage.nbytes():
            return
        self._sizes[key] = (storage.nbytes(), kind)
        if self.labelled:
            self._labels[key] = label
        self.allocated += storage.nbytes()
        self.live += storage.nbytes()
        self.live_by_kind[kind] = self.live_by_kind.get(kind, 0) + storage.nbytes()
        if self.live > self.peak:
            self.peak, self.at_peak = self.live, dict(self.live_by_kind)
            if self.labelled:
                self.labels_at_peak = {}
                for live, (nbytes, _) in self._sizes.items():
                    name = self._labels[live]
                    self.labels_at_peak[name] = self.labels_at_peak.get(name, 0) + nbytes
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self._labels.pop(key, None)
        size, kind = self._sizes.pop(key)
        self.live -= size
        self.live_by_kind[kind] -= size


_PHASES: list[str] = []  # what the code running now is, innermost last (see ``phase``)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count what is allocated inside as ``name`` in :class:`PeakMemory` 's ``at_peak`` (innermost wins)."""
    _PHASES.append(name)
    try:
        yield
    finally:
        _PHASES.pop()


def current_kind() -> str:
    """The innermost :func:`phase`, else ``"backward"`` inside a backward pass (recomputes included), else
    ``"forward"``."""
    if _PHASES:
        return _PHASES[-1]
    return "backward" if torch._C._current_graph_task_id() != -1 else "forward"


class SavedBytes(_LiveStorages):
    """High-water mark of the distinct activation storages autograd holds for backward.

    ``total`` is the most that was held at once (at the end of the forward, for one step): a
    storage saved by several ops counts once, one freed before backward (a branch whose graph was
    dropped) stops counting, and parameters (``exclude``) never count.
    """

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude

    @property
    def total(self) -> int:
        return self.peak

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # Tensors saved while a backward runs (a recomputing backward) are not held between the passes.
        if torch._C._current_graph_task_id() == -1:
            for storage in storages(tensor):
                if storage._cdata not in self.exclude:
                    self.add(storage)
        return tensor


def storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages a tensor keeps alive (whole buffers, not views), through wrapper subclasses.

    diffusers' gathered outputs are ``AsyncCollectiveTensor`` wrappers: the memory is their inner tensor's.
    """
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [storage for name in names for storage in storages(getattr(tensor, name))]
    return [tensor.untyped_storage()]


@contextmanager
def count_saved_activations(model: torch.nn.Module) -> Iterator[SavedBytes]:
    """Track the storages kept alive by tensors saved for backward while the block runs.

    Whole storages, not view sizes: a saved slice of a big buffer keeps the whole buffer.

    Tensors that share storage with ``model``'s parameters (weights and their transposed views,
    which linear layers save) are left out: they do not depend on the sequence.
    """
    saved = SavedBytes(exclude={p.untyped_storage()._cdata for p in model.parameters()})
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
        yield saved


class PeakMemory(TorchDispatchMode):
    """High-water mark of the bytes held by tensors that ops allocate while the mode is active.

    Every op's output whose storage is new (not shared with an input: views and in-place ops
    allocate nothing) is counted until that storage is freed. Tensors that existed before the block
    (parameters, inputs) are not counted, so ``peak`` is what the measured code adds on top of them.
    Autograd runs CPU backward ops on the calling thread, so a backward inside the block is seen.
    Not seen: scratch memory a kernel or a communication backend allocates internally. With
    ``labelled``, ``labels_at_peak`` says which tensors were live at the mark, by the op and shape that
    made them (``benchmarks.peak_tensors``; slower: the live set is copied at every new mark).
    """

    def __init__(self, labelled: bool = False) -> None:
        super().__init__()
        self._storages = _LiveStorages(labelled)

    @property
    def peak(self) -> int:
        return self._storages.peak

    @property
    def live(self) -> int:
        return self._storages.live

    @property
    def allocated(self) -> int:
        """Bytes of every storage allocated, freed or not (a total that does not depend on when each was freed)."""
        return self._storages.allocated

    @property
    def at_peak(self) -> dict[str, int]:
        """Live bytes by kind (:func:`current_kind` when each was allocated) at the high-water mark."""
        return {kind: size for kind, size in self._storages.at_peak.items() if size}

    @property
    def labels_at_peak(self) -> dict[str, int]:
        """With ``labelled``: live bytes at the high-water mark by what made them (kind, op and shape)."""
        return self._storages.labels_at_peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {s._cdata for t in tensors for s in storages(t)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                for storage in storages(tensor):
                    if storage._cdata not in inputs:
                        label = f"{current_kind()}: {func} {tuple(tensor.shape)}" if self._storages.labelled else ""
                        self._storages.add(storage, current_kind(), label)
        return out


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
