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

An MLP a block writes inline instead, as Flux's, Chroma's and HunyuanVideo's single-stream blocks
do (``act_mlp(proj_mlp(x))``, concatenated after the attention's output and projected by
``proj_out``), is no module to tile; it is never computed whole instead. While such a block runs,
a torch function mode lets a widening linear layer beside an elementwise activation return a
placeholder (an expanded scalar: no memory) for its output, the activation one for the hidden
layer, and a concatenation along the last dim that ends with it one for the concatenation. A
narrowing linear layer beside them that takes such a placeholder (``proj_out``) computes
``proj_out(cat([part, act(proj_mlp(x))]))`` a chunk of tokens at a time, saving only ``part`` and
``x``; its backward recomputes each chunk's hidden layer under the forward's autocast and takes
the concatenation's gradient and both layers' weight gradients chunk by chunk. Neither the hidden
layer nor the concatenation (each 4 or 5 times the block's width) exists for more than one chunk,
forward or backward. Anything else that reads a placeholder (an op, or the block's caller) gets
the tensor it stands for, computed then as it would have been (same input, grad mode and
autocast; an input written in place since raises), its hidden layer still recomputed in the
backward rather than saved. Only layers no other hook wraps are deferred, so a user's forward
hook sees real tensors. A layer an adapter wraps (peft's LoRA, the usual fine-tune) is taken for
the linear layer it wraps: each chunk then runs the adapted layers' own forwards under
``torch.utils.checkpoint``, keeping the output layer's base product from the forward (its backward
does not need it again; not under the block's own checkpoint, see :func:`_keeping_products_of`) and
running the rest again; the hidden layer and the concatenation are still never whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import ModelHook
from diffusers.models import activations
from diffusers.models.attention import FeedForward
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cp_plugin.compat import (
    forward_is_hooked_only_by,
    is_symbolic,
    saved_tensors_hooked,
    storage_id,
    tensor_version,
    tree_map_only,
)
from cp_plugin.model import Conversion, hook_name
from cp_plugin.plans import attention_modules, outermost, within

# Tokens below this are not tiled where chunks are chosen per call: a chunk's matrix products stay large enough to
# run at full speed, and a sequence this short has a hidden layer too small to be the step's peak.
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


def linear_layer(module: torch.nn.Module) -> torch.nn.Linear | None:
    """The linear layer ``module`` is: itself, or the base layer of an adapter wrapping one (peft's LoRA, whose
    forward adds a low-rank update of each token to the base layer's output); ``None`` for anything else."""
    get_base_layer = getattr(module, "get_base_layer", None)
    base = get_base_layer() if callable(get_base_layer) else module
    return base if type(base) is torch.nn.Linear else None


def is_feed_forward(module: torch.nn.Module) -> bool:
    """A diffusers ``FeedForward``, or a network of linear layers and pointwise activations that widens its input
    and whose forward combines no tokens (not one linear layer an adapter wraps: that is a layer, not a network)."""
    if isinstance(module, FeedForward):
        return True
    if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)) or linear_layer(module) is not None:
        return False  # containers are never called; what they hold is
    leaves = [m for m in module.modules() if next(m.children(), None) is None]
    linears = [m for m in leaves if isinstance(m, torch.nn.Linear)]
    return (len(linears) >= 2 and all(isinstance(m, POINTWISE) for m in leaves)
            and hidden_width(module) > linears[0].in_features and not mixes_tokens(module))


def feed_forward_networks(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The outermost feed-forward networks in ``module`` that are not inside an attention layer."""
    return outermost(module, is_feed_forward, outside=[name for name, _ in attention_modules(module)])


def hidden_width(module: torch.nn.Module) -> int:
    """The widest output of the network's linear layers (its hidden layer; 4 x width in most DiTs)."""
    return max((m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)), default=0)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Which calls the tiling option takes, and in chunks of how many tokens.

    Args:
        rows: tokens per chunk; ``None`` chooses them per call (:meth:`chunk`).
        start: the tokens from which a call is taken; shorter ones run as they are.
        width: the model's width, where a call's tokens are its input's elements over it (a tensor of queries split
            into heads counts its tokens, not its tokens times its heads); ``None``: every leading dimension of the
            input counts (a sample's tokens times the samples, and times the heads of a split one).
    """

    rows: int | None = None
    start: int = MIN_TILED_TOKENS
    width: int | None = None

    def __post_init__(self) -> None:
        if self.rows is not None and (isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1):
            raise ValueError(f"tile_tokens={self.rows!r} must be a number of tokens >= 1, or None to choose them per "
                             "call (Hydra: parallel.tile_tokens=4096)")

    @classmethod
    def every(cls, rows: int | None = None) -> Tiles:
        """Every call of at least one chunk: ``rows`` tokens, or ``MIN_TILED_TOKENS`` where they are chosen per
        call (``tile_feed_forward=True``)."""
        return cls(rows, MIN_TILED_TOKENS if rows is None else rows)

    def takes(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` (its last dim the features) is long enough to be taken."""
        tokens = x.numel() // self.width if self.width else x.shape[:-1].numel()
        return tokens >= self.start

    def chunk(self, tokens: int, width: int, hidden: int) -> int:
        """Tokens per chunk of a call of ``tokens`` whose hidden layer is ``hidden`` wide for an input ``width`` wide
        (``tokens`` itself: not tiled). ``rows`` if set, else four times as many chunks as the hidden layer is wider
        than the input, so that one chunk's hidden layer is a quarter of the size of the block's input: the four
        tensors of that width a chunk's backward holds at once (the hidden layer, its activation and their
        gradients) stay one input's size (no chunk shorter than a quarter of ``MIN_TILED_TOKENS``, which keeps each
        chunk's matrix products at full speed)."""
        if tokens < self.start:
            return tokens
        if self.rows is not None:
            return self.rows
        if hidden <= width:
            return tokens
        return max(-(-tokens // (4 * math.ceil(hidden / width))), MIN_TILED_TOKENS // 4)


# The matrix products a linear layer's forward dispatches to.
_PRODUCTS = frozenset({torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten.bmm.default})


def _keeping_products_of(weight: torch.Tensor, device: str) -> dict[str, Any]:
    """``torch.utils.checkpoint`` keywords that keep the outputs of the products a chunk takes with ``weight`` (an
    output layer's base, whose product a backward does not need again) and recompute everything else: a chunk's
    backward then runs the output layer's product no more. A product is known by taking ``weight``'s storage. None
    (the chunk is recomputed whole) under autocast on ``device``: there a product takes a cast copy of the weight, and
    torch's selective checkpoint fails in the backward to find the casts autocast made in the forward. None either
    where hooks take what autograd saves (a block's own checkpoint, offloading): the selective checkpoint keeps its
    products beside autograd's saved tensors, where those hooks do not reach, and a block's recompute only refills
    the saved tensors of its first forward's graph, whose chunks read the first forward's products; kept, they would
    be one output's worth per block from the forward to the backward, in every block at once (a checkpointed block
    keeps its input alone, often the same size)."""
    if (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)) or saved_tensors_hooked():
        return {}
    storage = storage_id(weight)

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        takes_weight = op in _PRODUCTS and any(isinstance(a, torch.Tensor) and storage_id(a) == storage for a in args)
        return CheckpointPolicy.MUST_SAVE if takes_weight else CheckpointPolicy.PREFER_RECOMPUTE

    return {"context_fn": functools.partial(create_selective_checkpoint_contexts, policy)}


def adapted_output_layer(module: torch.nn.Module) -> torch.nn.Linear | None:
    """The linear layer an adapter (peft's LoRA) wraps as a diffusers ``FeedForward``'s output layer (the last layer of
    its ``net``, dropouts aside), else ``None``. A chunk's recompute stops at the last tensor its backward reads, which
    skips a plain output layer's product, but an adapter's branch runs after its base product, so that product would
    run again: it is kept from the forward instead (one chunk of the network's output)."""
    if not isinstance(module, FeedForward):
        return None
    layers = [m for m in module.net if not isinstance(m, torch.nn.Dropout)]
    layer = linear_layer(layers[-1]) if layers else None
    return layer if layer is not None and layer is not layers[-1] else None


class TiledFeedForward(ModelHook):
    """Runs a token-wise network over the tokens of its input a chunk at a time, each chunk checkpointed."""

    def __init__(self, tiles: Tiles) -> None:
        super().__init__()
        self.tiles = tiles

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
        rows = self.tiles.chunk(tokens, width, self.hidden)
        if rows >= tokens:
            return forward(x)
        parts = x.reshape(tokens, width).split(rows)
        if torch.is_grad_enabled():
            kept = adapted_output_layer(module)
            context = {} if kept is None else _keeping_products_of(kept.weight, x.device.type)
            outputs = [checkpoint(forward, part, use_reentrant=False, **context) for part in parts]
        else:
            outputs = [forward(part) for part in parts]
        if not all(isinstance(out, torch.Tensor) for out in outputs):
            return forward(x)  # more than one output: which of them are per token is not known
        out = torch.cat(outputs)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def inline_mlps(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """Elementwise activations outside attention layers and feed-forward networks that have a widening linear layer
    beside them (a child of the same parent) whose output they may take, each with that parent: an MLP a block writes
    inline (Flux's and HunyuanVideo's single-stream blocks: ``act_mlp(proj_mlp(x))``, then concatenated with the
    attention's output and projected by ``proj_out``)."""
    outside = [name for name, _ in attention_modules(module) + feed_forward_networks(module)]
    found = []
    for name, parent in module.named_modules():
        if any(within(name, outer) for outer in outside):
            continue
        if not any((layer := linear_layer(c)) is not None and layer.out_features > layer.in_features
                   for c in parent.children()):
            continue
        for child_name, child in parent.named_children():
            if type(child) in ELEMENTWISE:
                found.append((f"{name}.{child_name}" if name else child_name, child, parent))
    return found


# What a forward's autocast was: (device type, dtype or None where the device has no autocast, enabled).
AutocastState = tuple[str, torch.dtype | None, bool]


def autocast_state(device: str) -> AutocastState:
    """The autocast a forward runs under, for its recompute in the backward (mixed precision); none on a device
    without autocast (the meta device, where a step runs for its shapes alone, as a FLOP count does)."""
    if not torch.amp.is_autocast_available(device):
        return device, None, False
    return device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)


def recorded_autocast(state: AutocastState) -> contextlib.AbstractContextManager:
    """The autocast :func:`autocast_state` recorded, entered again."""
    device, dtype, enabled = state
    return contextlib.nullcontext() if dtype is None else torch.autocast(device, dtype=dtype, enabled=enabled)


def _activated(x: torch.Tensor, linear: Callable[[torch.Tensor], torch.Tensor], act: Any,
               autocast: AutocastState) -> torch.Tensor:
    """``act(linear(x))`` (a chunk of tokens) under ``autocast``."""
    with recorded_autocast(autocast):
        return act(linear(x))


def _activation_backward(
    x: torch.Tensor, linear: Callable[[torch.Tensor], torch.Tensor], act: Any, grad: torch.Tensor,
    autocast: AutocastState,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(hidden), gradient of hidden)`` for ``hidden = linear(x)`` recomputed (a chunk of tokens) under the
    forward's ``autocast``, given ``grad``, the gradient of ``act(hidden)``."""
    with torch.no_grad(), recorded_autocast(autocast):
        hidden = linear(x)
    with torch.enable_grad(), recorded_autocast(autocast):
        hidden.requires_grad_()
        activated = act(hidden)
        (grad_hidden,) = torch.autograd.grad(activated, hidden, grad)
    return activated.detach(), grad_hidden


class _RecomputedHidden(torch.autograd.Function):
    """``act(hidden)`` for ``hidden = linear(x)``, saving ``x`` (which the linear layer saves anyway), not the hidden
    layer: the backward recomputes it a chunk of tokens at a time to take the activation's derivative."""

    @staticmethod
    def forward(ctx, hidden, x, linear, act, rows):  # type: ignore[override]
        # ``linear``: the layer's own forward (``x``'s gradient comes from the layer's node, which keeps its input)
        ctx.save_for_backward(x)
        ctx.linear, ctx.act, ctx.rows, ctx.autocast = linear, act, rows, autocast_state(x.device.type)
        return act(hidden)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        inputs, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_hidden = torch.empty_like(grads)
        for start in range(0, inputs.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            grad_hidden[part] = _activation_backward(inputs[part], ctx.linear, ctx.act, grads[part], ctx.autocast)[1]
        return grad_hidden.view(grad.shape), None, None, None, None


class _ProjectedHidden(torch.autograd.Function):
    """``linear(cat([part, act(mlp(x))], -1))`` (Flux's ``proj_out`` of the attention's output and the inline MLP's;
    ``linear(act(mlp(x)))`` where ``part`` is ``None``), a chunk of tokens at a time, saving ``part`` and ``x``: neither
    the hidden layer, nor the concatenation, nor its gradient (each as wide as the part and the hidden layer together)
    is ever held whole, forward or backward. The backward recomputes each chunk's hidden layer under the forward's
    ``autocast`` and takes both layers' weight gradients chunk by chunk."""

    @staticmethod
    def forward(ctx, part, x, w_mlp, b_mlp, w_out, b_out, act, rows, autocast):  # type: ignore[override]
        ctx.save_for_backward(part, x, w_mlp, b_mlp, w_out, b_out)
        ctx.act, ctx.rows, ctx.autocast = act, rows, autocast
        inputs = x.reshape(-1, x.shape[-1])
        parts = None if part is None else part.reshape(-1, part.shape[-1])
        out = None
        for start in range(0, inputs.shape[0], rows):
            chunk = slice(start, start + rows)
            joined = _activated(inputs[chunk], functools.partial(F.linear, weight=w_mlp, bias=b_mlp), act, autocast)
            joined = joined if parts is None else torch.cat([parts[chunk], joined], -1)
            projected = torch.nn.functional.linear(joined, w_out, b_out)
            out = projected.new_empty(inputs.shape[0], projected.shape[-1]) if out is None else out
            out[chunk] = projected
            del joined, projected  # before the next chunk's are made
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        part, x, w_mlp, b_mlp, w_out, b_out = ctx.saved_tensors
        width = 0 if part is None else part.shape[-1]
        grads = grad.reshape(-1, grad.shape[-1])
        inputs = x.reshape(-1, x.shape[-1])
        parts = None if part is None else part.reshape(-1, width)
        grad_part = None if part is None else torch.empty_like(parts)
        grad_x = torch.empty_like(inputs)
        grad_w_out, grad_w_mlp = torch.zeros_like(w_out), torch.zeros_like(w_mlp)
        grad_b_mlp = None if b_mlp is None else torch.zeros_like(b_mlp)
        for start in range(0, grads.shape[0], ctx.rows):
            rows = slice(start, start + ctx.rows)
            activated, grad_hidden = _activation_backward(inputs[rows], functools.partial(F.linear, weight=w_mlp,
                                                                                          bias=b_mlp), ctx.act,
                                                          grads[rows] @ w_out[:, width:].to(grads.dtype), ctx.autocast)
            if parts is not None:
                grad_part[rows] = grads[rows] @ w_out[:, :width].to(grads.dtype)
                grad_w_out[:, :width] += (grads[rows].t() @ parts[rows].to(grads.dtype)).to(w_out.dtype)
            grad_w_out[:, width:] += (grads[rows].t() @ activated.to(grads.dtype)).to(w_out.dtype)
            grad_x[rows] = (grad_hidden @ w_mlp.to(grad_hidden.dtype)).to(x.dtype)
            grad_w_mlp += (grad_hidden.t() @ inputs[rows].to(grad_hidden.dtype)).to(w_mlp.dtype)
            if grad_b_mlp is not None:
                grad_b_mlp += grad_hidden.sum(0).to(b_mlp.dtype)
            del activated, grad_hidden  # before the next chunk's are made
        grad_b_out = None if b_out is None else grads.sum(0).to(b_out.dtype)
        return (None if part is None else grad_part.view(part.shape), grad_x.view(x.shape), grad_w_mlp, grad_b_mlp,
                grad_w_out, grad_b_out, None, None, None)


@dataclasses.dataclass
class _Call:
    """The grad mode and autocast a deferred computation was called under, to compute it as it was called."""

    grad: bool
    autocast: AutocastState

    @classmethod
    def now(cls, x: torch.Tensor) -> _Call:
        return cls(torch.is_grad_enabled(), autocast_state(x.device.type))

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with torch.set_grad_enabled(self.grad), recorded_autocast(self.autocast):
            yield


@dataclasses.dataclass
class _Linear:
    """``layer(x)``, not computed yet: the input of an inline MLP's activation."""

    x: torch.Tensor
    layer: torch.nn.Module  # a linear layer, or an adapter wrapping one (:func:`linear_layer`)
    forward: Callable[[torch.Tensor], torch.Tensor]  # the layer's own forward, without the hook that deferred it
    call: _Call
    version: int  # of ``x`` when called: computed later, it must read what it would have read then

    def check(self) -> None:
        if tensor_version(self.x) != self.version:
            raise RuntimeError(
                f"tiling: the input of {self.layer} was modified in place after the layer took it, before its output "
                "was read, so its output would differ; set tile_feed_forward=False (Hydra: parallel.tile_feed_forward=false)")

    def compute(self) -> torch.Tensor:
        self.check()
        with self.call.restored():
            return self.forward(self.x)

    def sample(self) -> torch.Tensor:
        """The output's first token, computed now without gradient: the dtype and device of the whole output."""
        with self.call.restored(), torch.no_grad():
            return self.forward(self.x.reshape(-1, self.x.shape[-1])[:1])


@dataclasses.dataclass
class _Activation:
    """``act(layer(x))``, an inline MLP's hidden layer, not computed yet."""

    linear: _Linear
    act: Any
    rows: int

    def compute(self) -> torch.Tensor:
        hidden, linear = self.linear.compute(), self.linear
        with linear.call.restored():
            if not hidden.requires_grad:
                return self.act(hidden)
            return _RecomputedHidden.apply(hidden, linear.x, linear.forward, self.act, self.rows)


@dataclasses.dataclass
class _Concatenation:
    """``cat([part, hidden], -1)`` of an inline MLP's hidden layer after another tensor (an attention's output)."""

    part: torch.Tensor
    activation: _Activation
    call: _Call

    def compute(self) -> torch.Tensor:
        hidden = self.activation.compute()
        with self.call.restored():
            return torch.cat([self.part, hidden], -1)


_Recipe = _Linear | _Activation | _Concatenation

# What reads only a tensor's metadata: a placeholder answers it as the tensor it stands for would, uncomputed.
_METADATA = frozenset({*(getattr(torch.Tensor, name).__get__ for name in ("shape", "dtype", "device", "ndim", "layout")),
                       torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.__len__})
_CONCATENATIONS = frozenset({torch.cat, torch.concat, torch.concatenate})


class DeferredHidden(TorchFunctionMode):
    """Within a block's forward, placeholders for an inline MLP's hidden layer (and the concatenation ending with it):
    a widening linear layer's output, its activation and their concatenation along the last dim stand uncomputed
    until a narrowing linear layer beside them takes them in chunks (:class:`_ProjectedHidden`). Anything else that
    reads a placeholder gets the tensor it stands for, computed then as it would have been (same grad mode, autocast
    and input), so the block computes what it always did."""

    def __init__(self) -> None:
        super().__init__()
        self.recipes: dict[int, tuple[torch.Tensor, _Recipe | torch.Tensor]] = {}

    def defer(self, recipe: _Recipe, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A placeholder of ``like``'s dtype and device and of ``shape``, holding no memory, for ``recipe``."""
        placeholder = like.new_empty(()).expand(shape)
        self.recipes[id(placeholder)] = (placeholder, recipe)
        return placeholder

    def recipe(self, x: Any) -> _Recipe | None:
        """What ``x`` stands for, if it is a placeholder not computed yet."""
        entry = self.recipes.get(id(x))
        return entry[1] if entry is not None and entry[0] is x and not isinstance(entry[1], torch.Tensor) else None

    def materialize(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor ``x`` stands for (computed once), or ``x`` if it is no placeholder."""
        entry = self.recipes.get(id(x))
        if entry is None or entry[0] is not x:
            return x
        value = entry[1] if isinstance(entry[1], torch.Tensor) else entry[1].compute()
        self.recipes[id(x)] = (x, value)
        return value

    def _concatenation(self, tensors: Any, dim: Any = 0, **kwargs: Any) -> torch.Tensor | None:
        if kwargs or not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or not isinstance(dim, int):
            return None
        part, hidden = tensors
        activation = self.recipe(hidden)
        if (not isinstance(activation, _Activation) or not isinstance(part, torch.Tensor) or part.dim() != hidden.dim()
                or self.recipe(part) is not None or dim % hidden.dim() != hidden.dim() - 1
                or part.shape[:-1] != hidden.shape[:-1]):
            return None
        like = part.new_empty((), dtype=torch.promote_types(part.dtype, hidden.dtype))
        return self.defer(_Concatenation(part, activation, _Call.now(part)), like,
                          (*part.shape[:-1], part.shape[-1] + hidden.shape[-1]))

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.recipes and func not in _METADATA:
            joined = self._concatenation(*args, **kwargs) if func in _CONCATENATIONS else None
            if joined is not None:
                return joined
            args, kwargs = tree_map_only(torch.Tensor, self.materialize, (args, kwargs))
        return func(*args, **kwargs)


# What the hook that runs a block holding inline MLPs under :class:`DeferredHidden` is registered as.
INLINE_MLP_BLOCK = "inline_mlp_block"


class DeferringBlock(ModelHook):
    """Runs a module holding inline MLPs (a single-stream block) under :class:`DeferredHidden`; what it returns is
    never a placeholder."""

    def __init__(self) -> None:
        super().__init__()
        self.active: DeferredHidden | None = None

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if torch.compiler.is_compiling():
            return forward(*args, **kwargs)
        mode, outer = DeferredHidden(), self.active
        self.active = mode
        try:
            with mode:
                out = forward(*args, **kwargs)
        finally:
            self.active = outer
        return tree_map_only(torch.Tensor, mode.materialize, out) if mode.recipes else out


class _BesideInlineMlp(ModelHook):
    """A hook on a layer of a block holding inline MLPs: it defers or reads placeholders while that block runs."""

    name = "inline_mlp_linear"  # what it is registered as on its layer

    def __init__(self, block: DeferringBlock, tiles: Tiles) -> None:
        super().__init__()
        self.block, self.tiles = block, tiles

    def deferred(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Recipe | None:
        """What this layer's one argument stands for, where it may be taken as that (no other hook on the layer)."""
        mode = self.block.active
        if mode is None or len(args) != 1 or kwargs or not forward_is_hooked_only_by(module, {hook_name(self.name)}):
            return None
        return mode.recipe(args[0])


class DeferredLinear(_BesideInlineMlp):
    """A widening linear layer beside an inline MLP's activation: where its tokens make more than one chunk, its output
    is a placeholder."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward, mode = self.fn_ref.original_forward, self.block.active
        x = args[0] if len(args) == 1 and not kwargs else None
        if (mode is None or not isinstance(x, torch.Tensor) or is_symbolic(x) or mode.recipe(x) is not None
                or not forward_is_hooked_only_by(module, {hook_name(self.name)})):
            return forward(*args, **kwargs)
        tokens, layer = x.shape[:-1].numel(), linear_layer(module)
        if self.tiles.chunk(tokens, layer.in_features, layer.out_features) >= tokens:
            return forward(x)  # one chunk: nothing to gain (a modulation's linear layer of one token per sample)
        linear = _Linear(x, module, forward, _Call.now(x), tensor_version(x))
        return mode.defer(linear, linear.sample(), (*x.shape[:-1], layer.out_features))


class DeferredActivation(_BesideInlineMlp):
    """An inline MLP's elementwise activation of a deferred linear layer's output: its output is a placeholder too."""

    name = "inline_mlp_activation"

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        linear = self.deferred(module, args, kwargs)
        if not isinstance(linear, _Linear):
            return forward(*args, **kwargs)
        x = linear.x
        rows = self.tiles.chunk(x.shape[:-1].numel(), x.shape[-1], linear_layer(linear.layer).out_features)
        with torch.no_grad():
            like = forward(linear.sample())
        return self.block.active.defer(_Activation(linear, forward, rows), like, args[0].shape)


class _CompactGradient(torch.autograd.Function):
    """The identity, whose backward passes on a compact copy of the gradient. A chunk's gradient of ``part`` is a
    slice of its concatenation's gradient; autograd holds it until every chunk's is there to be joined, and the slice
    would keep the whole concatenation's gradient (five times its size in Flux) alive with it."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.contiguous()


def _projected_chunk(part: torch.Tensor | None, x: torch.Tensor, linear: Callable[[torch.Tensor], torch.Tensor],
                     act: Any, out: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``out(cat([part, act(linear(x))], -1))`` for one chunk of tokens (``out(act(linear(x)))`` where ``part`` is
    ``None``); its caller runs it under the layer's call's autocast, which the checkpoint's recompute restores."""
    hidden = act(linear(x))
    return out(hidden if part is None else torch.cat([_CompactGradient.apply(part), hidden], -1))


class ProjectedHidden(_BesideInlineMlp):
    """A narrowing linear layer beside an inline MLP taking its deferred hidden layer, alone or after another tensor
    (Flux's ``proj_out``): computed a chunk of tokens at a time, forward and backward. Two plain linear layers go
    through :class:`_ProjectedHidden`, which takes their gradients itself; where an adapter wraps either (peft's
    LoRA), each chunk runs the layers' own forwards under ``torch.utils.checkpoint``, which keeps the chunk's inputs
    (views of ``part`` and ``x``) and, outside autocast and the block's own checkpoint, the output layer's base
    product (one chunk of the output's size), and runs the rest of the chunk again in the backward."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        recipe = self.deferred(module, args, kwargs)
        part, activation = (recipe.part, recipe.activation) if isinstance(recipe, _Concatenation) else (None, recipe)
        if not isinstance(activation, _Activation):
            return self.fn_ref.original_forward(*args, **kwargs)
        linear = activation.linear
        linear.check()
        if type(linear.layer) is torch.nn.Linear and type(module) is torch.nn.Linear:
            return _ProjectedHidden.apply(part, linear.x, linear.layer.weight, linear.layer.bias, module.weight,
                                          module.bias, activation.act, activation.rows, linear.call.autocast)
        with linear.call.restored():
            inputs = linear.x.reshape(-1, linear.x.shape[-1]).split(activation.rows)
            parts = [None] * len(inputs) if part is None else part.reshape(-1, part.shape[-1]).split(activation.rows)
            keep = _keeping_products_of(linear_layer(module).weight, linear.x.device.type)
            out = torch.cat([checkpoint(_projected_chunk, p, x, linear.forward, activation.act,
                                        self.fn_ref.original_forward, use_reentrant=False, **keep)
                             for p, x in zip(parts, inputs, strict=True)])
        return out.view(*linear.x.shape[:-1], out.shape[-1])


def tile_feed_forward(module: torch.nn.Module, tiles: Tiles | None = None) -> Conversion:
    """Tile every feed-forward network in ``module`` over its tokens, and recompute its inline MLPs' hidden layers in
    the backward; ``.remove()`` on the result undoes it. Its ``paths``: the networks, and the activations of an
    inline MLP (those whose input turns out, per call, not to be a linear layer's output run as they are).

    Args:
        module: a model, or anything holding models.
        tiles: the calls taken and their chunks (``None``: :meth:`Tiles.every`, chunks chosen per call).
    """
    tiles = Tiles.every() if tiles is None else tiles
    tiling = Conversion()
    for name, sub in feed_forward_networks(module):
        tiling.hook(sub, TiledFeedForward(tiles), "tiled_feed_forward")
        tiling.paths.append(name)
    blocks: dict[torch.nn.Module, DeferringBlock] = {}
    for name, act, parent in inline_mlps(module):
        if parent not in blocks:
            blocks[parent] = block = DeferringBlock()
            tiling.hook(parent, block, INLINE_MLP_BLOCK)
            for child in parent.children():
                layer = linear_layer(child)
                if layer is not None and layer.out_features != layer.in_features:
                    hook = DeferredLinear if layer.out_features > layer.in_features else ProjectedHidden
                    tiling.hook(child, hook(block, tiles), hook.name)
        tiling.hook(act, DeferredActivation(blocks[parent], tiles), DeferredActivation.name)
        tiling.paths.append(name)
    return tiling


def token_width(module: torch.nn.Module) -> int:
    """The widest input of the networks the tiling option takes in ``module`` (its feed-forward networks and inline
    MLPs): the model's width, which its tokens carry through its blocks (0 where it has none)."""
    firsts = [next(m for m in sub.modules() if isinstance(m, torch.nn.Linear))
              for _, sub in feed_forward_networks(module)]
    firsts += [layer for _, _, parent in inline_mlps(module) for layer in map(linear_layer, parent.children())
               if layer is not None and layer.out_features > layer.in_features]
    return max((layer.in_features for layer in firsts), default=0)
