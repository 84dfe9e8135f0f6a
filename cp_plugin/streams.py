"""A derived plan at run time: split the token streams where they enter the blocks, gather after the last.

The first block to run in a forward names the streams: its ``hidden_states`` (``(B, S, C)``, the
image/video tokens) and, if given, its ``encoder_hidden_states`` (``(B, T, C)``, the text). Every
block then splits, at its entry, whatever it is handed at full length:

- the streams themselves (a model may hand a forward local to several block lists, as Wan VACE
  does to its control blocks and its main blocks);
- every other tensor with one dimension of length ``S``, ``T`` or ``S + T``: rotary tables
  ``(S, D)``, ``(1, S, 1, D)``, ``(B, S, D)``; per-token modulation ``(B, S, C)``, ``(B, 6, S, C)``;
  control latents ``(B, S, C)``; masks ``(B, T)``, ``(B, 1, 1, S + T)``. A joint ``S + T`` tensor is
  split part by part, in the order a joint mask's values give (its image part attends everything:
  HunyuanVideo's mask is image first, Chroma's and its rotary table text first);
- a tensor with two such dimensions (a ``(1, 1, S, S)`` block-causal mask) stays whole: the
  attention takes each rank's rows and each block's columns.

Sequences the CP size does not divide are padded and masked (``padding.py``). A tensor this hook
produced, or a block returned, is never split again. The last block of a forward (the one that
completes the count of blocks, remembered for later forwards and activation-checkpoint
recomputes) ends the split region: the first of the model's other children called after it (its
output norm or projection) gathers the sharded tensors it is given, trimmed, so everything from
there on runs on whole sequences, as on one process. A length that could be either stream, or a dimension that could be a
feature, is refused with the plan entry to write instead.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook

from cp_plugin.attention.dispatch import reset_attention_calls
from cp_plugin.attention.masks import MASKED_BIAS
from cp_plugin.mesh import ParallelMesh
from cp_plugin.padding import SequencePadding
from cp_plugin.plans import PLAN_HINT
from cp_plugin.sequence import gather_sequence, local_shard

STREAMS = {"hidden_states": "image", "encoder_hidden_states": "text"}


class StreamState:
    """What one forward of one model has split so far, shared by all its block hooks."""

    def __init__(self, model: str, total_blocks: int, padding: SequencePadding, mesh: ParallelMesh) -> None:
        self.model, self.total_blocks, self.padding, self.mesh = model, total_blocks, padding, mesh
        self.calls = 0
        self.blocks_done = self.gathered = False
        self.last_block: torch.nn.Module | None = None
        self.local: dict[int, torch.Tensor] = {}  # id -> tensor produced under the split (never split again)

    def reset(self) -> None:
        self.calls, self.blocks_done, self.gathered, self.local = 0, False, False, {}

    def is_local(self, x: torch.Tensor) -> bool:
        return self.local.get(id(x)) is x

    def mark_local(self, x: Any) -> Any:
        for t in _tensors(x):
            self.local[id(t)] = t
        return x


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


def _map(x: Any, fn: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_map(item, fn) for item in x)
    return x


def _sequence_dims(x: torch.Tensor, full: set[int]) -> list[int]:
    """The dims of ``x`` whose size is a full stream length, less a float tensor's feature (last) dim.

    The last dim of a float tensor holds features (rotary tables, modulation), unless the tensor is
    an additive mask over keys (0 where attended, a large negative bias where not) or the keys of a
    ``(queries, keys)`` mask.
    """
    dims = [d for d in range(x.dim()) if x.shape[d] in full]
    last = x.dim() - 1
    if x.is_floating_point() and dims and dims[-1] == last and dims[-2:] != [last - 1, last]:
        if len(dims) > 1 or not bool(((x == 0) | (x <= MASKED_BIAS)).all()):
            dims.pop()
    return dims


class BlockStreams(ModelHook):
    """On every block of a derived plan: split full-length inputs; note when the last block has run."""

    def __init__(self, state: StreamState, name: str) -> None:
        super().__init__()
        self.state, self.name = state, name

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.params = list(inspect.signature(module.forward).parameters)
        return module

    # entry ------------------------------------------------------------------------------------
    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        state, padding = self.state, self.state.padding
        named = {**dict(zip(self.params, args)), **kwargs}
        if padding.image_length is None:
            self._name_streams(named)
        padding.in_blocks += 1
        for value in named.values() if padding.joint_order is None else ():
            for t in _tensors(value):  # masks first: they tell the order of joint tensors (e.g. rotary tables)
                if t.dtype == torch.bool and not state.is_local(t):
                    self._mask_order(t)
        args = tuple(self._split(name, value) for name, value in zip(self.params, args))
        kwargs = {name: self._split(name, value) for name, value in kwargs.items()}
        return args, kwargs

    def _name_streams(self, named: dict[str, Any]) -> None:
        padding = self.state.padding
        for name, kind in STREAMS.items():
            value = named.get(name)
            if isinstance(value, torch.Tensor) and value.dim() == 3:
                padding.register(kind, value.shape[1], f"{self.state.model}.{self.name}")
        if padding.image_length is None:
            raise ValueError(f"{self.state.model}: block '{self.name}' got no (batch, tokens, channels) hidden_states, "
                             f"so the token stream to split is unknown; {PLAN_HINT}")

    def _split(self, name: str, value: Any) -> Any:
        if name in STREAMS and isinstance(value, torch.Tensor):
            length = getattr(self.state.padding, f"{STREAMS[name]}_length")
            if value.dim() == 3 and value.shape[1] == length and not self.state.is_local(value):
                return self.state.mark_local(self._shard(value, 1, length))
            return value
        return _map(value, lambda t: self._follow(name, t))

    def _follow(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Split ``x`` (block input ``name``) along the one dimension that has a full stream length, if any."""
        padding, state = self.state.padding, self.state
        if state.is_local(x):
            return x
        image, text = padding.image_length, padding.text_length
        dims = _sequence_dims(x, {image, text, None if text is None else image + text} - {None})
        if not dims:
            return x
        if len(dims) == 2 and x.shape[dims[0]] == x.shape[dims[1]] and dims[0] == x.dim() - 2:
            return x  # a mask over (queries, keys) of the whole sequence: the attention slices it
        if len(dims) > 1:
            raise ValueError(
                f"{state.model}: block '{self.name}' input '{name}' of shape {tuple(x.shape)} has several dimensions "
                f"the length of a token stream ({image} image, {text} text tokens), so which one is the sequence is "
                f"ambiguous; {PLAN_HINT}"
            )
        dim, length = dims[0], x.shape[dims[0]]
        if length == image and length == text:
            return state.mark_local(self._shard(x, dim, length))
        if text is not None and length == image + text:
            return state.mark_local(self._split_joint(name, x, dim))
        return state.mark_local(self._shard(x, dim, length))

    def _shard(self, x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
        padding = self.state.padding
        return local_shard(padding.pad_to_split(x, dim, length), dim, self.state.mesh, name=f"{self.name} input")

    def _mask_order(self, mask: torch.Tensor) -> None:
        """Learn the joint order from a mask over text and image tokens: its image part attends everything."""
        padding = self.state.padding
        image, text = padding.image_length, padding.text_length
        dims = [] if text is None else [d for d in range(mask.dim()) if mask.shape[d] == image + text]
        if len(dims) != 1:
            return
        image_first = bool(mask.narrow(dims[0], 0, image).all())
        text_first = bool(mask.narrow(dims[0], text, image).all())
        if image_first != text_first:
            padding.joint_order = "image_first" if image_first else "text_first"

    def _split_joint(self, name: str, x: torch.Tensor, dim: int) -> torch.Tensor:
        """A tensor over text and image tokens: each part split on its own, kept in the tensor's order.

        The order is the one a joint mask showed (in this forward or an earlier one, or the one the
        attention found); a mask that attends everything needs none.
        """
        padding, image, text = self.state.padding, self.state.padding.image_length, self.state.padding.text_length
        order = padding.joint_order
        if order is None and x.dtype == torch.bool and bool(x.all()):
            # Attends everything, in either order: this rank's part does too (our padding mask, which
            # the attention adds in the processor's order, masks the padded keys).
            shape = list(x.shape)
            shape[dim] = padding.local_length(image) + padding.local_length(text)
            return x.new_ones(shape)
        if order is None:
            raise ValueError(
                f"{self.state.model}: block '{self.name}' input '{name}' of shape {tuple(x.shape)} spans the text and "
                "image tokens together, and no mask given to the blocks tells their order (one that masks some text "
                f"does); {PLAN_HINT}"
            )
        lengths = (image, text) if order == "image_first" else (text, image)
        parts = x.split(lengths, dim)
        return torch.cat([self._shard(part, dim, length) for part, length in zip(parts, lengths)], dim)

    # exit -------------------------------------------------------------------------------------
    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        state = self.state
        state.padding.in_blocks -= 1
        if state.last_block is None:
            state.calls += 1
            if state.calls == state.total_blocks:
                state.last_block = module
        if module is state.last_block:
            state.blocks_done = True
        return state.mark_local(output)


class OutputGather(ModelHook):
    """On the model's other children: the first one called after the last block gathers its sharded inputs.

    That is the output norm or projection in every DiT: what the forward does between the last
    block and it (adding Wan VACE's last control hint, concatenating CogVideoX's text and image for
    its final norm, slicing Chroma's text off) is per token and runs on the shards; what follows
    runs on whole sequences, as on one process. A joint text + image input is put back in order.
    """

    def __init__(self, state: StreamState, name: str) -> None:
        super().__init__()
        self.state, self.name = state, name

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        state = self.state
        if not state.blocks_done or state.gathered:
            return args, kwargs
        args, kwargs = _map(args, self._gather), {k: _map(v, self._gather) for k, v in kwargs.items()}
        return args, kwargs

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        padding, mesh = self.state.padding, self.state.mesh
        if x.dim() < 3 or not self.state.is_local(x) and x.shape[1] not in padding.local_lengths():
            return x
        image, text = padding.image_length, padding.text_length
        s = padding.local_length(image)
        t = None if text is None else padding.local_length(text)
        self.state.gathered = True
        if x.shape[1] == s:
            return gather_sequence(x, 1, mesh).narrow(1, 0, image)
        if x.shape[1] == t:
            return gather_sequence(x, 1, mesh).narrow(1, 0, text)
        order = padding.joint_order
        if order is None:
            raise ValueError(f"{self.state.model}: '{self.name}' gets text and image tokens together after the blocks, "
                             f"and their order is unknown; {PLAN_HINT}")
        lengths = (s, t) if order == "image_first" else (t, s)
        full = (image, text) if order == "image_first" else (text, image)
        per_rank = gather_sequence(x, 1, mesh).unflatten(1, (mesh.cp_size, s + t))
        parts = per_rank.split(lengths, 2)
        return torch.cat([p.flatten(1, 2).narrow(1, 0, n) for p, n in zip(parts, full)], 1)


class ForwardScope(ModelHook):
    """At a derived-plan model's entry and exit: a fresh split state, and a check that the streams came back whole."""

    def __init__(self, state: StreamState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.state.reset()
        self.state.padding.reset()
        reset_attention_calls()
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self.state.padding.image_length is not None and not self.state.gathered:
            raise RuntimeError(
                f"{self.state.model} ran fewer of its {self.state.total_blocks} blocks in this forward than in its "
                "first, so its split token streams were never gathered; run every block in every forward (e.g. no "
                f"skip_layers) or {PLAN_HINT}"
            )
        return output
