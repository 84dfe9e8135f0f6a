"""Sharded checkpoints: a directory in which every rank writes its own shards with torch.distributed.checkpoint.

The layout is Lightning's ``ModelParallelStrategy`` 's, so the two read each other's directories:
DCP files holding ``{"state_dict": model state, "optimizer_<i>": optimizer state}`` (each rank
writes only its FSDP2 shards; nothing is gathered, so no rank ever holds a full copy), plus the
non-tensor rest of a Lightning checkpoint (loops, callbacks, RNG, data position, LR schedulers) in
a small ``meta.pt`` rank 0 writes. We add ``models.json``: each diffusers model's attribute path,
class and config (and LoRA adapter configs), so ``python -m cp_plugin.convert`` can rebuild the model
without the training code.

DCP keeps tensors with their global shapes and shard offsets, so loading reshards to whatever the
loading run holds: other ring / ulysses / dp degrees, another world size, FSDP2 or plain DDP
replicas. States are read and written through ``torch.distributed.checkpoint.state_dict``
(``get_/set_model_state_dict``, ``get_/set_optimizer_state_dict``), keyed by parameter names.

A directory is complete only when DCP's ``.metadata`` exists: DCP writes it last, after every rank's
shards, and we write ``meta.pt`` and ``models.json`` before the shards (:func:`is_complete`). Saves go
to a hidden sibling directory that replaces the target only once complete, so an interrupted save
never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from cp_plugin.checkpoint.files import META_FILE, check_complete, is_local, partial_path, put_in_place, rank, remove
from cp_plugin.plans import find_models

MODELS_FILE = "models.json"
MODEL_KEY = "state_dict"  # the one-process checkpoint layout's keys (Lightning's, documented)
OPTIMIZERS_KEY = "optimizer_states"
# Sharded, moved to CPU: what ModelParallelStrategy saves with save_distributed_checkpoint=True.
_SHARDED = StateDictOptions(cpu_offload=True)


def optimizer_key(index: int) -> str:
    return f"optimizer_{index}"


def model_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2 swaps in a subclass (``FSDPFluxTransformer2DModel``) at ``fully_shard``."""
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def describe_models(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Each diffusers model in ``module`` by attribute path: its class, config and LoRA adapter configs (JSON)."""
    described = {}
    for path, model in find_models(module).items():
        cls = model_class(model)
        config = {**json.loads(model.to_json_string()), "_class_name": cls.__name__}
        entry: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}", "config": config}
        adapters = getattr(model, "peft_config", None) or {}
        if adapters:
            entry["adapters"] = {name: json.loads(json.dumps(cfg.to_dict(), default=_jsonable)) for name, cfg in adapters.items()}
        described[path] = entry
    return described


def describe_models_json(module: torch.nn.Module) -> str:
    """:func:`describe_models` as JSON text: what ``models.json`` holds, and one-file checkpoints record."""
    return json.dumps(describe_models(module), indent=2, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return str(value)  # enums (peft's TaskType), dtypes


def sharded_states(module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """``{"state_dict": ..., "optimizer_<i>": ...}`` with each rank's own shards only (nothing gathered)."""
    states: dict[str, Any] = {MODEL_KEY: model_state(module)}
    for i, optimizer in enumerate(optimizers):
        states[optimizer_key(i)] = optimizer_state(module, optimizer)
    return states


def model_state(module: torch.nn.Module) -> dict[str, Any]:
    """``module`` 's state by parameter name, as DTensor shards under FSDP2 (no gather)."""
    return get_model_state_dict(module, options=_SHARDED)


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer`` 's state keyed by ``module`` 's parameter names, as shards under FSDP2 (no gather)."""
    return get_optimizer_state_dict(module, optimizer, options=_SHARDED)


def save(path: str | os.PathLike, states: Mapping[str, Any], meta: Mapping[str, Any],
         models: str | None = None) -> None:
    """Write a sharded checkpoint to ``path``: each rank its shards of ``states``, rank 0 ``meta`` and ``models`` (JSON).

    Collective: every rank calls it with the same ``path``. Written to a hidden sibling first, which
    replaces ``path`` (a file or directory) only once complete.
    """
    path = Path(path)
    partial = partial_path(path)
    writer = rank() == 0
    if writer:
        remove(partial)
        partial.mkdir(parents=True)
        torch.save(dict(meta), partial / META_FILE)
        (partial / MODELS_FILE).write_text(models or "{}")
    _barrier()
    dcp.save(dict(states), checkpoint_id=partial)  # .metadata last, after every rank's shards
    if writer:
        put_in_place(partial, path)
    _barrier()


def read_meta(path: str | os.PathLike, weights_only: bool | None = None) -> dict[str, Any]:
    """The non-tensor rest of a sharded checkpoint (what ``meta.pt`` holds); refuses an incomplete directory."""
    check_complete(path)
    return torch.load(Path(path) / META_FILE, map_location="cpu", weights_only=weights_only)


def read_models(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The diffusers models recorded at save time (``models.json``), by attribute path."""
    file = Path(path) / MODELS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def saved_keys(path: str | os.PathLike, key: str = MODEL_KEY) -> set[str]:
    """Names under ``key`` that the checkpoint holds (read from DCP's metadata, no tensor is read)."""
    prefix = f"{key}."
    metadata = FileSystemReader(str(path)).read_metadata()
    return {name[len(prefix):] for name in metadata.state_dict_metadata if name.startswith(prefix)}


def saved_optimizers(path: str | os.PathLike) -> int:
    """How many optimizers the checkpoint holds (``optimizer_0``, ``optimizer_1``, ...)."""
    names = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return len({name.split(".", 1)[0] for name in names if name.startswith("optimizer_")})


def load_model(module: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load the checkpoint's weights into ``module`` however it is sharded now (FSDP2 or whole). Collective.

    Entries the checkpoint lacks (a LoRA run that saved adapters only) are kept unless ``strict``.
    """
    state = model_state(module)
    saved = saved_keys(path)
    missing = sorted(set(state) - saved)
    if strict and missing:
        raise ValueError(
            f"checkpoint {path} lacks {len(missing)} weights of the model, e.g. {missing[:3]}; load with "
            "strict=False (LightningModule.strict_loading = False) to keep their current values"
        )
    state = {name: value for name, value in state.items() if name in saved}
    dcp.load({MODEL_KEY: state}, checkpoint_id=path)
    set_model_state_dict(module, state, options=StateDictOptions(strict=False))


def load_optimizer(module: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike,
                   index: int = 0) -> None:
    """Load optimizer ``index`` of the checkpoint into ``optimizer`` (over ``module`` 's parameters). Collective.

    ``get_optimizer_state_dict`` first gives a fresh optimizer its state (a zero step), so DCP has a
    template to read every rank's part into; a stateless optimizer (SGD without momentum) reads its
    hyperparameters (the scheduled learning rate) only.
    """
    state = optimizer_state(module, optimizer)
    dcp.load({optimizer_key(index): state}, checkpoint_id=path)
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(cpu_offload=False))


class ShardedFormat:
    """Sharded checkpoints as one format: each rank reads and writes its own shards, no rank gathers the model.

    ``load`` reads the non-tensor rest and remembers the directory; the weights and optimizer states
    are read by ``load_model_state`` / ``load_optimizer_state``, which may run later and under another
    sharding (Lightning loads weights before it shards the model, optimizers after).
    """

    def __init__(self) -> None:
        self.source: Path | None = None  # the directory ``load`` read

    def model_state(self, module: torch.nn.Module) -> dict[str, Any]:
        return model_state(module)

    def optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer_state(module, optimizer)

    def save(self, module: torch.nn.Module, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Write ``checkpoint`` (the one-process layout) to the directory ``path``: its model and optimizer states as
        DCP shards, the rest in ``meta.pt``, ``module`` 's diffusers models in ``models.json``. Collective."""
        if not is_local(path):
            raise ValueError(
                f"ContextParallelStrategy(save_distributed_checkpoint=True) writes sharded checkpoints to local or "
                f"mounted paths; {path!r} is a URL: save to a mounted path or set save_distributed_checkpoint=False"
            )
        if storage_options is not None:
            raise TypeError(
                "ContextParallelStrategy(save_distributed_checkpoint=True).save_checkpoint(..., storage_options=...): "
                "sharded checkpoints are written with torch.distributed.checkpoint, not the CheckpointIO; "
                "drop storage_options or set save_distributed_checkpoint=False"
            )
        states = {MODEL_KEY: checkpoint.pop(MODEL_KEY)}
        states.update({optimizer_key(i): s for i, s in enumerate(checkpoint.pop(OPTIMIZERS_KEY, []))})
        save(path, states, checkpoint, describe_models_json(module))

    def load(self, path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """The non-tensor rest of the checkpoint at ``path``, with one placeholder per saved optimizer (frameworks
        look for the entry before they load optimizers); refuses an incomplete directory."""
        checkpoint = read_meta(path, weights_only=weights_only)
        self.source = Path(path)
        saved = saved_optimizers(path)
        if saved:
            checkpoint[OPTIMIZERS_KEY] = [None] * saved
        return checkpoint

    def load_model_state(self, module: torch.nn.Module, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.source is not None, "load reads the checkpoint first"
        load_model(module, self.source, strict=strict)

    def load_optimizer_state(self, module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                             checkpoint: Mapping[str, Any]) -> None:
        assert self.source is not None, "load reads the checkpoint first"
        for i, optimizer in enumerate(optimizers[:len(checkpoint.get(OPTIMIZERS_KEY, []))]):
            load_optimizer(module, optimizer, self.source, i)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
