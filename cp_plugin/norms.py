"""Normalization layers recomputed in the backward instead of saving their normalized output.

A DiT block normalizes its tokens several times, and each normalization keeps a tensor of the block's
width for the backward beyond its input: an RMS norm of queries or keys keeps ``x / rms(x)`` for its
weight's gradient (``torch.nn.RMSNorm`` and diffusers' ``RMSNorm`` outside a fused kernel), and an
adaptive layer norm keeps ``norm(x)`` for the gradient of the scale it multiplies by. Under
checkpointing a block's recompute holds all of them at once: at long sequences they are a fifth of
the peak. Recomputing a normalization costs one elementwise pass over its input, so each of these
layers runs under ``torch.utils.checkpoint`` (nested in the block's own checkpoint where there is
one): it keeps only its inputs, which the layers before and after it keep anyway, and the same ops
run again in the backward, so the gradients are those of the untouched layer. Layers are found by
class (the normalizations above, whose forward reads each token alone); one another hook wraps
(a context-parallel split or gather) is left as it is, so a recompute never communicates.

Two tensors of the block's width would still be kept around each attention: the adaptive norm's
output, which the query, key and value layers keep as their input for their weights' gradients, and
the query and key layers' outputs, which the RMS norms of queries and keys keep as their input. Both
are cheap to make again from what they were made of. So the outputs of these norms, and of the linear
layers in attention layers or beside a single-input norm (a child of the same module), are recorded
as they are made (:class:`Made`): how, from which tensors. A linear layer given a recorded output
keeps what that output was made of and makes it again in its backward for its weight's gradient
(:class:`_LinearOfMade`); an RMS norm given a linear layer's recorded output (``norm_q(to_q(x))``,
heads split by a view between them) does the same for its own backward (:class:`_ProjectedNorm`), and
where ``x`` is a recorded norm's output, it keeps what that norm took, so neither tensor is kept. What
is kept is what the block keeps anyway (its input, the modulation, the weights). A record is taken
only for exactly that tensor, or a view of all of it, unchanged since (same version, its inputs
unchanged, same autocast); anything else (a LoRA layer's sum, a part of a fused projection, a tensor
written in place or returned by another hook) is kept as it is. Made again, a tensor comes from the
same ops on the same inputs: the gradients are bit for bit those of the untouched layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook
from diffusers.models import normalization
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from cp_plugin.compat import forward_is_hooked_only_by, is_symbolic, tensor_version, unviewed, view_base
from cp_plugin.model import Conversion, hook_name
from cp_plugin.plans import attention_modules
from cp_plugin.tiling import INLINE_MLP_BLOCK, MIN_TILED_TOKENS, autocast_state, recorded_autocast

# Normalizations that save a normalized tensor of their input's size for their weight's or modulation's gradient.
RECOMPUTED_NORMS = (
    torch.nn.RMSNorm, normalization.RMSNorm, normalization.MochiRMSNorm, normalization.AdaLayerNorm,
    normalization.AdaLayerNormZero, normalization.AdaLayerNormZeroSingle, normalization.AdaLayerNormContinuous,
    normalization.SD35AdaLayerNormZeroX, normalization.LuminaRMSNormZero, normalization.LuminaLayerNormContinuous,
    normalization.CogView3PlusAdaLayerNormZeroTextImage, normalization.CogVideoXLayerNormZero,
)


# Normalizations of one tensor alone: the RMS norms of queries and keys, which a linear layer beside them feeds.
SINGLE_INPUT_NORMS = (torch.nn.RMSNorm, normalization.RMSNorm, normalization.MochiRMSNorm)


RECOMPUTED_NORM = "recomputed_norm"
RECORDED_PROJECTION = "recorded_projection"
# The hooks a recomputed norm may run inside: its own, and tiling's over an adaptive norm's ``linear(silu(emb))``.
RUNS_UNDER = frozenset({hook_name(RECOMPUTED_NORM), hook_name(INLINE_MLP_BLOCK)})


def _root(x: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``x``'s storage: ``x``, or what it is a view of (a linear layer's 3-d output is a view of
    its 2-d product)."""
    base = view_base(x)
    return x if base is None else base


_KEPT = object()  # where a skeleton's tensor was


@dataclasses.dataclass
class _Made:
    """How a tensor was made, to make it again in a backward rather than keep it: ``fn(*args, **kwargs)`` (its
    ``index``-th output where it returns several) under ``autocast``, viewed as ``shape``. A tensor argument is kept;
    one that was made so itself is a ``_Made`` too, whose own arguments are kept instead."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    index: int | None
    autocast: tuple[str, torch.dtype, bool]
    shape: torch.Size
    versions: list[int] = dataclasses.field(default_factory=list)  # of the kept tensors, when made

    def __post_init__(self) -> None:
        self.versions = self.versions or [tensor_version(t) for t in self.kept()]

    def _inputs(self) -> list[Any]:
        return [*self.args, *self.kwargs.values()]

    def kept(self) -> list[torch.Tensor]:
        """The tensors it is made from: what a backward that makes it again saves."""
        kept: list[torch.Tensor] = []
        for a in self._inputs():
            kept.extend(a.kept() if isinstance(a, _Made) else [a] if isinstance(a, torch.Tensor) else [])
        return kept

    def unchanged(self) -> bool:
        """Whether no tensor it is made from was written in place since: made again, it is what it was."""
        return [tensor_version(t) for t in self.kept()] == self.versions

    def skeleton(self) -> _Made:
        """It without its tensors (each a placeholder, filled by :meth:`make` in the order of :meth:`kept`), for an
        autograd function to hold beside its saved tensors: a tensor it held itself would outlive a checkpoint."""
        def bare(a: Any) -> Any:
            return a.skeleton() if isinstance(a, _Made) else _KEPT if isinstance(a, torch.Tensor) else a

        return dataclasses.replace(self, args=tuple(bare(a) for a in self.args),
                                   kwargs={name: bare(a) for name, a in self.kwargs.items()}, versions=[])

    def make(self, kept: Iterator[torch.Tensor]) -> torch.Tensor:
        """It again, from the tensors :meth:`kept` listed, in their order."""
        def again(a: Any) -> Any:
            return a.make(kept) if isinstance(a, _Made) else next(kept) if a is _KEPT else a

        args = [again(a) for a in self.args]
        kwargs = {name: again(a) for name, a in self.kwargs.items()}
        with torch.no_grad(), recorded_autocast(self.autocast):
            out = self.fn(*args, **kwargs)
        return (out if self.index is None else out[self.index]).view(self.shape)


class Made:
    """The outputs of recomputed norms and of the linear layers that take or feed them, each while it lives, with how
    it was made."""

    def __init__(self) -> None:
        self.made: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def record(self, out: Any, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record each tensor in ``out`` (a tensor, or a tuple such as an adaptive norm's) as ``fn(*args, **kwargs)``."""
        args, kwargs = tuple(self.source(a) or a for a in args), {k: self.source(a) or a for k, a in kwargs.items()}
        outputs = [(None, out)] if isinstance(out, torch.Tensor) else enumerate(out) if isinstance(out, tuple) else []
        autocast = None
        for index, tensor in outputs:
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2:
                autocast = autocast or autocast_state(tensor.device.type)
                self.made[_root(tensor)] = (tensor_version(tensor),
                                            _Made(fn, args, kwargs, index, autocast, tensor.shape))

    def source(self, x: Any) -> _Made | None:
        """How ``x`` was made, if it is a recorded output (or a view of all of one in its layout) unchanged since."""
        if not isinstance(x, torch.Tensor):
            return None
        out = _root(x)
        entry = self.made.get(out)
        if entry is None or entry[0] != tensor_version(out) or not entry[1].unchanged():
            return None
        made = entry[1]
        if made.autocast != autocast_state(x.device.type) or x.numel() != out.numel():
            return None
        if x.storage_offset() != out.storage_offset() or not (x.is_contiguous() and out.is_contiguous()):
            return None
        return dataclasses.replace(made, shape=x.shape, versions=made.versions)


class _ProjectedNorm(torch.autograd.Function):
    """``norm(y)`` for ``y`` made by a linear layer (or a view of it), keeping what ``y`` was made from rather than
    ``y``: the backward makes ``y`` again under the forward's autocast, then the norm, and takes the gradients of ``y``
    and of the norm's parameters."""

    @staticmethod
    def forward(ctx, y, made, norm, module, *kept_and_params):  # type: ignore[override]
        ctx.save_for_backward(*kept_and_params[:len(made.kept())])
        ctx.made, ctx.norm, ctx.module = made.skeleton(), norm, module
        return norm(y)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        kept = ctx.saved_tensors  # once: under a checkpoint, each saved tensor may be unpacked only once
        y = ctx.made.make(iter(kept)).requires_grad_()
        params = [p for p in ctx.module.parameters() if p.requires_grad]
        with torch.enable_grad(), recorded_autocast(ctx.made.autocast):
            out = ctx.norm(y)
        grads = torch.autograd.grad(out, [y, *params], grad, allow_unused=True)
        return grads[0], None, None, None, *(None for _ in kept), *grads[1:]


