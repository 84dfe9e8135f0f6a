"""FSDP2 over every rank: parameters, gradients and optimizer state sharded over ``dp x ring x ulysses``.

The ranks of a CP group hold the same weights just as dp replicas do, and the collectives' backwards
are exact adjoints (``cp_plugin.sequence``), so every rank's gradient is one term of the same mean:
FSDP2's reduce-scatter average over all ranks computes what DDP's all-reduce does, each rank keeping
only its shard (torchtitan shards over ``dp_shard x cp`` the same way).

Units, innermost first: each transformer block, each diffusers model, each other child of the root
module that holds parameters (an embedding, a loss head), then the root for parameters of its own.
Every unit gathers its weights when called, so a model called outside a training step (to sample
images in a callback, say) works; the root's step methods run FSDP's forward hooks as ``forward`` would.

Checkpoints hold full, unsharded states laid out as ``module.state_dict()`` and
``optimizer.state_dict()`` are in one process, so a file written by a sharded run loads into one
process with plain ``load_state_dict``, and a one-process file loads into a sharded run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from cp_plugin.plans import find_models

# Gathered to rank 0 and moved to CPU: what one process would hold, and what rank 0 writes.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_module(module: torch.nn.Module, mesh: DeviceMesh, forward_methods: Iterable[str] = ()) -> None:
    """``fully_shard`` the blocks of every diffusers model in ``module``, those models, ``module`` 's other
    children with parameters, then ``module``.

    ``forward_methods`` are methods of ``module`` called instead of ``forward`` (a LightningModule's
    ``training_step``, ...); they get FSDP's forward hooks. A module sharded before is left as it is.
    """
    if isinstance(module, FSDPModule):  # a second fit of the same module
        return
    for model in find_models(module).values():
        for blocks in (child for child in model.children() if isinstance(child, torch.nn.ModuleList)):
            for block in blocks:
                fully_shard(block, mesh=mesh)
        if model is not module:
            fully_shard(model, mesh=mesh)
    for unit in _children(module):
        if _holds_unsharded(unit):
            fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for name in forward_methods:
        register_fsdp_forward_method(module, name)


def _children(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` 's children, a ``ModuleList`` standing for its elements (a list has no forward to hook)."""
    for child in module.children():
        yield from child if isinstance(child, torch.nn.ModuleList) else (child,)


def _holds_unsharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds parameters that no FSDP unit inside it (or it itself) manages yet."""
    managed = {id(p) for sub in module.modules() if isinstance(sub, FSDPModule) for p in sub.parameters()}
    return any(id(p) not in managed for p in module.parameters())


def check_compatible(ddp_options: Mapping[str, Any], start_method: str, grad_scaler: bool) -> None:
    """Raise, naming the setting, if ``fsdp=True`` meets one it cannot honour (no collective runs)."""
    set_options = sorted(name for name, value in ddp_options.items() if value is not None)
    if set_options:
        raise ValueError(
            f"ParallelConfig(fsdp=True) shards the model with FSDP2 instead of wrapping it in DDP, so the DDP options "
            f"{set_options} do not apply; remove them or set fsdp=False"
        )
    if start_method != "popen":
        raise ValueError(
            f"ParallelConfig(fsdp=True) cannot hand sharded weights back to the launching process "
            f"(start_method={start_method!r}); launch with torchrun or the default start_method='popen', "
            "or set fsdp=False"
        )
    if grad_scaler:
        raise ValueError(
            "ParallelConfig(fsdp=True) with a gradient scaler (precision='16-mixed') would let ranks skip steps "
            "differently (each sees inf/NaN in its own gradient shard only); use precision='bf16-mixed' or "
            "'32-true', or set fsdp=False"
        )


def param_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters, in the order ``optimizer.state_dict()`` numbers them."""
    names = {param: name for name, param in module.named_parameters()}
    return [names[param] for group in optimizer.param_groups for param in group["params"]]


def _renamed(state: dict[str, Any], rename: Mapping[Any, Any]) -> dict[str, Any]:
    """An optimizer state dict with its parameter keys mapped through ``rename`` (names <-> numbers)."""
    return {
        "state": {rename[key]: value for key, value in state["state"].items()},
        "param_groups": [{**group, "params": [rename[p] for p in group["params"]]} for group in state["param_groups"]],
    }


def full_model_state(module: torch.nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` as one process holds it, on rank 0 (empty elsewhere); call on every rank."""
    return get_model_state_dict(module, options=_GATHER)


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` as one process holds it, on rank 0 (empty elsewhere); call on every rank."""
    state = get_optimizer_state_dict(module, optimizer, options=_GATHER)
    if not state:
        return state
    return _renamed(state, {name: i for i, name in enumerate(param_names(module, optimizer))})


def load_full_model_state(module: torch.nn.Module, state: Mapping[str, Any], strict: bool = True) -> None:
    """Load a one-process ``state_dict`` (every rank holds it) into a sharded or unsharded ``module``."""
    set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=strict))


def load_full_optimizer_state(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a one-process ``optimizer.state_dict()`` (every rank holds it), keeping this rank's shards.

    An optimizer without per-parameter state (plain SGD) has nothing to shard, and torch's
    ``set_optimizer_state_dict`` cannot place what does not exist (it asserts on the missing
    device), so its hyperparameters load directly: the one-process numbering is this optimizer's.
    """
    if not state["state"]:
        optimizer.load_state_dict(state)
        return
    named = _renamed(state, dict(enumerate(param_names(module, optimizer))))
    set_optimizer_state_dict(module, optimizer, named, options=StateDictOptions(full_state_dict=True))
