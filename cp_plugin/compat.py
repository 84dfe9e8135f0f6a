"""Every private API of torch, diffusers, Lightning and Accelerate that cp_plugin touches, in one place.

Private names change without notice, so the library reaches them only through this module, which
names what each is for and records the versions the test suite verified. Importing ``cp_plugin``
warns once for each installed package whose (major, minor) version was not verified; the package
still runs, since most releases keep these names, and the warning says what to run to check.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from diffusers.hooks.context_parallel import _get_submodule_by_name
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from torch._decomp import decomposition_table
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.distributed_c10d import _get_default_store
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_leaves, tree_map_only, tree_unflatten

# (major, minor) versions the full test suite passed on.
VERIFIED: dict[str, tuple[str, ...]] = {
    "torch": ("2.13",),
    "diffusers": ("0.42",),
    "lightning": ("2.6",),
    "accelerate": ("1.15", "1.16"),
}

__all__ = [
    "SDPA", "ContextParallelInput", "ContextParallelOutput", "FakeTensorMode", "ShapeEnv", "TorchDispatchMode", "VERIFIED",
    "decomposition", "expr_hint", "outside_dispatch_modes", "is_symbolic", "quiet_fake_kernels", "supports_gradient_checkpointing", "fresh_size", "is_backed", "same_size", "size_expr", "size_hint", "symbolic_fake", "symbolic_fake_mode", "tree_flatten", "tree_flatten_with_path",
    "tree_leaves", "tree_map_only", "tree_unflatten", "forward_is_hooked_only_by", "tensor_version", "all_gather_single", "all_gather_tensor", "reduce_scatter_single", "attention_backends",
    "check_versions", "ddp_ignore_parameters", "ddp_kwargs", "default_store", "flatten_mesh",
    "flux_pack_latents", "flux2_image_latents", "qwenimage_edit_size", "cogvideox_rotary_embeddings", "ltx_pack_latents", "ltx_unpack_latents", "ltx_normalize_latents", "foreach_norm", "mark_prepared", "mask_preparers", "submodules_by_name", "unwrap_optimizer",
    "HOOK_REGISTRY_ATTR", "PARALLEL_CONFIG_ATTR",
    "ACCELERATOR_WRAPS", "LIGHTNING_LAYOUT_KEYS", "PRIVATE_OVERRIDES", "batches_processed", "ddp_comm_options",
    "pop_loader_states", "process_group_backend", "process_group_timeout", "put_loader_states",
    "reopen_interrupted_epoch", "start_method", "wrap_accelerator",
    "sdpa_flash_cpu", "sdpa_flash_cpu_backward", "sdpa_flash", "sdpa_flash_backward", "sdpa_efficient",
    "sdpa_efficient_backward", "sdpa_cudnn", "sdpa_cudnn_backward", "ATTENTION_FORWARD_KERNELS",
]


def check_versions() -> list[str]:
    """Warn once per installed package outside :data:`VERIFIED`; return the warnings given."""
    given = []
    for package, verified in VERIFIED.items():
        try:
            installed = version(package)
        except PackageNotFoundError:  # an optional extra (accelerate) that is not installed
            continue
        if ".".join(installed.split("+")[0].split(".")[:2]) not in verified:
            message = (
                f"cp_plugin was verified with {package} {' / '.join(f'{v}.x' for v in verified)}; {package} {installed} "
                "is installed. The private APIs it uses (cp_plugin/compat.py) may have changed: run the test suite "
                "(python -m pytest) to check this combination"
            )
            warnings.warn(message, stacklevel=2)
            given.append(message)
    return given


# torch ----------------------------------------------------------------------------------------
def flatten_mesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """Several dims of a device mesh as one (``DeviceMesh._flatten``): the CP group, or dp x cp for FSDP2."""
    return mesh._flatten(name)


def default_store() -> Any:
    """The default process group's key-value store (failure reports every rank can read)."""
    return _get_default_store()


def foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One fused norm per tensor (``torch._foreach_norm``), for the non-finite gradient check."""
    return torch._foreach_norm(tensors)


def all_gather_tensor(tensor: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """A functional (traceable, waited) all-gather along ``dim`` over ``group``."""
    return funcol.wait_tensor(funcol.all_gather_tensor(tensor, dim, group))


def ddp_ignore_parameters(module: torch.nn.Module, names: list[str]) -> None:
    """Tell a DDP wrapper built later to leave these parameters alone (FSDP2 already shards them)."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


# The builtin behind ``F.scaled_dot_product_attention`` (which cp_plugin's routing replaces): what a
# ``TorchFunctionMode`` sees for every SDPA call, and what routed calls fall back to.
SDPA = torch._C._nn.scaled_dot_product_attention


# Symbolic probes (probe.py): fake tensors with a fresh symbol for every dimension (``ShapeEnv``
# without duck sizing), and torch's decompositions for kernels that take no symbolic sizes.
class _ReadingShapeEnv(ShapeEnv):
    """A ``ShapeEnv`` that shows ``read`` every symbolic number its caller converts to a plain one.

    ``int(n)``, ``float(n)`` or ``math.log(n)`` of a size evaluates it here (``SymNode.guard_int``);
    ``read(expr, hint)`` may give the number to use instead, unguarded, or ``None`` for torch's usual
    guard, which makes the size a constant for the rest of the probe.
    """

    read: Callable[[Any, Any], Any] | None = None

    def evaluate_sym_node(self, sym_node: Any, size_oblivious: bool = False, fallback_value: bool | None = None) -> Any:
        if (self.read is not None and (sym_node.is_int() or sym_node.is_float()) and sym_node.hint is not None
                and sym_node.expr.free_symbols):
            value = self.read(sym_node.expr, sym_node.hint)
            if value is not None:
                return value
        return super().evaluate_sym_node(sym_node, size_oblivious, fallback_value)


def symbolic_fake_mode(read: Callable[[Any, Any], Any] | None = None) -> tuple[FakeTensorMode, ShapeEnv]:
    """A fake mode over a fresh reading ``ShapeEnv``. Its dispatch cache is off (``cache_enabled``): a probe runs
    each block once, and with every size symbolic, building cache entries costs more than they save (a third of
    a probe's time, measured on four diffusers DiTs)."""
    env = _ReadingShapeEnv(duck_shape=False)
    env.read = read
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    mode.cache_enabled = False
    return mode, env


def symbolic_fake(mode: FakeTensorMode, x: torch.Tensor) -> torch.Tensor:
    """A fake ``x`` (a real or meta tensor) whose every dimension is a new symbol, on ``x``'s device."""
    return mode.from_tensor(x, symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * x.dim()))


def fresh_size(mode: FakeTensorMode, hint: int) -> torch.SymInt:
    """A new symbol of ``mode`` for a size of ``hint`` (>= 2: 0 and 1 are kept as constants), even inside it."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        meta = torch.empty(hint, device="meta")
    return symbolic_fake(mode, meta).shape[0]


def is_symbolic(x: torch.Tensor) -> bool:
    """Whether ``x`` is a fake tensor (a probe's or a tracer's) or has symbolic sizes, i.e. holds no data."""
    return is_fake(x) or any(isinstance(size, torch.SymInt) for size in x.shape)


def supports_gradient_checkpointing(model: Any) -> bool:
    """Whether a diffusers model's class can checkpoint its blocks (``enable_gradient_checkpointing`` raises if not)."""
    return bool(model._supports_gradient_checkpointing)


def is_backed(env: ShapeEnv, symbol: Any) -> bool:
    """Whether a probe's symbol stands for an input's size (backed), not for a count computed from data."""
    values = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val  # renamed in torch 2.13
    return symbol in values


def same_size(a: Any, b: Any) -> bool:
    """Whether two sizes of a probe are provably the same expression (equal numbers prove nothing); no guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return (isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt)) and bool(statically_known_true(a == b))


def expr_hint(env: ShapeEnv, expr: Any) -> int:
    """The number a probe's size expression stands for, at the sizes the probe was given (torch 2.13 renamed
    ``ShapeEnv.size_hint``, which warns there, to ``guarding_hint_or_throw``)."""
    hint = getattr(env, "guarding_hint_or_throw", None)
    return hint(expr) if hint is not None else env.size_hint(expr)


def size_hint(size: torch.SymInt) -> int | None:
    """The number a probe's symbolic size stands for (the size of the tensor it was made from)."""
    return size.node.hint