class _LinearOfMade(torch.autograd.Function):
    """``linear(x)`` for ``x`` a recomputed norm's output (or made from one), keeping what ``x`` was made from rather
    than ``x``: the backward makes ``x`` again for the weight's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, made, *kept):  # type: ignore[override]
        ctx.save_for_backward(weight, *kept)
        ctx.made, ctx.has_bias = made.skeleton(), bias is not None
        return unviewed(torch.nn.functional.linear(x, weight, bias))  # the caller may write it in place

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight, *kept = ctx.saved_tensors
        x = ctx.made.make(iter(kept))
        grads = grad.reshape(-1, grad.shape[-1])
        grad_x = grads.mm(weight.to(grads.dtype)).view(*grad.shape[:-1], weight.shape[-1])
        grad_weight = x.reshape(-1, x.shape[-1]).to(grads.dtype).t().mm(grads).t().to(weight.dtype)
        grad_bias = grads.sum(0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None, *(None for _ in kept)


def _long_enough(x: torch.Tensor, rows: int | None) -> bool:
    """Whether ``x`` has the tokens (counted over every dimension but the features) from which a call is recomputed:
    ``rows``, or ``MIN_TILED_TOKENS`` where it is ``None``."""
    return x.shape[:-1].numel() >= (MIN_TILED_TOKENS if rows is None else rows)


class RecordedProjection(ModelHook):
    """On a linear layer in an attention layer or beside a single-input norm: takes a recorded input through
    :class:`_LinearOfMade`, and (beside a single-input norm, which may take them) records the outputs gradients are
    recorded for. A record holds what the output was made of while the output lives: only an output a norm may take
    is recorded, so that a frozen layer's input (which its own backward does not keep) is not held."""

    def __init__(self, made: Made, rows: int | None, records: bool) -> None:
        super().__init__()
        self.made, self.rows, self.records = made, rows, records

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        x = args[0] if len(args) == 1 and not kwargs else None
        if (not isinstance(x, torch.Tensor) or not torch.is_grad_enabled() or torch.compiler.is_compiling()
                or is_symbolic(x) or not _long_enough(x, self.rows)):
            return forward(*args, **kwargs)
        source = self.made.source(x)
        if source is None:
            out = forward(x)
        else:
            out = _LinearOfMade.apply(x, module.weight, module.bias, source, *source.kept())
        if self.records:
            self.made.record(out, torch.nn.functional.linear, (x, module.weight, module.bias), {})
        return out


class RecomputedNorm(ModelHook):
    """Runs a normalization layer under a non-reentrant checkpoint where gradients are recorded for enough tokens; of a
    recorded linear layer's output, through :class:`_ProjectedNorm`. Records its outputs."""

    def __init__(self, rows: int | None, made: Made) -> None:
        super().__init__()
        self.rows, self.made = rows, made

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        x = next((a for a in (*args, kwargs.get("hidden_states")) if isinstance(a, torch.Tensor)), None)
        if (x is None or not torch.is_grad_enabled() or torch.compiler.is_compiling() or is_symbolic(x)
                or not forward_is_hooked_only_by(module, RUNS_UNDER)
                or not _long_enough(x, self.rows)):
            return forward(*args, **kwargs)
        single = isinstance(module, SINGLE_INPUT_NORMS) and len(args) == 1 and not kwargs
        source = self.made.source(x) if single else None
        if source is not None:
            out = _ProjectedNorm.apply(x, source, forward, module, *source.kept(),
                                       *(p for p in module.parameters() if p.requires_grad))
        else:
            out = checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
        self.made.record(out, forward, args, kwargs)
        return out


def recompute_norms(module: torch.nn.Module, conversion: Conversion, rows: int | None = None) -> None:
    """Hook every normalization layer of :data:`RECOMPUTED_NORMS` in ``module`` into ``conversion`` (undone by its
    ``remove()``); ``rows``: the tokens from which a call is recomputed (``None``: ``MIN_TILED_TOKENS``)."""
    hooked: list[str] = []
    made = Made()
    for name, sub in module.named_modules():
        if isinstance(sub, RECOMPUTED_NORMS) and not any(name.startswith(f"{outer}.") for outer in hooked):
            conversion.hook(sub, RecomputedNorm(rows, made), RECOMPUTED_NORM)
            hooked.append(name)  # a norm inside it is recomputed with it
    beside_norms = {id(child) for parent in module.modules()
                    if any(isinstance(child, SINGLE_INPUT_NORMS) for child in parent.children())
                    for child in parent.children()}
    layers = {id(sub): sub for _, attn in attention_modules(module) for sub in attn.modules()}
    layers.update((id(sub), sub) for sub in module.modules() if id(sub) in beside_norms)
    for key, layer in layers.items():  # a layer another hook already wraps (tiling's) is left alone
        if type(layer) is torch.nn.Linear and forward_is_hooked_only_by(layer, ()):
            conversion.hook(layer, RecordedProjection(made, rows, key in beside_norms), RECORDED_PROJECTION)
