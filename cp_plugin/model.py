"""Find the diffusers models of a module and make them context parallel, without touching their code.

diffusers describes context parallelism as data: a model's ``_cp_plan`` names which inputs to split
on which dimension and which outputs to gather, and hooks apply it. We reuse that plan and
diffusers' hooks, subclassed: the gather hook's backward is the exact adjoint (see ``sequence.py``),
and the split hook

- pads image/video and text sequences the CP size does not divide and masks the padding (see
  ``padding.py``; diffusers asserts);
- lets ``return_dict=True`` outputs through (diffusers' root hook raises on
  ``Transformer2DModelOutput``), so a module written for one process runs unchanged;
- can leave inputs the batch already sharded alone (``presharded_inputs``), for the path where a
  model never sees the full sequence.

We do not call ``ModelMixin.enable_parallelism``: it divides by the accelerator count and fails on
CPU. The manual path below (set each processor's config, apply hooks) is what it does otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from diffusers import ContextParallelConfig, ModelMixin
from diffusers.hooks.context_parallel import (
    ContextParallelGatherHook,
    ContextParallelSplitHook,
    _get_submodule_by_name,
)
from diffusers.hooks.hooks import HookRegistry, ModelHook
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

from cp_plugin.attention.dispatch import RoutedParallelConfig, install_attention_routing
from cp_plugin.config import divisors, format_choices
from cp_plugin.mesh import ParallelMesh
from cp_plugin.padding import SequencePadding
from cp_plugin.sequence import gather_sequence

Plan = dict[str, Any]
_HOOK_PREFIX = "cp_plugin---"


class _GatherHook(ContextParallelGatherHook):
    """diffusers' gather hook with the exact adjoint (reduce-scatter) in the backward, minus any padding."""

    def __init__(self, metadata: list[ContextParallelOutput], mesh: ParallelMesh, padding: SequencePadding) -> None:
        super().__init__(metadata, None)
        self.mesh, self.padding = mesh, padding

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        outputs = [output] if isinstance(output, torch.Tensor) else list(output)
        if len(outputs) != len(self.metadata):
            raise ValueError(f"expected {len(self.metadata)} outputs to gather, got {len(outputs)}")
        gathered = [x if cpm is None else self.padding.trim(gather_sequence(x, cpm.gather_dim, self.mesh), cpm.gather_dim)
                    for x, cpm in zip(outputs, self.metadata)]
        return gathered[0] if isinstance(output, torch.Tensor) else type(output)(gathered)


class _SplitHook(ContextParallelSplitHook):
    """diffusers' split hook that pads uneven sequences (``padding.py``) and lets dict outputs through."""

    def __init__(self, metadata: Plan, config: ContextParallelConfig, where: str, padding: SequencePadding) -> None:
        super().__init__(metadata, config)
        self.where, self.padding = where, padding

    def _name_of(self, cp_input: ContextParallelInput) -> object:
        """The plan key (input name or output index) ``cp_input`` belongs to."""
        for name, entry in self.metadata.items():
            if entry is cp_input:
                return name
            if isinstance(entry, (list, tuple)) and any(e is cp_input for e in entry):
                return [i for i, e in enumerate(entry) if e is cp_input][0]
        return None

    def _prepare_cp_input(self, x: torch.Tensor, cp_input: ContextParallelInput) -> torch.Tensor:
        if cp_input.expected_dims is not None and x.dim() != cp_input.expected_dims:
            # The plan does not apply to this call (e.g. Wan's per-token timestep plan with a per-sample
            # timestep); diffusers skips it too, but its warning needs a logger method it may lack.
            return x
        padded = self.padding.pad(x, cp_input.split_dim, self._name_of(cp_input), self.where)
        return super()._prepare_cp_input(padded, cp_input)

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if not any(isinstance(c, ContextParallelInput) and c.split_output for c in self.metadata.values()):
            return output
        return super().post_forward(module, output)


class _PaddingScope(ModelHook):
    """At a model's entry: nothing is padded yet in this forward."""

    def __init__(self, padding: SequencePadding) -> None:
        super().__init__()
        self.padding = padding

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.padding.reset()
        return args, kwargs


class _AttentionScope(ModelHook):
    """Around an attention module: whether it was given ``encoder_hidden_states`` (cross or joint attention).

    The padding mask needs it only when local text and image lengths are equal (see ``padding.py``).
    """

    def __init__(self, padding: SequencePadding) -> None:
        super().__init__()
        self.padding = padding

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.padding.attending_text = text is not None
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.padding.attending_text = False
        return output


def find_models(module: torch.nn.Module) -> dict[str, ModelMixin]:
    """Outermost diffusers models inside ``module`` (``""`` if ``module`` is one), by attribute path."""
    found: dict[str, ModelMixin] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, ModelMixin) and not any(name.startswith(f"{p}.") or p == "" for p in found):
            found[name] = sub
    return found


def resolve_plans(module: torch.nn.Module, cp_plan: Mapping[str, Plan] | None) -> dict[str, Plan]:
    """Which models get which plan: ``cp_plan`` (path -> plan) wins, else every model's own ``_cp_plan``.

    Raises when nothing could be made context parallel, naming what was found and how to fix it.
    """
    models = find_models(module)
    if cp_plan is not None:
        missing = [path for path in cp_plan if path not in dict(module.named_modules())]
        if missing:
            raise ValueError(
                f"cp_plan names {missing}, which are not submodules of {type(module).__name__}; "
                f"use attribute paths such as {sorted(models) or ['transformer']}"
            )
        return dict(cp_plan)
    plans = {path: m._cp_plan for path, m in models.items() if getattr(m, "_cp_plan", None)}
    if not plans:
        described = ", ".join(f"'{p}': {type(m).__name__}" for p, m in models.items()) or "no diffusers models"
        raise ValueError(
            f"{type(module).__name__} has no diffusers model with a _cp_plan ({described}), so nothing can be "
            "made context parallel; pass cp_plan={'<attribute path>': {...}} (see diffusers' _cp_plan format) "
            "or use a model class that defines _cp_plan (Flux, Flux2, QwenImage, Wan, LTX, ...)"
        )
    return plans


