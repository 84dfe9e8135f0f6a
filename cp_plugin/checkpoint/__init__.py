"""Checkpoint formats: each one object that gives the model and optimizer states, saves and loads.

Three formats, one per way a run can hold its weights and write them:

- :class:`ShardedFormat` (``sharded.py``): a directory of DCP shards, each rank writing its own,
  readable under any layout (Lightning's ``ModelParallelStrategy`` layout);
- :class:`OneFileFormat` (``one_file.py``): one file of plain states, rank 0 writing it (DDP);
- :class:`FullStateFormat` (``one_file.py``): one file of FSDP2's shards gathered onto rank 0.

Both adapters drive them through :class:`CheckpointFormat`; which one a run writes is decided once
(:func:`saving_format`), and which one reads a checkpoint, by what is on disk (:func:`reading_format`).
Every state a format takes or gives is the one-process layout: ``{"state_dict": ..., "optimizer_states":
[...], **the rest}``, so each format's files load into a plain one-process run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from cp_plugin.checkpoint.files import check_complete, is_complete, is_local, is_sharded
from cp_plugin.checkpoint.one_file import FileIO, FullStateFormat, OneFileFormat
from cp_plugin.checkpoint.sharded import (
    MODEL_KEY,
    MODELS_FILE,
    OPTIMIZERS_KEY,
    ShardedFormat,
    describe_models,
    read_models,
    save,
    saved_keys,
    sharded_states,
)

__all__ = [
    "MODELS_FILE", "MODEL_KEY", "OPTIMIZERS_KEY", "CheckpointFormat", "FileIO", "FullStateFormat", "OneFileFormat", "ShardedFormat",
    "check_complete", "describe_models", "is_complete", "is_sharded", "read_models", "reading_format", "save",
    "saved_keys", "saving_format", "sharded_states",
]


class CheckpointFormat(Protocol):
    """How a run's model and optimizer states become a checkpoint and come back (``module``: the root module)."""

    def model_state(self, module: torch.nn.Module) -> dict[str, Any]:
        """``module`` 's state as this format saves it (called on every rank)."""

    def optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer`` 's state over ``module`` 's parameters, as this format saves it (every rank)."""

    def save(self, module: torch.nn.Module, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Write ``checkpoint`` (states from the two methods above, plus the rest) to ``path``; every rank calls it."""

    def load(self, path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint at ``path``; its states may be read only by the two methods below."""

    def load_model_state(self, module: torch.nn.Module, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Put the loaded checkpoint's weights into ``module``, however it is sharded now."""

    def load_optimizer_state(self, module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                             checkpoint: Mapping[str, Any]) -> None:
        """Put the loaded checkpoint's optimizer states into ``optimizers``, in order."""


def saving_format(*, fsdp: bool, sharded: bool, io: FileIO) -> CheckpointFormat:
    """The format a run writes: sharded if asked, else one file (FSDP2's shards gathered, or DDP's states)."""
    if sharded:
        return ShardedFormat()
    return FullStateFormat(io) if fsdp else OneFileFormat(io)


def reading_format(path: Any, *, fsdp: bool, io: FileIO) -> CheckpointFormat:
    """The format that reads the checkpoint at ``path`` into this run: a directory is sharded, a file is one file."""
    return saving_format(fsdp=fsdp, sharded=is_local(path) and is_sharded(Path(path)), io=io)
