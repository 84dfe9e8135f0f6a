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

An RMS norm of a linear layer's output (an attention's ``norm_q(to_q(x))``, its heads split by a view
between them) would still keep that output, a tensor of the block's width, as its checkpoint's input:
through a block's recompute, one each for queries and keys. Where the linear layer is the norm's
sibling (a child of the same module), the layer's output is recorded as it is made, and the norm
keeps the layer's input instead (which the layer keeps anyway), recomputing the layer's output in
its backward (:class:`_ProjectedNorm`). It is taken only where the norm is given exactly that
output, or a view of all of it, unchanged since (same version, same input, same autocast); anything
else (a LoRA layer's sum, a tensor another hook returned) takes the plain checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook
from diffusers.models import normalization
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from cp_plugin.compat import forward_is_hooked_only_by, is_symbolic, tensor_version, view_base
from cp_plugin.model import Conversion, hook_name
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


@dataclasses.dataclass
class _Projection:
    """``layer(x)``, as a linear layer computed it: what a norm of it recomputes in its backward."""

    x: torch.Tensor
    layer: torch.nn.Linear
    versions: tuple[int, int]  # of ``x`` and of the output, when made
    autocast: tuple[str, torch.dtype, bool]


class Projections:
    """The outputs of the linear layers beside single-input norms, each while it lives, with how it was made."""

    def __init__(self) -> None:
        self.made: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def source(self, x: torch.Tensor) -> _Projection | None:
        """How ``x`` was made, if it is a recorded output unchanged since, or a view of all of one in its layout."""
        out = _root(x)
        projection = self.made.get(out)
        if (projection is None or projection.versions != (tensor_version(projection.x), tensor_version(out))
                or projection.autocast != autocast_state(x.device.type)):
            return None
        whole = x.numel() == out.numel() and x.storage_offset() == out.storage_offset()
        return projection if whole and x.is_contiguous() and out.is_contiguous() else None


class RecordedProjection(ModelHook):
    """On a linear layer beside a single-input norm: records each output gradients are recorded for."""

    def __init__(self, projections: Projections) -> None:
        super().__init__()
        self.projections = projections

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = self.fn_ref.original_forward(*args, **kwargs)
        x = args[0] if len(args) == 1 and not kwargs else None
        if (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not is_symbolic(x)):
            self.projections.made[_root(out)] = _Projection(x, module, (tensor_version(x), tensor_version(out)),
                                                            autocast_state(x.device.type))
        return out


class _ProjectedNorm(torch.autograd.Function):
    """``norm(y)`` for ``y = layer(x)`` (or a view of it), saving ``x`` rather than ``y``: the backward recomputes ``y``
    under the forward's autocast, then the norm, and takes the gradients of ``y`` and of the norm's parameters."""

    @staticmethod
    def forward(ctx, y, x, weight, bias, norm, module, autocast, *params):  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias)
        ctx.norm, ctx.module, ctx.autocast, ctx.shape = norm, module, autocast, y.shape
        return norm(y)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        params = [p for p in ctx.module.parameters() if p.requires_grad]
        with torch.enable_grad(), recorded_autocast(ctx.autocast):
            y = torch.nn.functional.linear(x, weight, bias).detach().view(ctx.shape).requires_grad_()
            out = ctx.norm(y)
        grads = torch.autograd.grad(out, [y, *params], grad, allow_unused=True)
        return grads[0], None, None, None, None, None, None, *grads[1:]


class RecomputedNorm(ModelHook):
    """Runs a normalization layer under a non-reentrant checkpoint where gradients are recorded for enough tokens; of a
    recorded linear layer's output, through :class:`_ProjectedNorm`."""

    def __init__(self, rows: int | None, projections: Projections | None = None) -> None:
        super().__init__()
        self.rows, self.projections = rows, projections

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        x = next((a for a in (*args, kwargs.get("hidden_states")) if isinstance(a, torch.Tensor)), None)
        if (x is None or not torch.is_grad_enabled() or torch.compiler.is_compiling() or is_symbolic(x)
                or not forward_is_hooked_only_by(module, RUNS_UNDER)
                or x.shape[:-1].numel() < (MIN_TILED_TOKENS if self.rows is None else self.rows)):
            return forward(*args, **kwargs)
        source = None if self.projections is None or len(args) != 1 or kwargs else self.projections.source(x)
        if source is not None:
            layer = source.layer
            return _ProjectedNorm.apply(x, source.x, layer.weight, layer.bias, forward, module, source.autocast,
                                        *(p for p in module.parameters() if p.requires_grad))
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def recompute_norms(module: torch.nn.Module, conversion: Conversion, rows: int | None = None) -> None:
    """Hook every normalization layer of :data:`RECOMPUTED_NORMS` in ``module`` into ``conversion`` (undone by its
    ``remove()``); ``rows``: the tokens from which a call is recomputed (``None``: ``MIN_TILED_TOKENS``)."""
    hooked: list[str] = []
    projections = Projections()
    for name, sub in module.named_modules():
        if isinstance(sub, RECOMPUTED_NORMS) and not any(name.startswith(f"{outer}.") for outer in hooked):
            conversion.hook(sub, RecomputedNorm(rows, projections), RECOMPUTED_NORM)
            hooked.append(name)  # a norm inside it is recomputed with it
    for parent in module.modules():
        if any(isinstance(child, SINGLE_INPUT_NORMS) for child in parent.children()):
            for child in parent.children():  # a layer another hook already wraps (tiling's) is left alone
                if type(child) is torch.nn.Linear and forward_is_hooked_only_by(child, ()):
                    conversion.hook(child, RecordedProjection(projections), RECORDED_PROJECTION)
