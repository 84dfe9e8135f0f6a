"""Exact resume: what a Lightning checkpoint lacks for a multi-rank run to continue bit for bit.

Lightning saves model, optimizer, schedulers and loop counters, but not random-number states, and
rank 0 writes the file, while under CP every dp replica draws its own noise. We add every rank's RNG
state (gathered into rank 0's checkpoint) and restore each rank's own just before its first step.
Mid-epoch data position comes from ``torchdata``'s ``StatefulDataLoader``; Lightning saves its state,
and we keep it in our own entry of the checkpoint, so the file still loads into a plain one-process
run. A checkpoint from another layout still loads (weights, optimizer), with RNG and data position
restarting from the seed and the epoch's start.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

KEY = "cp_plugin"


def _portable_rng_states() -> dict[str, Any]:
    """Lightning's RNG states with numpy's key array as a list, so ``torch.load(weights_only=True)`` reads it."""
    states = _collect_rng_states(include_cuda=True)
    kind, keys, *rest = states["numpy"]
    return {**states, "numpy": (kind, keys.tolist(), *rest)}


def _fit_loop_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})


def layout_state(world_size: int, dp_size: int, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Every rank's RNG state, the layout it belongs to, and the loader's mid-epoch position.

    The position moves out of Lightning's loop state into ours: a one-process ``Trainer`` with a plain
    ``DataLoader`` refuses a checkpoint holding a loader state it has no stateful loader for, and the
    position counts one dp rank's samples, meaningful only under the same layout. Collective: call on
    every rank.
    """
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, _portable_rng_states())
    loader = _fit_loop_state(checkpoint).pop("combined_loader", None)
    return {"world_size": world_size, "dp_size": dp_size, "rng_states": states, "loader": loader}


def rng_state_to_restore(checkpoint: dict[str, Any], world_size: int, dp_size: int, rank: int) -> dict | None:
    """This rank's saved RNG state, with the loader position put back, if the checkpoint has our layout.

    Returns ``None`` when the layout changed (or the file comes from elsewhere): RNG streams restart
    from the seed and the data from the epoch's start.
    """
    saved = checkpoint.get(KEY)
    if saved is not None and saved["world_size"] == world_size and saved["dp_size"] == dp_size:
        if saved.get("loader") is not None:
            _fit_loop_state(checkpoint)["combined_loader"] = saved["loader"]
        return saved["rng_states"][rank]
    _fit_loop_state(checkpoint).pop("combined_loader", None)  # e.g. from a plain Lightning run
    return None


def restore_rng_state(state: dict[str, Any]) -> None:
    kind, keys, *rest = state["numpy"]
    _set_rng_states({**state, "numpy": (kind, np.asarray(keys, dtype=np.uint32), *rest)})


def resumable(loader: DataLoader) -> DataLoader:
    """The same loader as a ``StatefulDataLoader`` (mid-epoch position saved with the checkpoint)."""
    if isinstance(loader, StatefulDataLoader) or type(loader) is not DataLoader:
        return loader  # already stateful, or a custom loader class we must not rebuild
    if loader.batch_size is None and loader.batch_sampler is not None:  # a custom batch sampler (e.g. buckets)
        batching: dict[str, Any] = {"batch_sampler": loader.batch_sampler}
    else:  # automatic batching, or none (batch_size=None: each item is a batch); keep the sampler either way
        batching = {"batch_size": loader.batch_size, "sampler": loader.sampler, "drop_last": loader.drop_last}
    return StatefulDataLoader(
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
