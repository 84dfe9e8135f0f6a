"""Tiled feed-forward: a block's MLP runs over its tokens a chunk at a time, forward and backward.

A DiT block's largest working set at long sequences is its feed-forward hidden layer: ``tokens x
4 x width`` activations, and the backward keeps two of them (the activation's input and the output
projection's). A feed-forward network acts on every token alone, so it can take its tokens in
chunks and give the same result: each chunk runs under ``torch.utils.checkpoint``, which keeps only
the chunk's input (a view of the block's own tensor) and recomputes the chunk's hidden layer in the
backward, one chunk at a time. The hidden layer then never exists for more than one chunk, whether
the block itself is checkpointed or not; the price is one more forward of the feed-forward network.

What is tiled is found by structure, not by name: every diffusers ``FeedForward`` (the MLP of most
DiTs: Wan, HunyuanVideo, Flux's double-stream blocks, SD3, CogVideoX, LTX, ...), and every other
module built only of linear layers and pointwise activations that widens its input (Flux 2's and
Z-Image's SwiGLU networks, ...), outside attention layers, whose own forward calls nothing that
combines tokens (attention, a product of activations, a reduction, a reshape: Mochi's attention
pool is built of linear layers too, and is left whole). It is tiled only when called on one tensor,
so an input it combines with another (a modulation) is never cut. A hook in diffusers'
per-module registry does it, so no model code changes and ``remove()`` puts the model back. It
composes with context parallelism (each rank tiles its own tokens), with activation checkpointing
(torch nests the checkpoints) and with ``torch.compile`` (the chunks are traced into the graph);
the derived plan's symbolic probe sees each network whole.

An MLP a block writes inline instead, as Flux's and HunyuanVideo's single-stream blocks do
(``act_mlp(proj_mlp(x))``, concatenated with the attention's output before ``proj_out``), is no
module to tile. Its hidden layer is kept from the backward instead: where an elementwise activation
takes exactly what a widening linear layer beside it has just returned (checked per call, by
identity), it saves that layer's input, which the layer saves anyway, and the backward recomputes
the hidden layer a chunk of tokens at a time for the activation's derivative. The forward computes
what it always did; the backward holds one chunk of the hidden layer instead of all of it. Where a
narrowing linear layer beside them (Flux's ``proj_out``) then takes the concatenation of what an
attention layer beside them returned and what that activation returned, which it sees from the
concatenation's autograd node, it saves the attention's output and the MLP's input instead of the
concatenation, and its backward takes the concatenation's gradient, the hidden layer and both
layers' weight gradients a chunk of tokens at a time: neither the concatenation nor its gradient
(each as wide as the attention's output and the hidden layer together) is held whole.
"""

from __future__ import annotations

import inspect
import math
import re
import weakref
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook
from diffusers.models import activations
from diffusers.models.attention import FeedForward
from torch.utils.checkpoint import checkpoint

from cp_plugin.compat import is_symbolic
from cp_plugin.model import Conversion
from cp_plugin.plans import attention_modules

# Tokens below this are not tiled: a chunk's matrix products stay large enough to run at full speed, and a
# sequence this short has a hidden layer too small to be the step's peak.
MIN_TILED_TOKENS = 2048


# Parameterless activations of each element alone, as a block's own inline MLP applies them to its hidden layer.
ELEMENTWISE = (torch.nn.GELU, torch.nn.SiLU, torch.nn.ReLU, torch.nn.Tanh, torch.nn.Sigmoid, activations.FP32SiLU)


# Modules without children a token-wise network is built of: linear layers, pointwise activations, and the
# containers and dropouts adapters (peft's LoRA) add around them.
POINTWISE = (torch.nn.Linear, *ELEMENTWISE, torch.nn.Identity, torch.nn.Dropout, torch.nn.ModuleDict,
             torch.nn.ModuleList, torch.nn.ParameterDict, torch.nn.ParameterList, activations.GELU, activations.GEGLU,
             activations.SwiGLU, activations.ApproximateGELU, activations.LinearActivation)


# What a forward calls to combine tokens: attention, products of activations, reductions. A network whose own
# forward calls none of these (its children being linear layers and pointwise activations) acts on each token alone.
MIXES_TOKENS = re.compile(r"scaled_dot_product_attention|dispatch_attention_fn|softmax|matmul|bmm|einsum|baddbmm"
                          r"|\.(mean|sum|amax|max|min|logsumexp|cumsum|flatten|unflatten|view|reshape|transpose|permute)\(")


