"""Exact resume under Lightning: what its checkpoint lacks for a multi-rank run to continue bit for bit.

Lightning saves model, optimizer, schedulers and loop counters, but not random-number states, and
rank 0 writes the file, while under CP every dp replica draws its own noise. We add every rank's RNG
state (gathered into rank 0's checkpoint) and restore each rank's own just before its first step.

The data position is the number of batches the fit loop has *processed* in the current epoch,
taken from the loop's progress counters when the checkpoint is written. The loader cannot know it:
Lightning fetches one batch ahead, and once ``fit`` ends it resets the loader's iterator, so a
``trainer.save_checkpoint`` after ``fit`` would see a fresh epoch. A resumed loader then leaves out
that many batches of the epoch's index order (:class:`SkipFirst`), which costs no data loading and
works with any number of workers. The position lives in our own entry of the checkpoint, so the
file still loads into a plain one-process run. Every rank of a CP group draws the same numbers, so
RNG streams and data position belong to dp ranks: a run with the same dp degree continues them
whatever its ring / ulysses degrees and world size (each rank takes the state of a saved rank with
its dp rank). A checkpoint from another dp degree still loads (weights, optimizer), with RNG and data
position restarting from the seed and the epoch's start. Lightning's own loop state is read and
rewritten through ``cp_plugin.compat`` (its layout is private).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from cp_plugin.compat import batches_processed, pop_loader_states, put_loader_states, reopen_interrupted_epoch
from cp_plugin.resume import rng_state

KEY = "cp_plugin"


def layout_state(world_size: int, dp_size: int, checkpoint: dict[str, Any], dp_rank: int | None = None) -> dict[str, Any]:
    """Every rank's RNG state, the layout it belongs to, and the loaders' mid-epoch position.

    Also reopens an epoch that ``fit`` left unfinished (``compat.reopen_interrupted_epoch``), so the
    position counts batches of the right epoch.

    The position moves out of Lightning's loop state into ours: a one-process ``Trainer`` with a plain
    ``DataLoader`` refuses a checkpoint holding a loader state it has no stateful loader for, and the
    position counts one dp rank's batches, meaningful only under the same dp degree. ``dp_rank`` (this
    rank's) is recorded with each state, so a run with the same dp degree under another CP layout finds
    its stream. Collective: call on every rank.
    """
    reopen_interrupted_epoch(checkpoint)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, (dp_rank, rng_state()))
    states = [state for _, state in gathered]
    dp_ranks = [rank for rank, _ in gathered]
    loaders = pop_loader_states(checkpoint)
    if loaders is not None:
        position = batches_processed(checkpoint)
        loaders = [{**state, "batches": position} if ResumableLoader.owns(state) else state for state in loaders]
    layout = {"world_size": world_size, "dp_size": dp_size, "rng_states": states, "loader": loaders}
    return layout if None in dp_ranks else {**layout, "dp_ranks": dp_ranks}


def rng_state_to_restore(checkpoint: dict[str, Any], world_size: int, dp_size: int, rank: int,
                         dp_rank: int | None = None) -> dict | None:
    """This rank's saved RNG state, with the loader position put back, if the checkpoint has our dp degree.

    The state is that of the first saved rank with this ``dp_rank`` (the ranks of a CP group hold the
    same streams), so ring / ulysses degrees and the world size may differ; a checkpoint that did not
    record dp ranks must match the world size, and gives rank ``rank`` 's state. Returns ``None``
    when the dp degree changed (or the file comes from elsewhere): RNG streams restart from the seed
    and the data from the epoch's start.
    """
    saved = checkpoint.get(KEY)
    state = None
    if saved is not None and saved["dp_size"] == dp_size:
        if dp_rank is not None and "dp_ranks" in saved:
            state = saved["rng_states"][saved["dp_ranks"].index(dp_rank)]
        elif saved["world_size"] == world_size:
            state = saved["rng_states"][rank]
    if state is not None:
        if saved.get("loader") is not None:
            put_loader_states(checkpoint, saved["loader"])
        return state
    pop_loader_states(checkpoint)  # e.g. from a plain Lightning run
    return None


class SkipFirst:
    """A (batch) sampler whose next pass leaves out its first ``skip`` items: a resumed epoch's rest.

    Indices are drawn in the main process whatever ``num_workers`` is, so skipping them costs no
    data loading. Other attributes (``sampler``, ``set_epoch``) are the wrapped sampler's, so
    Lightning still sets the epoch of a ``DistributedSampler`` inside.
    """

    def __init__(self, indices: Iterable[Any]) -> None:
        self.indices = indices
        self.skip = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0  # only the resumed epoch is shortened
        return itertools.islice(iter(self.indices), skip, None)

    def __len__(self) -> int:
        return len(self.indices)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "indices":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.indices, name)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` Lightning treats as resumable (``state_dict`` / ``load_state_dict``).

    Its state is the number of batches to leave out when the interrupted epoch resumes. The loader
    reports ``None``: only the fit loop knows how many batches it processed (:func:`layout_state`
    fills it in).
    """

    def state_dict(self) -> dict[str, Any]:
        return {"batches": None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        skipper = self.batch_sampler if isinstance(self.batch_sampler, SkipFirst) else self.sampler
        batches = state.get("batches") or 0
        skipper.skip = batches if batches < len(skipper) else 0  # a finished epoch resumes at the next one

    @staticmethod
    def owns(state: Any) -> bool:
        """Whether a saved loader state is one of ours (others' states are kept as they are)."""
        return isinstance(state, dict) and set(state) == {"batches"}


def resumable(loader: DataLoader) -> DataLoader:
    """The same loader as a :class:`ResumableLoader` (mid-epoch position restored on resume).

    Custom loader classes and iterable datasets are returned unchanged: their order is not ours to skip.
    """
    if type(loader) is not DataLoader or isinstance(loader.dataset, IterableDataset):
        return loader
    if loader.batch_sampler is not None:  # automatic batching: a batch size or a custom batch sampler
        batching: dict[str, Any] = {"batch_sampler": SkipFirst(loader.batch_sampler)}
    else:  # batch_size=None: each index is a batch
        batching = {"batch_size": None, "sampler": SkipFirst(loader.sampler)}
    return ResumableLoader(
        loader.dataset,
        **batching,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )
