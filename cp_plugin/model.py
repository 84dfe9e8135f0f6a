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

Converting leaves no trace: everything it changes (hooks in diffusers' hook registries, processors'
``_parallel_config``) is recorded in the :class:`Conversion` it returns, whose ``remove()`` (or
:func:`remove_context_parallel`) puts the module back as it was; attention routing is in place only
while a converted model runs (``attention/dispatch.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers import ContextParallelConfig
from diffusers.hooks.context_parallel import ContextParallelGatherHook, ContextParallelSplitHook
from diffusers.hooks.hooks import HookRegistry, ModelHook

from cp_plugin.attention.dispatch import AttentionCall, AttentionRouting, RoutedParallelConfig
from cp_plugin.compat import (
    HOOK_REGISTRY_ATTR,
    PARALLEL_CONFIG_ATTR,
    ContextParallelInput,
    ContextParallelOutput,
    submodules_by_name,
)
from cp_plugin.config import divisors, format_choices
from cp_plugin.mesh import ParallelMesh
from cp_plugin.padding import IMAGE, TEXT, SequencePadding
from cp_plugin.plans import DerivedPlan, Plan, attention_heads, attention_modules, resolve_plans
from cp_plugin.sequence import gather_sequence
from cp_plugin.streams import BlockStreams, ForwardScope, OutputGather, StreamState

_HOOK_PREFIX = "cp_plugin---"
_ROOT_HOOK = f"{_HOOK_PREFIX}model"  # on every converted model: holds its Conversion


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


class _ModelScope(ModelHook):
    """At a converted model's entry: attention routed for its whole forward, and (own plans) no padding yet."""

    def __init__(self, conversion: Conversion, routing: AttentionRouting, call: AttentionCall | None,
                 padding: SequencePadding | None) -> None:
        super().__init__()
        self.conversion, self.routing, self.call, self.padding = conversion, routing, call, padding

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.padding is not None:
            self.padding.reset()
        self.routing.reset()
        return self.routing.run(self.call, self.fn_ref.original_forward, *args, **kwargs)


class _AttentionScope(ModelHook):
    """Around an attention layer of a model with its own plan: routing in place, also when an activation
    checkpoint recomputes the layer in the backward (outside the model's forward)."""

    def __init__(self, routing: AttentionRouting, call: AttentionCall) -> None:
        super().__init__()
        self.routing, self.call = routing, call

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.routing.active:  # inside the model's forward, whose scope routes already (no try: compiled
            return self.fn_ref.original_forward(*args, **kwargs)  # blocks would not break around it)
        return self.routing.run(self.call, self.fn_ref.original_forward, *args, **kwargs)  # a recompute


def hook_name(name: str) -> str:
    """The name :meth:`Conversion.hook` registers a hook under in a module's diffusers hook registry."""
    return f"{_HOOK_PREFIX}{name}"


class Conversion:
    """What :func:`apply_context_parallel` changed in a module, and ``remove()`` to put it back exactly.

    Hooks go into diffusers' per-module hook registries (made where there was none) and processors of
    models with their own plan get a ``_parallel_config``; both are recorded here, with what each
    module and processor held before, so removing leaves the module as if never converted.
    """

    def __init__(self) -> None:
        self.paths: list[str] = []  # the converted models' attribute paths in the module
        self._hooks: list[tuple[torch.nn.Module, str]] = []
        self._made: list[tuple[torch.nn.Module, bool, bool]] = []  # module, had a registry, had an own forward
        self._processors: list[tuple[object, bool, Any]] = []  # processor, had its own config, the config
        self._undo: list[Callable[[], None]] = []  # other changes, each with what puts it back

    def hook(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        """Register ``hook`` on ``module`` under ``name`` (cp_plugin's prefix added), remembering how to undo it."""
        if all(m is not module for m, _, _ in self._made):
            self._made.append((module, HOOK_REGISTRY_ATTR in module.__dict__, "forward" in module.__dict__))
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, hook_name(name))
        self._hooks.append((module, hook_name(name)))

    def set_parallel_config(self, processor: object, config: RoutedParallelConfig) -> None:
        """Give an attention processor our config (diffusers' convention for models with their own plan)."""
        own = PARALLEL_CONFIG_ATTR in vars(processor)
        self._processors.append((processor, own, vars(processor).get(PARALLEL_CONFIG_ATTR)))
        setattr(processor, PARALLEL_CONFIG_ATTR, config)

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Record a change made outside hooks and processors, by what undoes it."""
        self._undo.append(undo)

    def remove(self) -> None:
        """Put every module and processor back as it was before the conversion (idempotent)."""
        for undo in reversed(self._undo):
            undo()
        for module, name in reversed(self._hooks):
            getattr(module, HOOK_REGISTRY_ATTR).remove_hook(name, recurse=False)
        for module, had_registry, had_forward in self._made:
            registry = module.__dict__.get(HOOK_REGISTRY_ATTR)
            if registry is not None and not had_registry and not registry.hooks:
                delattr(module, HOOK_REGISTRY_ATTR)
                if not had_forward:
                    module.__dict__.pop("forward", None)
        for processor, own, config in self._processors:
            if own:
                setattr(processor, PARALLEL_CONFIG_ATTR, config)
            else:
                vars(processor).pop(PARALLEL_CONFIG_ATTR, None)
        self._hooks, self._made, self._processors, self._undo, self.paths = [], [], [], [], []


def conversion_of(model: torch.nn.Module) -> Conversion | None:
    """The conversion that made ``model`` context parallel, if one did."""
    registry = model.__dict__.get(HOOK_REGISTRY_ATTR)
    hook = None if registry is None else registry.get_hook(_ROOT_HOOK)
    return None if hook is None else hook.conversion


def remove_context_parallel(module: torch.nn.Module) -> None:
    """Undo every conversion of the diffusers models in ``module``: a plain module, exactly as before."""
    found: list[Conversion] = []
    for sub in module.modules():
        conversion = conversion_of(sub)
        if conversion is not None and all(c is not conversion for c in found):
            found.append(conversion)
    for conversion in found:
        conversion.remove()


def routed_attention_modules(model: torch.nn.Module, plan: Plan | DerivedPlan) -> list[tuple[str, torch.nn.Module]]:
    """The attention layers whose calls can be routed: those in the blocks of a derived plan, else every
    layer whose processor carries a parallel config (diffusers' convention for its own plans)."""
    if isinstance(plan, DerivedPlan):
        return [(f"{name}.{sub}", attn) for name in plan.block_lists
                for sub, attn in attention_modules(model.get_submodule(name))]
    return [(name, attn) for name, attn in attention_modules(model) if hasattr(attn.processor, PARALLEL_CONFIG_ATTR)]


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
) -> Conversion:
    """Make every planned diffusers model in ``module`` context parallel over ``mesh``.

    Returns the :class:`Conversion` (its ``paths`` are the models converted; ``remove()`` undoes it).
    Validation (plans, heads, pre-sharded inputs, applied twice) runs for all models before any
    hook is attached, and none of it communicates, so every rank raises the same error.
    """
    plans = resolve_plans(module, cp_plan)
    submodules = dict(module.named_modules())
    for path, plan in plans.items():
        model = submodules[path]
        if conversion_of(model) is not None:
            raise RuntimeError(
                f"context parallelism is already applied to {type(model).__name__} ('{path}'); apply it once per "
                "model (build a fresh model, reuse the strategy that applied it, or remove_context_parallel first)"
            )
        check_heads(model, path, plan, mesh.ulysses_size)
        if isinstance(plan, DerivedPlan):
            check_derived(path, model, presharded_inputs, gather_outputs)
        elif presharded_inputs:
            check_presharded(plan, path, model, presharded_inputs)

    conversion = Conversion()
    device = mesh.device_mesh.device_type
    for path, plan in plans.items():
        model = submodules[path]
        config = RoutedParallelConfig(context_parallel_config=mesh.config.to_diffusers().context_parallel_config)
        config.cp_mesh, config.padding = mesh, SequencePadding(mesh.cp_size, mesh.cp_rank)
        config.setup(torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device(device),
                     mesh=mesh.device_mesh)
        routing = AttentionRouting()
        if isinstance(plan, DerivedPlan):
            _attach_derived(conversion, model, plan, config, routing)
        else:
            _attach_own(conversion, model, plan, config, routing, local_plan(plan, presharded_inputs, gather_outputs))
        conversion.paths.append(path)
    return conversion


def _attach_derived(conversion: Conversion, model: torch.nn.Module, plan: DerivedPlan, config: RoutedParallelConfig,
                    routing: AttentionRouting) -> None:
    blocks = [(f"{name}.{i}", block) for name in plan.block_lists for i, block in enumerate(model.get_submodule(name))]
    state = StreamState(plan.model, len(blocks), config, routing)
    ends = {f"{name}.{len(model.get_submodule(name)) - 1}" for name in plan.gathered_after}
    for name, block in blocks:
        conversion.hook(block, BlockStreams(state, name, ends_split=name in ends), name)
    for name, child in model.named_children():
        if name not in plan.block_lists:
            conversion.hook(child, OutputGather(state, name), "gather")
    conversion.hook(model, ForwardScope(state), "streams")
    conversion.hook(model, _ModelScope(conversion, routing, None, None), "model")


def _attach_own(conversion: Conversion, model: torch.nn.Module, plan: Plan, config: RoutedParallelConfig,
                routing: AttentionRouting, local: Plan) -> None:
    config.padding.joints = [(TEXT, IMAGE)]  # diffusers' plans split text-first models (Flux, QwenImage)
    call = AttentionCall(config)
    for name, attn in routed_attention_modules(model, plan):
        conversion.set_parallel_config(attn.processor, config)
        conversion.hook(attn, _AttentionScope(routing, call), f"attention.{name}")
    for module_id, entry in local.items():
        targets = submodules_by_name(model, module_id)
        for target in targets if isinstance(targets, list) else [targets]:
            if isinstance(entry, dict):
                where = f"{type(model).__name__}.{module_id or 'forward'}"
                hook: ModelHook = _SplitHook(entry, config.context_parallel_config, where, config.padding)
            else:
                outputs = [entry] if isinstance(entry, ContextParallelOutput) else list(entry)
                hook = _GatherHook(outputs, config.cp_mesh, config.padding)
            conversion.hook(target, hook, module_id)
    # Registered last, so it runs first: routing in place and the padding state empty at every forward.
    conversion.hook(model, _ModelScope(conversion, routing, call, config.padding), "model")