def mixes_tokens(module: torch.nn.Module) -> bool:
    """Whether the module's own forward may combine tokens (or its source cannot be read, which counts as yes)."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return True
    return MIXES_TOKENS.search(source) is not None


def is_feed_forward(module: torch.nn.Module) -> bool:
    """A diffusers ``FeedForward``, or a network of linear layers and pointwise activations that widens its input
    and whose forward combines no tokens."""
    if isinstance(module, FeedForward):
        return True
    if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
        return False  # containers are never called; what they hold is
    leaves = [m for m in module.modules() if next(m.children(), None) is None]
    linears = [m for m in leaves if isinstance(m, torch.nn.Linear)]
    return (len(linears) >= 2 and all(isinstance(m, POINTWISE) for m in leaves)
            and hidden_width(module) > linears[0].in_features and not mixes_tokens(module))


def feed_forward_networks(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost feed-forward networks in ``module`` that are not inside an attention layer."""
    attention = [f"{name}." for name, _ in attention_modules(module)]
    found: list[tuple[str, torch.nn.Module]] = []
    for name, sub in module.named_modules():
        inside = (any(f"{name}.".startswith(p) for p in attention)
                  or any(f == "" or name.startswith(f"{f}.") for f, _ in found))
        if not inside and is_feed_forward(sub):
            found.append((name, sub))
    return found


def hidden_width(module: torch.nn.Module) -> int:
    """The widest output of the network's linear layers (its hidden layer; 4 x width in most DiTs)."""
    return max((m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)), default=0)


def chunk_tokens(tokens: int, width: int, hidden: int, rows: int | None) -> int:
    """Tokens per chunk: ``rows`` if set, else as many chunks as the hidden layer is wider than the input,
    so that one chunk's hidden layer is the size of the block's input (no tiling below ``MIN_TILED_TOKENS``)."""
    if rows is not None:
        return rows
    if tokens < MIN_TILED_TOKENS or hidden <= width:
        return tokens
    return max(-(-tokens // math.ceil(hidden / width)), MIN_TILED_TOKENS // 2)


class TiledFeedForward(ModelHook):
    """Runs a token-wise network over the tokens of its input a chunk at a time, each chunk checkpointed."""

    def __init__(self, rows: int | None) -> None:
        super().__init__()
        self.rows = rows

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.hidden = hidden_width(module)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            return forward(*args, **kwargs)  # another input may pair with each token: keep them whole
        x = args[0]
        if not torch.compiler.is_compiling() and is_symbolic(x):  # the plan's probe: it must see the network whole
            return forward(x)
        tokens, width = x.shape[:-1].numel(), x.shape[-1]
        rows = chunk_tokens(tokens, width, self.hidden, self.rows)
        if rows >= tokens:
            return forward(x)
        parts = x.reshape(tokens, width).split(rows)
        if torch.is_grad_enabled():
            outputs = [checkpoint(forward, part, use_reentrant=False) for part in parts]
        else:
            outputs = [forward(part) for part in parts]
        out = torch.cat(outputs)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def inline_mlps(
    module: torch.nn.Module,
) -> list[tuple[str, torch.nn.Module, list[torch.nn.Linear], torch.nn.Module]]:
    """Elementwise activations outside attention layers and feed-forward networks, each with the widening linear
    layers beside it (children of the same parent) whose output it may take, and that parent: an MLP a block writes
    inline (Flux's and HunyuanVideo's single-stream blocks: ``act_mlp(proj_mlp(x))``, then concatenated with the
    attention's output and projected by ``proj_out``)."""
    outside = [f"{name}." for name, _ in attention_modules(module) + feed_forward_networks(module)]
    found = []
    for name, parent in module.named_modules():
        if any(f"{name}.".startswith(prefix) for prefix in outside):
            continue
        widening = [c for c in parent.children() if type(c) is torch.nn.Linear and c.out_features > c.in_features]
        for child_name, child in parent.named_children():
            if widening and type(child) in ELEMENTWISE:
                found.append((f"{name}.{child_name}" if name else child_name, child, widening, parent))
    return found


class _LastCall(ModelHook):
    """Remembers, without keeping them alive, a layer's last output while gradients are recorded, and its input where
    it took one tensor alone (a linear layer's)."""

    def __init__(self) -> None:
        super().__init__()
        self.output: weakref.ref[torch.Tensor] | None = None
        self.input: weakref.ref[torch.Tensor] | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.layer = module
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = self.fn_ref.original_forward(*args, **kwargs)
        if (torch.is_grad_enabled() and not torch.compiler.is_compiling() and isinstance(out, torch.Tensor)
                and not is_symbolic(out)):
            alone = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
            self.output, self.input = weakref.ref(out), weakref.ref(args[0]) if alone else None
        return out


def _autocast_state(device: str) -> tuple[str, torch.dtype, bool]:
    """The autocast a forward runs under, for its recompute in the backward (mixed precision)."""
    return device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)


def _activation_backward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: Any, grad: torch.Tensor,
    autocast: tuple[str, torch.dtype, bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(hidden), gradient of hidden)`` for ``hidden = linear(x)`` recomputed (a chunk of tokens) under the
    forward's ``autocast``, given ``grad``, the gradient of ``act(hidden)``."""
    device, dtype, enabled = autocast
    with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
        hidden = torch.nn.functional.linear(x, weight, bias).detach().requires_grad_()
        activated = act(hidden)
        (grad_hidden,) = torch.autograd.grad(activated, hidden, grad)
    return activated.detach(), grad_hidden


class _RecomputedHidden(torch.autograd.Function):
    """``act(hidden)`` for ``hidden = linear(x)``, saving ``x`` (which the linear layer saves anyway), not the hidden
    layer: the backward recomputes it a chunk of tokens at a time to take the activation's derivative."""

    @staticmethod
    def forward(ctx, hidden, x, linear, act, rows):  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.linear, ctx.act, ctx.rows, ctx.autocast = linear, act, rows, _autocast_state(x.device.type)
        return act(hidden)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        inputs, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_hidden = torch.empty_like(grads)
        for start in range(0, inputs.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            grad_hidden[part] = _activation_backward(inputs[part], ctx.linear.weight, ctx.linear.bias, ctx.act,
                                                     grads[part], ctx.autocast)[1]
        return grad_hidden.view(grad.shape), None, None, None, None


class RecomputedActivation(ModelHook):
    """An inline MLP's activation, when its input is what a linear layer beside it just returned: the hidden layer is
    not saved for the backward (its linear layer's input is), and is recomputed there in chunks of tokens."""

    def __init__(self, linears: list[_LastCall], rows: int | None) -> None:
        super().__init__()
        self.linears, self.rows = linears, rows
        # its last output, and how to recompute it: for a projection of a concatenation that holds it
        self.last: tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor], torch.nn.Linear, int] | None = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if len(args) != 1 or kwargs or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return forward(*args, **kwargs)
        hidden = args[0]
        if not isinstance(hidden, torch.Tensor) or not hidden.requires_grad:
            return forward(hidden)  # no backward to save anything for
        for call in self.linears:
            x = None if call.output is None or call.output() is not hidden or call.input is None else call.input()
            if x is None:
                continue
            tokens, width = x.shape[:-1].numel(), x.shape[-1]
            rows = chunk_tokens(tokens, width, hidden.shape[-1], self.rows)
            if tokens < MIN_TILED_TOKENS and self.rows is None:
                break
            out = _RecomputedHidden.apply(hidden, x, call.layer, forward, rows)
            self.last = weakref.ref(out), weakref.ref(x), call.layer, rows
            return out
        return forward(hidden)