def size_expr(env: ShapeEnv, size: Any) -> Any:
    """A (symbolic) size as a sympy expression in the probe's symbols, after the equalities found so far."""
    import sympy

    return env.simplify(size.node.expr) if isinstance(size, torch.SymInt) else sympy.Integer(size)


@contextmanager
def quiet_fake_kernels() -> Iterator[None]:
    """Fake tensors log each kernel that fails on symbolic sizes (``torch._subclasses.fake_tensor``); the
    probe retries those decomposed, so the log would only alarm."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def outside_dispatch_modes() -> Any:
    """A context in which the dispatch modes the caller runs (selective checkpointing's cache, op counters)
    are off: a probe's fake ops are not the caller's to see."""
    return _disable_current_modes()


def decomposition(op: Any) -> Callable[..., Any] | None:
    """torch's decomposition of an aten op into simpler ones, if it has one."""
    return decomposition_table.get(op)


# torch 2.13 renamed the tensor collectives (the old names warn on every call); older releases have the old names.
all_gather_single = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
reduce_scatter_single = getattr(torch.distributed, "reduce_scatter_single", None) or torch.distributed.reduce_scatter_tensor


# Attention kernels that also return the log-sum-exp, called with positional arguments.
_aten = torch.ops.aten
sdpa_flash_cpu = _aten._scaled_dot_product_flash_attention_for_cpu
sdpa_flash_cpu_backward = _aten._scaled_dot_product_flash_attention_for_cpu_backward
sdpa_flash = _aten._scaled_dot_product_flash_attention
sdpa_flash_backward = _aten._scaled_dot_product_flash_attention_backward
sdpa_efficient = _aten._scaled_dot_product_efficient_attention
sdpa_efficient_backward = _aten._scaled_dot_product_efficient_attention_backward
sdpa_cudnn = _aten._scaled_dot_product_cudnn_attention
sdpa_cudnn_backward = _aten._scaled_dot_product_cudnn_attention_backward
# The forward kernels every softmax attention here reaches, fused SDPA's and the ring's alike: what a selective
# checkpointing policy keeps so that a recompute skips them (their outputs, including the LSE, are what the
# backward kernels read).
ATTENTION_FORWARD_KERNELS = frozenset({sdpa_flash_cpu, sdpa_flash, sdpa_efficient, sdpa_cudnn})


# diffusers ------------------------------------------------------------------------------------
def attention_backends() -> dict[Any, Callable[..., torch.Tensor]]:
    """diffusers' registry of attention backends, by name (what ``dispatch_attention_fn`` looks up)."""
    return _AttentionBackendRegistry._backends


# Functions that build a block's attention mask from statistics over the queries and keys it holds: under a split
# they must see the whole sequence, as one process does. (module, function) -> (the sequence dim of the statistics'
# inputs, their argument positions). Derivation sees only the mask such a function returns (built inside the block
# from its own tokens, a refusal), not the statistics behind it, so each entry is shipped, verified on diffusers 0.42:
# - Kandinsky 6 SR's NABLA pattern softmaxes per-64-token block means of q (B, heads, S, D) over those of k.
WHOLE_SEQUENCE_STATISTICS = {
    ("diffusers.models.transformers.transformer_kandinsky6_sr", "nabla_block_mask"): (2, (0, 1)),
}


def statistics_mask_builders() -> list[tuple[Any, str, int, tuple[int, ...]]]:
    """``(module, function name, sequence dim, argument positions)`` of each entry of
    :data:`WHOLE_SEQUENCE_STATISTICS` that this diffusers has."""
    import importlib

    found = []
    for (module_name, name), (dim, positions) in WHOLE_SEQUENCE_STATISTICS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            found.append((module, name, dim, positions))
    return found


def mask_preparers() -> tuple[type, ...]:
    """The diffusers attention classes that define ``prepare_attention_mask`` (the legacy ``Attention`` and the
    ``AttentionModuleMixin`` of the newer ones); verified on diffusers 0.42."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return tuple(cls for cls in (Attention, AttentionModuleMixin) if "prepare_attention_mask" in cls.__dict__)


# diffusers' private attribute names: a module's hook registry (``HookRegistry`` keeps itself there) and an attention
# processor's parallel config (diffusers sets it on the processors of models with their own plan, and passes it on to
# its attention backends as the keyword of the same name).
HOOK_REGISTRY_ATTR = "_diffusers_hook"
PARALLEL_CONFIG_ATTR = "_parallel_config"


def forward_is_hooked_only_by(module: torch.nn.Module, names: Collection[str]) -> bool:
    """Whether nothing wraps ``module``'s forward but the hooks of its diffusers hook registry named in ``names``: no
    other registry hook, no torch forward hooks of its own or global ones (a caller that skips or reruns the forward
    would skip or rerun theirs)."""
    registry = module.__dict__.get(HOOK_REGISTRY_ATTR)
    return ((registry is None or set(registry.hooks) <= set(names)) and not module._forward_hooks
            and not module._forward_pre_hooks and not torch.nn.modules.module._global_forward_hooks
            and not torch.nn.modules.module._global_forward_pre_hooks)


def storage_id(x: torch.Tensor) -> int:
    """The identity of ``x``'s storage (its ``StorageImpl``), shared by every view of it: unique on every device, the
    meta device included, where every data pointer is 0."""
    return x.untyped_storage()._cdata


def saved_tensors_hooked() -> bool:
    """Whether hooks take what autograd saves here (``torch.autograd.graph.saved_tensors_hooks``: a non-reentrant
    checkpoint's forward or recompute, offloading to the host), which has no public query."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def tensor_version(x: torch.Tensor) -> int:
    """How many times ``x``'s storage was written in place (autograd's version counter)."""
    return x._version


def unviewed(x: torch.Tensor) -> torch.Tensor:
    """``x``, as a tensor autograd does not track as a view (``aten._unsafe_view``, which ``matmul`` returns its folded
    products as): an autograd function's output that is a view of a tensor it made cannot be written in place."""
    return x if x._base is None else torch.ops.aten._unsafe_view(x, x.shape)


def view_base(x: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``x`` is a view of (autograd's ``_base``), or ``None`` if it owns its storage."""
    return x._base


def submodules_by_name(model: torch.nn.Module, name: str) -> torch.nn.Module | list[torch.nn.Module]:
    """The submodule(s) a ``_cp_plan`` key names (``"blocks.*"`` gives a list), as diffusers resolves it."""
    return _get_submodule_by_name(model, name)


def flux_pack_latents(latents: torch.Tensor, batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Flux latents ``(B, C, H, W)`` as tokens of 2x2 patches ``(B, H W / 4, 4 C)`` (``FluxPipeline._pack_latents``),
    the layout a pretrained Flux transformer was trained on. Imported when called: the pipelines pull in transformers."""
    from diffusers import FluxPipeline

    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def flux2_image_latents(pipeline: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Flux.2 latents of pixels ``(B, 3, H, W)``: ``latent_dist.mode()`` in 2x2 patches ``(B, 4 C, H' / 2, W' / 2)``,
    normalised by the VAE's BatchNorm running statistics (``Flux2Pipeline._encode_vae_image``, which its ``__call__``
    uses for condition images and inverts before decoding)."""
    return pipeline._encode_vae_image(pixels, generator=None)


def qwenimage_edit_size(area: int, width: int, height: int) -> tuple[int, int]:
    """The ``(width, height)`` of ``area`` pixels, multiples of 32, at the aspect ratio of a ``width x height`` image:
    the size ``QwenImageEditPipeline.__call__`` resizes its condition image to (``calculate_dimensions``, a helper of
    the pipeline's module that diffusers does not export). Imported when called: the pipelines pull in transformers."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    sized_width, sized_height, _ = calculate_dimensions(area, width / height)
    return int(sized_width), int(sized_height)


def ltx_pack_latents(latents: torch.Tensor, patch_size: int, patch_size_t: int) -> torch.Tensor:
    """LTX-Video latents ``(B, C, F, H, W)`` as tokens ``(B, F H W / patches, C x patch volume)``
    (``LTXPipeline._pack_latents``)."""
    from diffusers import LTXPipeline

    return LTXPipeline._pack_latents(latents, patch_size, patch_size_t)


def ltx_unpack_latents(tokens: torch.Tensor, frames: int, height: int, width: int, patch_size: int,
                       patch_size_t: int) -> torch.Tensor:
    """The inverse of :func:`ltx_pack_latents` for a grid of ``frames x height x width`` patches
    (``LTXPipeline._unpack_latents``)."""
    from diffusers import LTXPipeline

    return LTXPipeline._unpack_latents(tokens, frames, height, width, patch_size, patch_size_t)


def ltx_normalize_latents(latents: torch.Tensor, vae: torch.nn.Module) -> torch.Tensor:
    """LTX-Video VAE latents ``(B, C, F, H, W)`` normalised per channel as the pipelines do
    (``LTXPipeline._normalize_latents``)."""
    from diffusers import LTXPipeline

    return LTXPipeline._normalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)


def cogvideox_rotary_embeddings(transformer: torch.nn.Module, frames: int, height: int, width: int,
                                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3D rotary table ``(cos, sin)`` that ``CogVideoXPipeline`` gives its transformer for latents of ``frames x
    height x width`` (``_prepare_rotary_positional_embeddings``, CogVideoX 1.0's and 1.5's). The method reads only the
    transformer's config and the VAE's spatial factor, which turns the pixel size it is given into latents: given the
    latents' own size, that factor is 1, so training computes the table without the VAE."""
    from types import SimpleNamespace

    from diffusers import CogVideoXPipeline

    sizes = SimpleNamespace(transformer=transformer, vae_scale_factor_spatial=1)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(sizes, height, width, frames, device)


# ContextParallelInput / ContextParallelOutput (re-exported above): the entries of a ``_cp_plan``.
# Also relied on, by name: processors of models with their own plan get ``processor._parallel_config``.

# Private framework methods cp_plugin overrides (and calls through ``super()``) because no public hook does
# the job, with the signature of the verified version: tests/test_compat.py fails when one changes, and
# finds any other override of a private framework method.
PRIVATE_OVERRIDES: dict[str, str] = {
    # model.py's split hook pads an uneven sequence before diffusers splits it
    "diffusers.hooks.context_parallel.ContextParallelSplitHook._prepare_cp_input":
        "(self, x: torch.Tensor, cp_input: diffusers.models._modeling_parallel.ContextParallelInput) -> torch.Tensor",
}


# Lightning ------------------------------------------------------------------------------------
# What ``ContextParallelStrategy`` reads of the ``DDPStrategy`` it inherits from: settings Lightning keeps private.
def ddp_kwargs(strategy: Any) -> dict[str, Any]:
    """The keyword arguments a ``DDPStrategy`` passes to DDP (``_ddp_kwargs``), mutable."""
    return strategy._ddp_kwargs


def ddp_comm_options(strategy: Any) -> dict[str, Any]:
    """The DDP communication settings a ``DDPStrategy`` was given (``_ddp_comm_hook``, ``_model_averaging_period``)."""
    return {"ddp_comm_hook": strategy._ddp_comm_hook, "model_averaging_period": strategy._model_averaging_period}


def start_method(strategy: Any) -> str:
    """How a ``DDPStrategy`` starts its processes (``_start_method``: ``"popen"``, ``"spawn"``, ...)."""
    return strategy._start_method


def process_group_backend(strategy: Any) -> str:
    """The backend a ``DDPStrategy`` creates its process group with (``_get_process_group_backend``)."""
    return strategy._get_process_group_backend()


def process_group_timeout(strategy: Any) -> timedelta | None:
    """The process-group timeout a ``DDPStrategy`` was given (``_timeout``)."""
    return strategy._timeout


# Lightning's checkpoint layout: the fit loop's state under ``loops/fit_loop``, its progress counters
# (``lightning.pytorch.loops.progress``' private trackers, as state dicts) and its loaders' states.
LIGHTNING_LAYOUT_KEYS = ("fit_loop", "epoch_loop.batch_progress", "epoch_progress", "combined_loader", "is_last_batch")


def _fit_loop(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return checkpoint.get("loops", {}).get("fit_loop", {})


def batches_processed(checkpoint: dict[str, Any]) -> int:
    """Batches of the current epoch whose training step ran, by the fit loop's own progress counters."""
    return _fit_loop(checkpoint).get("epoch_loop.batch_progress", {}).get("current", {}).get("processed", 0)


def reopen_interrupted_epoch(checkpoint: dict[str, Any]) -> None:
    """Count an epoch that ``fit`` left at ``max_steps`` as unfinished, as a save inside it would.

    When ``max_steps`` ends ``fit`` mid-epoch, Lightning's fit loop still marks the epoch completed,
    so a ``trainer.save_checkpoint`` after ``fit`` would resume in the *next* epoch (a new shuffle)
    at the batch index where this one stopped. The batch counters say whether the epoch really
    ended (its last batch was processed); if not, the epoch counters go back one step.
    """
    loop = _fit_loop(checkpoint)
    batches, epochs = loop.get("epoch_loop.batch_progress"), loop.get("epoch_progress")
    if not batches or not epochs or batches.get("is_last_batch", True) or not batches["current"]["processed"]:
        return
    if epochs["current"]["ready"] and epochs["current"]["completed"] == epochs["current"]["ready"]:
        for counts in (epochs["total"], epochs["current"]):
            counts["processed"] -= 1
            counts["completed"] -= 1
        checkpoint["epoch"] = epochs["current"]["completed"]


def pop_loader_states(checkpoint: dict[str, Any]) -> list[Any] | None:
    """Take the fit loop's saved loader states (``combined_loader``) out of a checkpoint."""
    return _fit_loop(checkpoint).get("state_dict", {}).pop("combined_loader", None)


def put_loader_states(checkpoint: dict[str, Any], states: list[Any]) -> None:
    """Give the fit loop of a loaded checkpoint these loader states (``combined_loader``)."""
    _fit_loop(checkpoint).get("state_dict", {})["combined_loader"] = states


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a ``LightningOptimizer``."""
    return getattr(optimizer, "_optimizer", optimizer)


# Accelerate -----------------------------------------------------------------------------------
def mark_prepared(loader: Any) -> Any:
    """Mark a loader prepared (``_is_accelerate_prepared``) so ``accelerator.prepare`` keeps our dp sharding."""
    loader._is_accelerate_prepared = True
    return loader


# ``Accelerator`` methods ``ContextParallelPlugin`` wraps on the user's accelerator (that instance only),
# because Accelerate has no public hook for what must change under context parallelism: ``gather`` over
# dp ranks only, ``skip_first_batches`` keeping the loader context parallel, ``no_sync`` letting DDP's
# first static-graph backward sync. Everything else goes through Accelerate's public hooks. Each
# wrapper keeps the signature recorded here, from the verified version; tests/test_compat.py fails
# when Accelerate changes one.
ACCELERATOR_WRAPS: dict[str, str] = {
    "gather": "(self, tensor)",
    "skip_first_batches": "(self, dataloader, num_batches: 'int' = 0)",
    "no_sync": "(self, model)",
}


def wrap_accelerator(accelerator: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Set ``accelerator.<name>`` (one of :data:`ACCELERATOR_WRAPS`) to ``wrap(the bound method it had)``."""
    if name not in ACCELERATOR_WRAPS:
        raise ValueError(f"Accelerator.{name} is not among the methods cp_plugin may wrap ({sorted(ACCELERATOR_WRAPS)})")
    original = getattr(accelerator, name)
    setattr(accelerator, name, functools.wraps(original)(wrap(original)))