def attention_modules(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]:
    """Attention layers whose processor dispatches through diffusers (and can carry a parallel config)."""
    for name, sub in model.named_modules():
        if isinstance(sub, (Attention, AttentionModuleMixin)) and hasattr(sub.processor, "_parallel_config"):
            yield name, sub


def check_heads(model: torch.nn.Module, path: str, ulysses_degree: int) -> None:
    """Ulysses splits heads across ranks: every attention layer's head count must divide evenly."""
    for name, attn in attention_modules(model):
        if attn.heads % ulysses_degree:
            raise ValueError(
                f"ulysses_degree={ulysses_degree} does not divide num_attention_heads={attn.heads} of "
                f"{type(model).__name__} ('{path}', layer '{name}'); use ulysses_degree "
                f"{format_choices(divisors(attn.heads))} (and ring_degree for the rest of the cp size)"
            )


def local_plan(plan: Plan, presharded_inputs: tuple[str, ...], gather_outputs: bool) -> Plan:
    """The plan for a model fed already-sharded inputs and/or returning local shards."""
    adjusted: Plan = {}
    for module_id, entry in plan.items():
        if isinstance(entry, dict):
            kept = {k: v for k, v in entry.items() if not (module_id == "" and k in presharded_inputs)}
            if kept:
                adjusted[module_id] = kept
        elif gather_outputs:
            adjusted[module_id] = entry
    return adjusted


def check_presharded(plan: Plan, path: str, model: torch.nn.Module, presharded_inputs: tuple[str, ...]) -> None:
    """Pre-sharded inputs must be ones the plan splits at the model's entry, or sharding them is wrong."""
    root = plan.get("", {})
    missing = [name for name in presharded_inputs if name not in root]
    if missing:
        raise ValueError(
            f"presharded_inputs {missing} are not split at the entry of {type(model).__name__} ('{path}'; its plan "
            f"splits {sorted(map(str, root)) or 'nothing'} there), so they cannot arrive sharded; use "
            "shard_batch=None for this model (the loss can still be local with gather_outputs=False)"
        )


def apply_context_parallel(
    module: torch.nn.Module,
    mesh: ParallelMesh,
    *,
    cp_plan: Mapping[str, Plan] | None = None,
    presharded_inputs: tuple[str, ...] = (),
    gather_outputs: bool = True,
) -> list[str]:
    """Make every planned diffusers model in ``module`` context parallel over ``mesh``; return their paths.

    Validation (plans, heads, pre-sharded inputs, applied twice) runs for all models before any
    hook is attached, and none of it communicates, so every rank raises the same error.
    """
    plans = resolve_plans(module, cp_plan)
    submodules = dict(module.named_modules())
    for path, plan in plans.items():
        model = submodules[path]
        if getattr(model, "_cp_plugin_mesh", None) is not None:
            raise RuntimeError(
                f"context parallelism is already applied to {type(model).__name__} ('{path}'); apply it once per "
                "model (build a fresh model, or reuse the strategy that applied it)"
            )
        check_heads(model, path, mesh.ulysses_size)
        if presharded_inputs:
            check_presharded(plan, path, model, presharded_inputs)

    install_attention_routing()
    device = mesh.device_mesh.device_type
    for path, plan in plans.items():
        model = submodules[path]
        config = RoutedParallelConfig(context_parallel_config=mesh.config.to_diffusers().context_parallel_config)
        config.cp_mesh, config.padding = mesh, SequencePadding(mesh.cp_size, mesh.cp_rank)
        config.setup(torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device(device),
                     mesh=mesh.device_mesh)
        for _, attn in attention_modules(model):
            attn.processor._parallel_config = config
            HookRegistry.check_if_exists_or_initialize(attn).register_hook(
                _AttentionScope(config.padding), f"{_HOOK_PREFIX}attention_scope"
            )
        _attach_hooks(model, config, mesh, local_plan(plan, presharded_inputs, gather_outputs))
        model._cp_plugin_mesh = mesh
    return list(plans)


def _attach_hooks(model: torch.nn.Module, config: RoutedParallelConfig, mesh: ParallelMesh, plan: Plan) -> None:
    for module_id, entry in plan.items():
        targets = _get_submodule_by_name(model, module_id)
        for target in targets if isinstance(targets, list) else [targets]:
            if isinstance(entry, dict):
                where = f"{type(model).__name__}.{module_id or 'forward'}"
                hook = _SplitHook(entry, config.context_parallel_config, where, config.padding)
            else:
                outputs = [entry] if isinstance(entry, ContextParallelOutput) else list(entry)
                hook = _GatherHook(outputs, mesh, config.padding)
            HookRegistry.check_if_exists_or_initialize(target).register_hook(hook, f"{_HOOK_PREFIX}{module_id}")
    # Registered last, so it runs first: the padding state starts empty at every forward.
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_PaddingScope(config.padding), f"{_HOOK_PREFIX}padding")
