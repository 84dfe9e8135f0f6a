"""Products of a recorded tensor keep what it was made of, not the tensor.

A DiT block modulates and gates its streams inline: ``norm2(h) * (1 + scale)`` before its
feed-forward network, ``gate * attn(...)`` after its attention. Each product keeps its wide operand
for the gradient of the narrow one (the scale, the gate), so a block's recompute holds a
normalization's output and an attention's output projection, each of the block's width, until the
backward reaches them. Both were recorded as they were made (:mod:`cp_plugin.made`): the norm's from
its input, the projection's from the attention's output, which the block keeps anyway. While a block
runs, a torch function mode takes every product of a recorded tensor and another that needs a
gradient through :class:`_ProductOfMade`, which keeps what the recorded tensor was made of and makes
it again in the backward. Made again, it is the same tensor, so the gradients are bit for bit those
of the product. Anything else (a product whose other factor needs no gradient, a tensor written in
place since, a tensor no record names) runs as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.hooks.hooks import ModelHook
from torch.overrides import TorchFunctionMode

from cp_plugin.compat import is_symbolic
from cp_plugin.made import Made
from cp_plugin.model import Conversion
from cp_plugin.plans import outermost
from cp_plugin.tiling import Tiles

# The out-of-place products of two tensors, as a block writes them (``a * b``, ``torch.mul``, ``a.mul(b)``).
PRODUCTS = frozenset({torch.mul, torch.multiply, torch.Tensor.mul, torch.Tensor.multiply, torch.Tensor.__mul__,
                      torch.Tensor.__rmul__})

PRODUCTS_OF_MADE = "products_of_made"  # what the hook running a block under :class:`ProductsOfMade` is registered as


class _ProductOfMade(torch.autograd.Function):
    """``x * other`` for ``x`` a recorded tensor, keeping what ``x`` was made of rather than ``x``: the backward makes
    ``x`` again for ``other``'s gradient (autograd sums each gradient over what was broadcast, as for a product)."""

    @staticmethod
    def forward(ctx, x, other, made, *kept):  # type: ignore[override]
        ctx.save_for_backward(other, *kept)
        ctx.made = made.skeleton()
        return x * other

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        other, *kept = ctx.saved_tensors
        grad_x = grad * other if ctx.needs_input_grad[0] else None
        grad_other = grad * ctx.made.make(iter(kept))
        return grad_x, grad_other, None, *(None for _ in kept)


def _plain(x: Any) -> bool:
    """Whether ``x`` is a plain tensor or parameter (no subclass, such as a DTensor, whose ops another layer handles)."""
    return type(x) in (torch.Tensor, torch.nn.Parameter)


class ProductsOfMade(TorchFunctionMode):
    """Takes a product of a recorded tensor (of tokens ``tiles`` takes) and another that needs a gradient through
    :class:`_ProductOfMade`."""

    def __init__(self, made: Made, tiles: Tiles) -> None:
        super().__init__()
        self.made, self.tiles = made, tiles

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in PRODUCTS and len(args) == 2 and not kwargs and torch.is_grad_enabled():
            for x, other in (args, args[::-1]):
                if (_plain(x) and _plain(other) and other.requires_grad and not is_symbolic(x)
                        and self.tiles.takes(x) and torch.broadcast_shapes(x.shape, other.shape) == x.shape):
                    source = self.made.source(x)
                    if source is not None:
                        return _ProductOfMade.apply(x, other, source, *source.kept())
        return func(*args, **kwargs)


class KeepsProductsMade(ModelHook):
    """Runs a block under :class:`ProductsOfMade` where gradients are recorded and one of its tensor arguments has the
    tokens ``tiles`` takes (a block of fewer makes no record: its ops run without the mode's look at each)."""

    def __init__(self, made: Made, tiles: Tiles) -> None:
        super().__init__()
        self.made, self.tiles = made, tiles

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if (not torch.is_grad_enabled() or torch.compiler.is_compiling()
                or not any(isinstance(a, torch.Tensor) and a.dim() >= 2 and not is_symbolic(a) and self.tiles.takes(a)
                           for a in (*args, *kwargs.values()))):
            return forward(*args, **kwargs)
        with ProductsOfMade(self.made, self.tiles):
            return forward(*args, **kwargs)


def keep_products_made(module: torch.nn.Module, conversion: Conversion, made: Made, producers: list[torch.nn.Module],
                       tiles: Tiles) -> None:
    """Run each block of ``module`` holding one of ``producers`` (the layers whose outputs ``made`` records) under
    :class:`ProductsOfMade`: the outermost modules that are their parents, short of a diffusers model itself (whose
    blocks are what a checkpoint recomputes, each with its hooks)."""
    ids = {id(p) for p in producers}
    inside_models = {id(sub) for model in module.modules() if isinstance(model, ModelMixin)
                     for sub in model.modules() if not isinstance(sub, ModelMixin)}
    for _, block in outermost(module, lambda sub: id(sub) in inside_models
                              and any(id(child) in ids for child in sub.children())):
        conversion.hook(block, KeepsProductsMade(made, tiles), PRODUCTS_OF_MADE)