class _ProjectedHidden(torch.autograd.Function):
    """``linear(cat([part, act(mlp(x))], -1))`` (Flux's ``proj_out`` of the attention's output and the inline MLP's)
    saving ``part`` and ``x``, not the concatenation: the backward takes the concatenation's gradient, the inline
    MLP's hidden layer and both layers' weight gradients a chunk of tokens at a time, so neither the
    concatenation nor its gradient, each as wide as the part and the hidden layer together, is ever held whole."""

    @staticmethod
    def forward(ctx, joined, part, x, w_mlp, b_mlp, w_out, b_out, act, rows):  # type: ignore[override]
        ctx.save_for_backward(part, x, w_mlp, b_mlp, w_out, b_out)
        ctx.act, ctx.rows, ctx.autocast = act, rows, _autocast_state(x.device.type)
        return torch.nn.functional.linear(joined, w_out, b_out)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        part, x, w_mlp, b_mlp, w_out, b_out = ctx.saved_tensors
        width = part.shape[-1]
        grads = grad.reshape(-1, grad.shape[-1])
        parts, inputs = part.reshape(-1, width), x.reshape(-1, x.shape[-1])
        grad_part, grad_x = torch.empty_like(parts), torch.empty_like(inputs)
        grad_w_out, grad_w_mlp = torch.zeros_like(w_out), torch.zeros_like(w_mlp)
        grad_b_mlp = None if b_mlp is None else torch.zeros_like(b_mlp)
        for start in range(0, grads.shape[0], ctx.rows):
            rows = slice(start, start + ctx.rows)
            activated, grad_hidden = _activation_backward(inputs[rows], w_mlp, b_mlp, ctx.act,
                                                          grads[rows] @ w_out[:, width:].to(grads.dtype), ctx.autocast)
            grad_part[rows] = grads[rows] @ w_out[:, :width].to(grads.dtype)
            grad_w_out[:, :width] += (grads[rows].t() @ parts[rows].to(grads.dtype)).to(w_out.dtype)
            grad_w_out[:, width:] += (grads[rows].t() @ activated.to(grads.dtype)).to(w_out.dtype)
            grad_x[rows] = (grad_hidden @ w_mlp.to(grad_hidden.dtype)).to(x.dtype)
            grad_w_mlp += (grad_hidden.t() @ inputs[rows].to(grad_hidden.dtype)).to(w_mlp.dtype)
            if grad_b_mlp is not None:
                grad_b_mlp += grad_hidden.sum(0).to(b_mlp.dtype)
        grad_b_out = None if b_out is None else grads.sum(0).to(b_out.dtype)
        return (None, grad_part.view(part.shape), grad_x.view(x.shape), grad_w_mlp, grad_b_mlp, grad_w_out, grad_b_out,
                None, None)


