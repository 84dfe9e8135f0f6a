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

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import ContextParallelConfig
from diffusers.hooks.context_parallel import ContextParallelGatherHook, ContextParallelSplitHook
from diffusers.hooks.hooks import HookRegistry, ModelHook

from cp_plugin.attention.dispatch import RoutedParallelConfig, install_attention_routing
from cp_plugin.compat import ContextParallelInput, ContextParallelOutput, submodules_by_name
from cp_plugin.config import divisors, format_choices
from cp_plugin.mesh import ParallelMesh
from cp_plugin.padding import IMAGE, TEXT, SequencePadding
from cp_plugin.plans import DerivedPlan, Plan, attention_heads, attention_modules, resolve_plans
from cp_plugin.sequence import gather_sequence
from cp_plugin.streams import BlockStreams, ForwardScope, OutputGather, StreamState
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


def routed_attention_modules(model: torch.nn.Module, plan: Plan | DerivedPlan) -> list[tuple[str, torch.nn.Module]]:
    """The attention layers whose calls can be routed: those in the blocks of a derived plan, else every
    layer whose processor carries a parallel config (diffusers' convention for its own plans)."""
    if isinstance(plan, DerivedPlan):
        return [(f"{name}.{sub}", attn) for name in plan.block_lists
                for sub, attn in attention_modules(model.get_submodule(name))]
    return [(name, attn) for name, attn in attention_modules(model) if hasattr(attn.processor, "_parallel_config")]


def check_heads(model: torch.nn.Module, path: str, plan: Plan | DerivedPlan, ulysses_degree: int) -> None:
    """Ulysses splits heads across ranks: every routed attention layer's head count must divide evenly."""
    for name, attn in routed_attention_modules(model, plan):
        heads = attention_heads(attn)
        if heads is not None and heads % ulysses_degree:
            raise ValueError(
                f"ulysses_degree={ulysses_degree} does not divide num_attention_heads={heads} of "
                f"{type(model).__name__} ('{path}', layer '{name}'); use ulysses_degree "
                f"{format_choices(divisors(heads))} (and ring_degree for the rest of the cp size)"
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


def check_derived(path: str, model: torch.nn.Module, presharded_inputs: tuple[str, ...], gather_outputs: bool) -> None:
    """A derived plan splits inside the model and gathers before its output layers: both ends stay whole."""
    if presharded_inputs or not gather_outputs:
        raise ValueError(
            f"{type(model).__name__} ('{path}') has no _cp_plan; its derived plan splits the token streams where they "
            "enter the blocks and gathers them before the output layers, so its inputs cannot arrive sharded "
            "(presharded_inputs / shard_batch) nor its outputs stay local (gather_outputs=False); use the defaults "
            "or pass cp_plan"
        )


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
        check_heads(model, path, plan, mesh.ulysses_size)
        if isinstance(plan, DerivedPlan):
            check_derived(path, model, presharded_inputs, gather_outputs)
        elif presharded_inputs:
            check_presharded(plan, path, model, presharded_inputs)

    install_attention_routing()
    device = mesh.device_mesh.device_type
    for path, plan in plans.items():
        model = submodules[path]
        config = RoutedParallelConfig(context_parallel_config=mesh.config.to_diffusers().context_parallel_config)
        config.cp_mesh, config.padding = mesh, SequencePadding(mesh.cp_size, mesh.cp_rank)
        config.setup(torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device(device),
                     mesh=mesh.device_mesh)
        if isinstance(plan, DerivedPlan):
            _attach_derived(model, plan, config)
        else:
            config.padding.joints = [(TEXT, IMAGE)]  # diffusers' plans split text-first models (Flux, QwenImage)
            for _, attn in routed_attention_modules(model, plan):
                attn.processor._parallel_config = config
            _attach_hooks(model, config, mesh, local_plan(plan, presharded_inputs, gather_outputs))
        model._cp_plugin_mesh = mesh
    return list(plans)


def _attach_derived(model: torch.nn.Module, plan: DerivedPlan, config: RoutedParallelConfig) -> None:
    blocks = [(f"{name}.{i}", block) for name in plan.block_lists for i, block in enumerate(model.get_submodule(name))]
    state = StreamState(plan.model, len(blocks), config)
    for name, block in blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(BlockStreams(state, name), f"{_HOOK_PREFIX}{name}")
    for name, child in model.named_children():
        if name not in plan.block_lists:
            HookRegistry.check_if_exists_or_initialize(child).register_hook(OutputGather(state, name), f"{_HOOK_PREFIX}gather")
    HookRegistry.check_if_exists_or_initialize(model).register_hook(ForwardScope(state), f"{_HOOK_PREFIX}streams")


def _attach_hooks(model: torch.nn.Module, config: RoutedParallelConfig, mesh: ParallelMesh, plan: Plan) -> None:
    for module_id, entry in plan.items():
        targets = submodules_by_name(model, module_id)
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
