"""One-file checkpoints: rank 0 writes the whole training state to one file, laid out as one process holds it.

Two formats write such a file. Under DDP every rank holds the whole model, so its plain states are
the checkpoint's (:class:`OneFileFormat`); under FSDP2 each rank holds shards, which are gathered
onto rank 0 first (:class:`FullStateFormat`). Either file loads into a one-process run with plain
``load_state_dict``, and into a run of either kind.

The file also records the module's diffusers models (:data:`MODELS_ENTRY`: class, config, LoRA
adapters, as JSON text, so ``torch.load(weights_only=True)`` reads it), which ``python -m
cp_plugin.convert`` turns into folders diffusers loads. A :class:`FileIO` (Lightning's
``CheckpointIO``, which also writes fsspec URLs and takes storage options) writes and reads the file. A local file is written next to its target and renamed into
place once whole, so no crash leaves half a file under the checkpoint's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from cp_plugin.checkpoint.files import is_local, partial_path, put_in_place, rank
from cp_plugin.checkpoint.sharded import MODEL_KEY, OPTIMIZERS_KEY, describe_models_json
from cp_plugin.fsdp import full_model_state, full_optimizer_state, load_full_model_state, load_full_optimizer_state

MODELS_ENTRY = "diffusers_models"  # the checkpoint's key of the JSON describing its diffusers models


class FileIO(Protocol):
    """What writes and reads one checkpoint file: Lightning's ``CheckpointIO`` (``TorchCheckpointIO``, ...)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None: ...

    def load_checkpoint(self, path: Any, *, weights_only: bool | None = None) -> dict[str, Any]: ...


class OneFileFormat:
    """One file of every rank's plain states (DDP: each rank holds the whole model), written by rank 0."""

    def __init__(self, io: FileIO) -> None:
        self.io = io

    def model_state(self, module: torch.nn.Module) -> dict[str, Any]:
        return module.state_dict()

    def optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if hasattr(optimizer, "consolidate_state_dict"):  # ZeroRedundancyOptimizer: its shards gathered on rank 0
            optimizer.consolidate_state_dict()
            return optimizer.state_dict() if rank() == 0 else {}
        return optimizer.state_dict()

    def save(self, module: torch.nn.Module, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Rank 0 writes ``checkpoint``; a local file next to ``path`` first, renamed into place once written."""
        if rank() != 0:
            return
        checkpoint = {**checkpoint, MODELS_ENTRY: describe_models_json(module)}
        if not is_local(path):
            self.io.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        written = partial_path(Path(path))
        self.io.save_checkpoint(checkpoint, written, storage_options=storage_options)
        put_in_place(written, Path(path))

    def load(self, path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        torch.cuda.empty_cache()  # as Lightning does: cached blocks go before the file's tensors arrive
        return self.io.load_checkpoint(path, weights_only=weights_only)

    def load_model_state(self, module: torch.nn.Module, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module.load_state_dict(checkpoint[MODEL_KEY], strict=strict)

    def load_optimizer_state(self, module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                             checkpoint: Mapping[str, Any]) -> None:
        """Each optimizer's saved state; torch puts every state tensor on its parameter's device."""
        for optimizer, state in zip(optimizers, checkpoint[OPTIMIZERS_KEY]):
            optimizer.load_state_dict(state)


class FullStateFormat(OneFileFormat):
    """One file of full states gathered from FSDP2's shards onto rank 0 (``cp_plugin.fsdp``); every rank
    keeps its own shards of what it loads."""

    def model_state(self, module: torch.nn.Module) -> dict[str, Any]:
        return full_model_state(module)

    def optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return full_optimizer_state(module, optimizer)

    def load_model_state(self, module: torch.nn.Module, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        load_full_model_state(module, checkpoint[MODEL_KEY], strict=strict)

    def load_optimizer_state(self, module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                             checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(optimizers, checkpoint[OPTIMIZERS_KEY]):
            load_full_optimizer_state(module, optimizer, state)