def _cat_dim(node: Any, dims: int) -> int:
    """The dimension a ``CatBackward0`` node's forward concatenated along, counted from 0."""
    dim = node._saved_dim
    dim = dim - 2**64 if dim >= 2**63 else dim  # stored unsigned
    return dim % dims


class ProjectedConcatenation(ModelHook):
    """A narrowing linear layer beside an inline MLP, when it takes the concatenation (last dim) of what an attention
    layer beside it returned and what the inline MLP's activation returned, found from that tensor's autograd node:
    the concatenation is not saved for the backward, which runs in chunks of tokens (:class:`_ProjectedHidden`)."""

    def __init__(self, attention: list[_LastCall], activations: list[RecomputedActivation]) -> None:
        super().__init__()
        self.attention, self.activations = attention, activations

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        joined = args[0] if len(args) == 1 and not kwargs and not torch.compiler.is_compiling() else None
        node = None if not isinstance(joined, torch.Tensor) or not torch.is_grad_enabled() else joined.grad_fn
        if (node is None or node.name() != "CatBackward0" or len(node.next_functions) != 2
                or _cat_dim(node, joined.dim()) != joined.dim() - 1):
            return forward(*args, **kwargs)
        edges = [edge for edge, _ in node.next_functions]
        for activation in self.activations:
            last = activation.last
            hidden, x = (None, None) if last is None else (last[0](), last[1]())
            if hidden is None or x is None or hidden.grad_fn is not edges[1]:
                continue
            for call in self.attention:
                part = None if call.output is None else call.output()
                if part is not None and part.grad_fn is edges[0] and part.shape[:-1] == hidden.shape[:-1]:
                    linear, rows = last[2], last[3]
                    return _ProjectedHidden.apply(joined.detach(), part, x, linear.weight, linear.bias, module.weight,
                                                  module.bias, activation.fn_ref.original_forward, rows)
        return forward(*args, **kwargs)


def tile_feed_forward(module: torch.nn.Module, rows: int | None = None) -> Conversion:
    """Tile every feed-forward network in ``module`` over its tokens, and recompute its inline MLPs' hidden layers in
    the backward; ``.remove()`` on the result undoes it. Its ``paths``: the networks, and the activations of an
    inline MLP (those whose input turns out, per call, not to be a linear layer's output run as they are).

    Args:
        module: a model, or anything holding models.
        rows: tokens per chunk (counted over every leading dimension of the input); ``None`` chooses
            them per call: no tiling below ``MIN_TILED_TOKENS`` tokens, else as many chunks as the
            hidden layer is wider than the input.
    """
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"tile_tokens={rows!r} must be a number of tokens >= 1, or None to choose them per call "
                         "(Hydra: tile_tokens=4096)")
    tiling = Conversion()
    for name, sub in feed_forward_networks(module):
        tiling.hook(sub, TiledFeedForward(rows), "tiled_feed_forward")
        tiling.paths.append(name)
    calls: dict[torch.nn.Module, _LastCall] = {}

    def last_call(sub: torch.nn.Module, name: str) -> _LastCall:
        if sub not in calls:
            calls[sub] = _LastCall()
            tiling.hook(sub, calls[sub], name)
        return calls[sub]

    beside: dict[torch.nn.Module, list[RecomputedActivation]] = {}
    for name, act, linears, parent in inline_mlps(module):
        hook = RecomputedActivation([last_call(linear, "inline_mlp_linear") for linear in linears], rows)
        tiling.hook(act, hook, "inline_mlp_activation")
        tiling.paths.append(name)
        beside.setdefault(parent, []).append(hook)
    attention = {sub for _, sub in attention_modules(module)}
    for parent, hooks in beside.items():
        attentions = [last_call(c, "inline_mlp_attention") for c in parent.children() if c in attention]
        for child in parent.children():
            if attentions and type(child) is torch.nn.Linear and child.in_features > child.out_features:
                tiling.hook(child, ProjectedConcatenation(attentions, hooks), "inline_mlp_projection")
    return tiling
