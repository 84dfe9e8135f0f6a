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

Two tensors of the block's width would still be kept around each attention: the adaptive norm's output,
which the query, key and value layers keep as their input for their weights' gradients, and the query
and key layers' outputs, which the RMS norms of queries and keys keep as their input. Both are cheap to
make again from what they were made of. So the outputs of these norms (and of layer norms, which a
block's modulation multiplies: :mod:`cp_plugin.products`), and of the linear layers in attention layers
or beside a single-input norm (a child of the same module), or of the layers an adapter wraps there
(peft's LoRA: the base layer's output plus the adapter's, :class:`RecordedAdapter`), are recorded as
they are made (:class:`Made`, :mod:`cp_plugin.made`): how, from which tensors. A linear layer given a
recorded output keeps what that output was made of and makes it again in its backward for its weight's
gradient (:class:`_LinearOfMade`); an RMS norm given a linear layer's recorded output
(``norm_q(to_q(x))``, heads split by a view between them) does the same for its own backward
(:class:`_ProjectedNorm`), and where ``x`` is a recorded norm's output, it keeps what that norm took, so
neither tensor is kept. What is kept is what the block keeps anyway (its input, the modulation, the
weights). A record is taken only for exactly that tensor, or a view of all of it, unchanged since (same
version, its inputs unchanged, same autocast); anything else (a part of a fused projection, a tensor
written in place or returned by another hook, an adapter's sum while its dropout draws) is kept as it
is. Made again, a tensor comes from the same ops on the same inputs: the gradients are bit for bit those
of the untouched layers.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook
from diffusers.models import normalization
from torch.utils.checkpoint import checkpoint

from cp_plugin.compat import forward_is_hooked_only_by, is_symbolic, unviewed
from cp_plugin.made import Made
from cp_plugin.model import Conversion, hook_name
from cp_plugin.plans import attention_modules, outermost
from cp_plugin.tiling import INLINE_MLP_BLOCK, Tiles, linear_layer, recorded_autocast

# Normalizations that save a normalized tensor of their input's size for their weight's or modulation's gradient.
RECOMPUTED_NORMS = (
    torch.nn.RMSNorm, normalization.RMSNorm, normalization.MochiRMSNorm, normalization.AdaLayerNorm,
    normalization.AdaLayerNormZero, normalization.AdaLayerNormZeroSingle, normalization.AdaLayerNormContinuous,
    normalization.SD35AdaLayerNormZeroX, normalization.LuminaRMSNormZero, normalization.LuminaLayerNormContinuous,
    normalization.CogView3PlusAdaLayerNormZeroTextImage, normalization.CogVideoXLayerNormZero,
)


# Pieces of rows a projected norm's backward takes the gradient of its input in.
NORM_PIECES = 8


def normalized_dims(norm: torch.nn.Module) -> int:
    """The trailing dims a single-input norm normalizes over: ``torch.nn.RMSNorm``'s ``normalized_shape``, the last
    one for diffusers' RMS norms."""
    return len(norm.normalized_shape) if isinstance(norm, torch.nn.RMSNorm) else 1


# Normalizations whose output a block's modulation multiplies, kept by that product for the scale's gradient: only
# recorded, not recomputed (a layer norm keeps only its input and statistics for its own backward).
RECORDED_NORMS = (torch.nn.LayerNorm,)


# Normalizations of one tensor alone: the RMS norms of queries and keys, which a linear layer beside them feeds.
SINGLE_INPUT_NORMS = (torch.nn.RMSNorm, normalization.RMSNorm, normalization.MochiRMSNorm)


RECOMPUTED_NORM = "recomputed_norm"
RECORDED_PROJECTION = "recorded_projection"
RECORDED_ADAPTER = "recorded_adapter"
# The hooks a recomputed norm may run inside: its own, and tiling's over an adaptive norm's ``linear(silu(emb))``.
RUNS_UNDER = frozenset({hook_name(RECOMPUTED_NORM), hook_name(INLINE_MLP_BLOCK)})


class _ProjectedNorm(torch.autograd.Function):
    """``norm(y)`` for ``y`` made by a linear layer (or a view of it), keeping what ``y`` was made from rather than
    ``y``: the backward makes ``y`` again under the forward's autocast, then the norm. A norm's backward, as autograd
    runs its ops, holds several tensors of ``y``'s size at once (an RMS norm's square, scaled input and their
    gradients): the gradient of ``y`` is taken a piece of rows at a time (the norm reads each row alone, so each row's
    gradient is what it was), and the parameters' from the whole norm again with ``y`` as a constant, whose backward
    holds one such tensor."""

    @staticmethod
    def forward(ctx, y, made, norm, module, *kept_and_params):  # type: ignore[override]
        ctx.save_for_backward(*kept_and_params[:len(made.kept())])
        ctx.made, ctx.norm, ctx.module = made.skeleton(), norm, module
        return norm(y)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        kept = ctx.saved_tensors  # once: under a checkpoint, each saved tensor may be unpacked only once
        y = ctx.made.make(iter(kept))
        params = [p for p in ctx.module.parameters() if p.requires_grad]
        trailing = y.dim() - normalized_dims(ctx.module)
        rows, grads = y.reshape(-1, *y.shape[trailing:]), grad.reshape(-1, *y.shape[trailing:])
        grad_y = torch.empty_like(rows)
        size = -(-rows.shape[0] // NORM_PIECES)
        for start in range(0, rows.shape[0], size):
            part = slice(start, start + size)
            row = rows[part].detach().requires_grad_()
            with torch.enable_grad(), recorded_autocast(ctx.made.autocast):
                out = ctx.norm(row)
            (grad_y[part],) = torch.autograd.grad(out, row, grads[part])
        grad_params: tuple[torch.Tensor | None, ...] = ()
        if params:
            with torch.enable_grad(), recorded_autocast(ctx.made.autocast):
                out = ctx.norm(y)
            grad_params = torch.autograd.grad(out, params, grad, allow_unused=True)
        return grad_y.view(y.shape), None, None, None, *(None for _ in kept), *grad_params


class _LinearOfMade(torch.autograd.Function):
    """``linear(x)`` for ``x`` a recomputed norm's output (or made from one), keeping what ``x`` was made from rather
    than ``x``: the backward makes ``x`` again for the weight's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, made, *kept):  # type: ignore[override]
        ctx.save_for_backward(weight, *(kept if ctx.needs_input_grad[1] else ()))
        ctx.made, ctx.has_bias, ctx.kept = made.skeleton(), bias is not None, len(kept)
        return unviewed(torch.nn.functional.linear(x, weight, bias))  # the caller may write it in place

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight, *kept = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]  # a frozen layer (LoRA's base) makes nothing again
        grads = grad.reshape(-1, grad.shape[-1])
        grad_x = grads.mm(weight.to(grads.dtype)).view(*grad.shape[:-1], weight.shape[-1]) if needs_x else None
        grad_weight = None
        if needs_weight:
            x = ctx.made.make(iter(kept))
            grad_weight = x.reshape(-1, x.shape[-1]).to(grads.dtype).t().mm(grads).t().to(weight.dtype)
        grad_bias = grads.sum(0) if ctx.has_bias and needs_bias else None
        return grad_x, grad_weight, grad_bias, None, *(None,) * ctx.kept


def recordable(x: Any, tiles: Tiles) -> bool:
    """Whether a layer's one input ``x`` makes a call whose output is recorded: a tensor of enough tokens, with
    gradients recorded, outside compilation and symbolic sizes."""
    return (isinstance(x, torch.Tensor) and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not is_symbolic(x) and tiles.takes(x))


class RecordedProjection(ModelHook):
    """On a linear layer in an attention layer or beside a single-input norm: takes a recorded input through
    :class:`_LinearOfMade`, and records the outputs gradients are recorded for (which a norm, or a product with a
    gate, may take)."""

    def __init__(self, made: Made, tiles: Tiles) -> None:
        super().__init__()
        self.made, self.tiles = made, tiles

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        x = args[0] if len(args) == 1 and not kwargs else None
        if not recordable(x, self.tiles):
            return forward(*args, **kwargs)
        source = self.made.source(x)
        if source is None:
            out = forward(x)
        else:
            out = _LinearOfMade.apply(x, module.weight, module.bias, source, *source.kept())
        self.made.record(out, torch.nn.functional.linear, (x, module.weight, module.bias), {})
        return out


# Layers whose forward draws random numbers in training: a call made again would not be the call that was made.
DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
           torch.nn.FeatureAlphaDropout)


class RecordedAdapter(ModelHook):
    """On a layer an adapter wraps in an attention layer (peft's LoRA: the base layer's output plus a low-rank update
    of each token): records its output as its own forward of its input, so a norm or a product that takes it
    (``norm_q(to_q(x))``, ``gate * to_out(a)``) keeps what it was made of rather than the sum. The base and the
    adapter's own linear layers are hooked as any other. Not while a dropout in it draws (made again, it would draw
    another mask)."""

    def __init__(self, made: Made, tiles: Tiles) -> None:
        super().__init__()
        self.made, self.tiles = made, tiles

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        out = forward(*args, **kwargs)
        x = args[0] if len(args) == 1 and not kwargs else None
        if recordable(x, self.tiles) and not any(isinstance(m, DROPOUT) and m.p > 0 and m.training
                                                for m in module.modules()):
            self.made.record(out, forward, (x,), {})
        return out


class RecomputedNorm(ModelHook):
    """Runs a normalization layer of :data:`RECOMPUTED_NORMS` under a non-reentrant checkpoint where gradients are
    recorded for enough tokens; of a recorded linear layer's output, through :class:`_ProjectedNorm`. Records its
    outputs (a layer norm's, which is not recomputed, too)."""

    def __init__(self, tiles: Tiles, made: Made) -> None:
        super().__init__()
        self.tiles, self.made = tiles, made

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        x = next((a for a in (*args, kwargs.get("hidden_states")) if isinstance(a, torch.Tensor)), None)
        if (x is None or not torch.is_grad_enabled() or torch.compiler.is_compiling() or is_symbolic(x)
                or not forward_is_hooked_only_by(module, RUNS_UNDER)
                or not self.tiles.takes(x)):
            return forward(*args, **kwargs)
        single = isinstance(module, SINGLE_INPUT_NORMS) and len(args) == 1 and not kwargs
        source = self.made.source(x) if single else None
        if source is not None:
            out = _ProjectedNorm.apply(x, source, forward, module, *source.kept(),
                                       *(p for p in module.parameters() if p.requires_grad))
        elif isinstance(module, RECOMPUTED_NORMS):
            out = checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
        else:
            out = forward(*args, **kwargs)
        self.made.record(out, forward, args, kwargs)
        return out


def recompute_norms(module: torch.nn.Module, conversion: Conversion, tiles: Tiles | None = None
                    ) -> tuple[Made, list[torch.nn.Module]]:
    """Hook every normalization layer of :data:`RECOMPUTED_NORMS` and :data:`RECORDED_NORMS` in ``module`` into
    ``conversion`` (undone by its ``remove()``); ``tiles``: the calls recomputed and recorded (``None``:
    :meth:`Tiles.every`). Returns the records and the layers that make them (the norms and attention layers)."""
    tiles = Tiles.every() if tiles is None else tiles
    made = Made()
    # a norm inside another is recomputed with it
    producers = [sub for _, sub in outermost(module, lambda sub: isinstance(sub, (*RECOMPUTED_NORMS, *RECORDED_NORMS)))]
    for norm in producers:
        conversion.hook(norm, RecomputedNorm(tiles, made), RECOMPUTED_NORM)
    attentions = [attn for _, attn in attention_modules(module)]
    layers = {id(sub): sub for attn in attentions for sub in attn.modules()}
    for parent in module.modules():
        if any(isinstance(child, SINGLE_INPUT_NORMS) for child in parent.children()):
            layers.update((id(child), child) for child in parent.children())
    for layer in layers.values():  # a layer another hook already wraps (tiling's) is left alone
        if not forward_is_hooked_only_by(layer, ()):
            continue
        if type(layer) is torch.nn.Linear:
            conversion.hook(layer, RecordedProjection(made, tiles), RECORDED_PROJECTION)
        elif linear_layer(layer) is not None:
            conversion.hook(layer, RecordedAdapter(made, tiles), RECORDED_ADAPTER)
    return made, producers + attentions
