"""Route the attention calls of a context-parallel model to cp_plugin's attention, and nothing else.

Processors reach attention in two ways: ``dispatch_attention_fn`` (diffusers looks the backend up in
``_AttentionBackendRegistry``, passing ``parallel_config`` on, or ``None`` where a processor omits or
withholds it) or ``torch.nn.functional.scaled_dot_product_attention`` directly (SD3's joint
processor, CogVideoX's, ``AttnProcessor2_0``, ...). An :class:`AttentionRouting`, one per converted
model, puts its wrappers in both places only while that model's forward (or a block's activation
checkpoint recompute) runs, and puts back what was there on the way out; which calls are routed
depends on the model's plan:

- a model with its own ``_cp_plan`` keeps diffusers' convention: its processors carry a
  :class:`RoutedParallelConfig` (diffusers' ``ParallelConfig`` plus our mesh), and exactly the
  calls that pass it on are routed (Wan withholds it for cross-attention to its unsplit text);
- a model with a derived plan splits every token stream where it enters the blocks, so the
  attention calls made inside a block are routed by the roles a probe of the block found
  (``streams.py``); calls outside the blocks (HunyuanVideo's text refiner, before the split) run
  unchanged.

The attention classes' ``prepare_attention_mask`` is routed the same way, so that it pads a mask as
it would on one process (see ``_wrap_prepare_mask``). Everything else goes to the backend or SDPA
that was there before, so other models in the process,
diffusers' own CP and other libraries' patches keep working. This is the one place that touches
diffusers' dispatch; models stay untouched.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import torch

from cp_plugin.attention import context_parallel_attention
from cp_plugin.attention.masks import (
    BlockMaskTiles,
    CausalTiles,
    MaskTiles,
    is_block_mask,
    key_padding_mask,
    whole_sequence_mask,
)
from cp_plugin.blockops import counting, foreign
from cp_plugin.comm import all_gather
from cp_plugin.compat import (
    PARALLEL_CONFIG_ATTR,
    SDPA,
    attention_backends,
    is_symbolic,
    mask_preparers,
    statistics_mask_builders,
)
from cp_plugin.mesh import ParallelMesh
from cp_plugin.padding import SequencePadding
from cp_plugin.probe import ProbeError, is_selection, recording


@dataclass
class RoutedParallelConfig(diffusers.ParallelConfig):
    """diffusers' ``ParallelConfig`` plus the cp_plugin mesh whose attention replaces the backend's."""

    cp_mesh: ParallelMesh | None = None
    padding: SequencePadding | None = None


@dataclass(eq=False)
class AttentionCall:
    """What a running part of a converted model routes.

    ``state`` is a derived plan's split state (``streams.StreamState``): calls are routed by the
    probed roles of the block running now. Without it (a model with its own plan), exactly the calls
    that pass a :class:`RoutedParallelConfig` on are routed.
    """

    config: RoutedParallelConfig
    state: Any = None


class AttentionRouting:
    """One converted model's attention routing, in place only while the model (or one of its blocks) runs.

    ``enter(call)`` / ``exit()`` bracket a forward: the outermost ``enter`` puts a wrapper around
    every registered backend and SDPA (the same wrapper objects every time, so compiled graphs keep
    their guards), and the matching ``exit`` puts back what it found. ``None`` as the call runs
    attention plainly (calls outside a derived plan's blocks, or keys every rank holds whole).
    """

    def __init__(self) -> None:
        self._calls: list[AttentionCall | None] = []  # innermost last
        self._found: tuple[dict[Any, Callable[..., Any]], Callable[..., Any]] | None = None
        self._wrappers: dict[Any, tuple[Callable[..., Any], Callable[..., Any]]] = {}  # name -> (backend, wrapper)
        self._sdpa_wrapper = self._wrap_sdpa()
        self._mask_wrappers = {cls: self._wrap_prepare_mask(cls.prepare_attention_mask) for cls in mask_preparers()}
        self._statistics_wrappers = [(module, name, self._wrap_statistics(getattr(module, name), dim, positions))
                                     for module, name, dim, positions in statistics_mask_builders()]

    @property
    def active(self) -> bool:
        return bool(self._calls)

    def enter(self, call: AttentionCall | None) -> None:
        if not self._calls:
            self._install()
        self._calls.append(call)

    def exit(self) -> None:
        self._calls.pop()
        if not self._calls:
            self._uninstall()

    def reset(self) -> None:
        """Forget the calls a failed forward left entered (its exits never ran), at the model's next entry."""
        if self._calls:
            self._calls.clear()
            self._uninstall()

    @torch.compiler.disable
    def _install(self) -> None:
        backends = attention_backends()
        found = dict(backends)
        for name, fn in found.items():
            kept = self._wrappers.get(name)
            if kept is None or kept[0] is not fn:
                kept = self._wrappers[name] = (fn, self._wrap_backend(fn))
            backends[name] = kept[1]
        self._found = (found, torch.nn.functional.scaled_dot_product_attention)
        torch.nn.functional.scaled_dot_product_attention = self._sdpa_wrapper
        for cls, wrapper in self._mask_wrappers.items():
            cls.prepare_attention_mask = wrapper
        for module, name, wrapper in self._statistics_wrappers:
            setattr(module, name, wrapper)

    @torch.compiler.disable
    def _uninstall(self) -> None:
        if self._found is None:
            return
        found, sdpa = self._found
        backends = attention_backends()
        for name, fn in found.items():
            if backends.get(name) is self._wrappers[name][1]:
                backends[name] = fn
        if torch.nn.functional.scaled_dot_product_attention is self._sdpa_wrapper:
            torch.nn.functional.scaled_dot_product_attention = sdpa
        for cls, wrapper in self._mask_wrappers.items():
            if cls.__dict__.get("prepare_attention_mask") is wrapper:
                cls.prepare_attention_mask = wrapper.__wrapped__
        for module, name, wrapper in self._statistics_wrappers:
            if getattr(module, name) is wrapper:
                setattr(module, name, wrapper.__wrapped__)
        self._found = None

    def run(self, call: AttentionCall | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with ``call`` routing the attention inside it (``None``: none routed)."""
        self.enter(call)
        try:
            return fn(*args, **kwargs)
        finally:
            self.exit()

    def _wrap_backend(self, backend_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def routed(*args: Any, **kwargs: Any) -> torch.Tensor:
            if not counting():
                return route(*args, **kwargs)
            with foreign():
                return route(*args, **kwargs)

        def route(*args: Any, **kwargs: Any) -> torch.Tensor:
            if recording() is not None:  # a probe (probe.py): plain attention on fake tensors, noted there
                return _probe_attention(*args, **kwargs)
            call = self._calls[-1] if self._calls else None
            if call is None:
                return backend_fn(*args, **kwargs)
            if call.state is None:  # a model's own plan: the calls that pass our config on
                config = kwargs.get(PARALLEL_CONFIG_ATTR)
                if isinstance(config, RoutedParallelConfig):
                    return _routed_attention(*args, config=config, **kwargs)
                return backend_fn(*args, **kwargs)
            roles, scale = call.state.next_attention(kwargs.get("scale"))
            if scale is not kwargs.get("scale"):
                kwargs = {**kwargs, "scale": scale}
            if roles is None or not roles[1]:
                return self.run(None, backend_fn, *args, **{**kwargs, PARALLEL_CONFIG_ATTR: None})
            return _routed_attention(*args, config=call.config, call=call, roles=roles,
                                     **{**kwargs, PARALLEL_CONFIG_ATTR: None})

        routed.__wrapped__ = backend_fn  # type: ignore[attr-defined]
        return routed

    def _wrap_prepare_mask(self, prepare: Callable[..., Any]) -> Callable[..., Any]:
        """``Attention.prepare_attention_mask`` told the sequence length one process would tell it.

        Processors pass the length of the queries they hold as ``target_length``, and the method pads a
        mask of another length (``AttnProcessor2_0``). Inside a derived-plan block that is this rank's
        part of a split stream, while a mask built before the split spans the whole stream: one process
        would not pad it, so neither do we (the whole-sequence mask is then sliced in attention).
        """
        def prepare_attention_mask(attn: Any, attention_mask: torch.Tensor | None, target_length: int,
                                   batch_size: int, out_dim: int = 3) -> torch.Tensor | None:
            call = self._calls[-1] if self._calls and recording() is None else None
            padding = None if call is None or call.state is None else call.config.padding
            streams = None if padding is None or attention_mask is None else padding.composition(target_length)
            if streams is not None and len(streams) == 1 and attention_mask.shape[-1] == padding.lengths[streams[0]]:
                target_length = attention_mask.shape[-1]
            return prepare(attn, attention_mask, target_length, batch_size, out_dim)

        prepare_attention_mask.__wrapped__ = prepare  # type: ignore[attr-defined]
        return prepare_attention_mask

    def _wrap_statistics(self, build: Callable[..., Any], dim: int, positions: tuple[int, ...]
                         ) -> Callable[..., Any]:
        """A mask builder (``compat.WHOLE_SEQUENCE_STATISTICS``) given the whole sequence's queries and keys.

        Inside a derived plan's block, its statistics' inputs (``positions``) are this rank's tokens
        along ``dim``: they are gathered over the CP group, without gradient (a mask has none), and the
        mask is built over the whole sequence, as one process builds it; attention then reads it a tile
        at a time. In a probe the mask is noted as one over the whole sequence.
        """
        @functools.wraps(build)
        def whole_sequence(*args: Any, **kwargs: Any) -> Any:
            record = recording()
            if record is not None:
                with record.whole_sequence_mask() as whole:
                    mask = build(*args, **kwargs)
                whole.add(id(mask))
                return mask
            call = self._calls[-1] if self._calls else None
            if call is None or call.state is None:
                return build(*args, **kwargs)
            args = tuple(_whole_sequence(x, dim, call.config) if i in positions else x for i, x in enumerate(args))
            return build(*args, **kwargs)

        return whole_sequence

    def _wrap_sdpa(self) -> Callable[..., torch.Tensor]:
        def routed_sdpa(
            query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
            dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
        ) -> torch.Tensor:
            """``F.scaled_dot_product_attention`` (``(B, H, S, D)`` layout), routed inside a derived-plan block."""
            if not counting():
                return route_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            with foreign():
                return route_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

        def route_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                       dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
            call = self._calls[-1] if self._calls and recording() is None else None
            roles = None
            if call is not None and call.state is not None:
                roles, scale = call.state.next_attention(scale)
            if roles is None or not roles[1]:
                plain = SDPA if self._found is None else self._found[1]
                return plain(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
            out = _routed_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), call.config, call, roles,
                attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
            )
            return out.transpose(1, 2)

        return routed_sdpa


def _masks(
    query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | MaskTiles | None,
    padding: SequencePadding | None, mesh: ParallelMesh,
) -> tuple[torch.Tensor | None, MaskTiles | None, torch.Tensor | None]:
    """``(key_mask (B, keys), tiles, query rows (B, queries))`` of a routed call: the model's mask and our
    padding's, combined, and which of this rank's queries attend anything (``None``: all do)."""
    batch, queries, keys = key.shape[0], query.shape[1], key.shape[1]
    key_mask = tiles = rows = None
    if isinstance(attn_mask, torch.Tensor) and attn_mask.shape[-1] == keys:
        key_mask, rows = key_padding_mask(attn_mask, batch, queries, keys)
    elif attn_mask is not None:  # over a whole stream: only self-attention of one stream has one
        streams = None if padding is None else padding.composition(queries)
        if streams is None or len(streams) != 1 or keys != queries:
            which = f"of shape {tuple(attn_mask.shape)}" if isinstance(attn_mask, torch.Tensor) else "over a sequence"
            raise ValueError(
                f"context-parallel attention got attn_mask {which} for {keys} keys per "
                "rank; masks must cover this rank's keys, or a whole stream in its self-attention"
            )
        if isinstance(attn_mask, MaskTiles):
            whole_keys, tiles = None, attn_mask
        else:
            whole_keys, tiles, whole_rows = whole_sequence_mask(attn_mask, padding.lengths[streams[0]],
                                                                keys * mesh.cp_size)
        if whole_keys is not None:
            key_mask = whole_keys.expand(batch, -1).chunk(mesh.cp_size, 1)[mesh.cp_rank]
            rows = whole_rows.expand(batch, -1).chunk(mesh.cp_size, 1)[mesh.cp_rank]
    if padding is not None:
        pad_mask = padding.key_mask(keys, batch, key.device)
        if pad_mask is not None:
            key_mask = pad_mask if key_mask is None else key_mask & pad_mask
    return key_mask, tiles, rows


def _whole_sequence(x: torch.Tensor, dim: int, config: RoutedParallelConfig) -> torch.Tensor:
    """This rank's tokens of one split stream along ``dim`` -> the whole stream's, gathered (no gradient)."""
    padding, mesh = config.padding, config.cp_mesh
    streams = padding.composition(x.shape[dim])
    if streams is None or len(streams) != 1:
        raise ValueError(
            f"context-parallel attention: a mask built from statistics over tokens got {x.shape[dim]} tokens along dim "
            f"{dim}, which are not this rank's part of one split sequence "
            f"({padding.local_shares()}); train this model without "
            "context parallelism (ring_degree=1, ulysses_degree=1)"
        )
    with torch.no_grad():
        gathered = all_gather(x.detach().movedim(dim, 0), mesh.cp_group, "statistics_all_gather")
    return gathered[: padding.lengths[streams[0]]].movedim(0, dim)


def _selection_key_mask(key: torch.Tensor, parts: tuple[str, ...], padding: SequencePadding,
                        mesh: ParallelMesh) -> torch.Tensor:
    """``(B, keys)``: which of this rank's keys count, where the block joined tokens it selected by data from a
    sequence every rank holds whole (Mochi's valid text tokens) to the split streams' tokens.

    Every rank holds the selected tokens and takes them as queries: each computes their whole output,
    and the copies' gradients add up to the one process's. As keys they are counted once, on CP rank 0;
    the other ranks' copies are masked like padding, so every rank still sends equally many keys.
    """
    local = sum(padding.local_stream(p) for p in parts if not is_selection(p))
    selected = key.shape[1] - local
    if sum(map(is_selection, parts)) != 1 or selected < 0:
        raise ValueError(
            f"context-parallel attention got {key.shape[1]} keys per rank made of {' + '.join(parts)}; cp_plugin "
            "supports one part selected by data (nonzero of a mask over tokens every rank holds whole) beside split "
            "streams. Pass cp_plan naming where the model's sequences enter its blocks"
        )
    batch, device = key.shape[0], key.device
    pieces = [torch.full((batch, selected), mesh.cp_rank == 0, dtype=torch.bool, device=device) if is_selection(p)
              else padding.local_valid(p, batch, device) for p in parts]
    return torch.cat(pieces, 1)


def _check_split(query: torch.Tensor, key: torch.Tensor, padding: SequencePadding) -> None:
    """A routed call inside a block must attend over this rank's split tokens, not over tokens it holds whole."""
    if padding.composition(query.shape[1]) is None or padding.composition(key.shape[1]) is None:
        raise ValueError(
            f"context-parallel attention inside a block attends {query.shape[1]} queries to {key.shape[1]} keys, which "
            f"are not this rank's split tokens ({padding.local_shares()}"
            "): the block runs on a sequence the derived plan does not split (e.g. per-sample packing or tokens made "
            "inside the blocks); pass cp_plan naming where that sequence enters the blocks"
        )


@torch.compiler.disable(recursive=True)
def _routed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config: RoutedParallelConfig,
    call: AttentionCall | None = None,
    roles: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    **_: Any,
) -> torch.Tensor:
    """Check what context-parallel attention supports, then run it on ``(B, S_local, H, D)`` shards.

    Excluded from ``torch.compile``: the ring's point-to-point exchange and the traffic counters
    are not traceable, so a compiled block graph-breaks here and runs attention eagerly, while its
    projections, norms and MLP stay compiled.
    """
    if is_block_mask(attn_mask) and roles is not None:
        return _block_masked_attention(query, key, value, config, call, roles, attn_mask, is_causal=is_causal,
                                       scale=scale, dropout_p=dropout_p, return_lse=return_lse)
    unsupported = {
        "dropout_p": dropout_p != 0.0,
        "return_lse": return_lse,
        "key heads that do not divide the query heads": query.shape[2] % key.shape[2] != 0,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(
            f"context-parallel attention got {', '.join(bad)}; cp_plugin's attention supports softmax attention "
            "(with optional masks, causal self-attention, and grouped key/value heads) without dropout. Call the "
            "model without them or train this model without context parallelism (ring_degree=1, ulysses_degree=1)"
        )
    if key.shape[2] != query.shape[2]:  # grouped key/value heads: each serves query_heads / key_heads queries
        groups = query.shape[2] // key.shape[2]
        key, value = key.repeat_interleave(groups, 2), value.repeat_interleave(groups, 2)
    _check_mask_type(attn_mask)
    mesh = config.cp_mesh
    selection = roles is not None and any(map(is_selection, roles[1]))
    if call is not None and not selection:
        _check_split(query, key, config.padding)
    if is_causal:
        attn_mask = _causal_tiles(query, key, attn_mask, config.padding)
    key_mask, tiles, rows = _masks(query, key, attn_mask, None if selection else config.padding, mesh)
    if selection:
        counted = _selection_key_mask(key, roles[1], config.padding, mesh)
        key_mask = counted if key_mask is None else key_mask & counted
    out = context_parallel_attention(query, key, value, mesh, scale=scale, key_mask=key_mask, tiles=tiles)
    # a query that attends no key gets SDPA's zero row (see cp_plugin.attention.masks)
    return out if rows is None else out * rows[:, :, None, None].to(out.dtype)


def _block_masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config: RoutedParallelConfig, call: AttentionCall | None,
    roles: tuple[tuple[str, ...], tuple[str, ...]], block_mask: Any, **kwargs: Any,
) -> torch.Tensor:
    """A call with flex attention's ``BlockMask``, built over the whole sequence before the split: the same
    attention with that mask read a tile at a time (:class:`~cp_plugin.attention.masks.BlockMaskTiles`).

    flex attention takes sequences padded to a multiple of the mask's block size, so a processor pads the
    tokens it holds with zeros (AnyFlow-FAR's) and trims them from the output: here this rank's part of
    the split streams, whose length the call's roles give. The zeros beyond it are no tokens of the
    sequence: they are left out of the attention and get zero rows back, which the processor trims.
    """
    padding = config.padding
    queries = sum(map(padding.local_stream, roles[0]))
    keys = sum(map(padding.local_stream, roles[1]))
    streams = padding.composition(queries)
    rows, cols = block_mask.BLOCK_SIZE
    if (streams is None or len(streams) != 1 or roles[0] != roles[1]
            or not queries <= query.shape[1] < queries + rows or not keys <= key.shape[1] < keys + cols):
        raise ValueError(
            f"context-parallel attention got flex attention's BlockMask for {query.shape[1]} queries and "
            f"{key.shape[1]} keys per rank, over the sequences {' + '.join(roles[0])} and {' + '.join(roles[1])}; "
            "cp_plugin takes a BlockMask built over the whole sequence for one token stream's self-attention (its "
            "tokens padded to the mask's block size or not). Pass the mask as a tensor over the whole sequence, or "
            "train this model without context parallelism (ring_degree=1, ulysses_degree=1)"
        )
    tiles = BlockMaskTiles(block_mask, padding.lengths[streams[0]])
    out = _routed_attention(query[:, :queries], key[:, :keys], value[:, :keys], config, call, roles,
                            attn_mask=tiles, **kwargs)
    return torch.nn.functional.pad(out, (0, 0, 0, 0, 0, query.shape[1] - queries))


def _causal_tiles(
    query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None, padding: SequencePadding | None
) -> CausalTiles:
    """``is_causal`` as what it means over the whole sequence: the lower triangle of one stream's self-attention.

    Each rank's queries sit at their whole-sequence positions, so the triangle is taken over the
    stream, not over this rank's part (whose own triangle would hide earlier ranks' keys).
    """
    streams = None if padding is None else padding.composition(query.shape[1])
    if attn_mask is not None or streams is None or len(streams) != 1 or key.shape[1] != query.shape[1]:
        raise ValueError(
            f"context-parallel attention got is_causal for {query.shape[1]} queries and {key.shape[1]} keys per rank"
            f"{' with a mask' if attn_mask is not None else ''}; causal attention is supported as one token stream's "
            "self-attention without another mask. Pass the causal structure as attn_mask, or train this model "
            "without context parallelism (ring_degree=1, ulysses_degree=1)"
        )
    return CausalTiles(padding.lengths[streams[0]])


def _check_mask_type(attn_mask: Any) -> None:
    if attn_mask is not None and not isinstance(attn_mask, (torch.Tensor, MaskTiles)):
        raise ValueError(
            f"context-parallel attention got an attention mask of type {type(attn_mask).__name__}; cp_plugin's "
            "attention takes tensor masks (and flex attention's BlockMask in a derived plan's blocks). Use a dense or "
            "key-padding mask, or train this model without context parallelism (ring_degree=1, ulysses_degree=1)"
        )


def _probe_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
    scale: float | None = None, enable_gqa: bool = False, **_: Any,
) -> torch.Tensor:
    """A dispatch call during a probe: SDPA in the ``(B, S, H, D)`` layout (which the probe notes)."""
    if is_block_mask(attn_mask):  # a mask over the whole sequence: its tokens' padding is noted (probe.py)
        record = recording()
        record.block_sizes[len(record.attention)] = tuple(attn_mask.BLOCK_SIZE)
        # made in the block from its fake tokens, not passed to it, nor from statistics gathered over the sequence
        if is_symbolic(attn_mask.kv_num_blocks) and id(attn_mask) not in record.whole_block_masks:
            record.inner_block_masks.append(len(record.attention))
        attn_mask = None
    try:
        _check_mask_type(attn_mask)
    except ValueError as err:  # the block's own structure: said whole, not as a failure to run it
        raise ProbeError(str(err)) from err
    if attn_mask is not None and attn_mask.dim() == 2:  # (B, keys), as diffusers' native backend takes it
        attn_mask = attn_mask[:, None, None, :]
    return SDPA(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask, scale=scale,
                 enable_gqa=enable_gqa).transpose(1, 2)


def calls_attention(processor: object) -> bool:
    """Whether a processor reaches attention through one of the two routed paths (dispatch or SDPA)."""
    try:
        source = inspect.getsource(type(processor).__call__)
    except (OSError, TypeError):
        return False
    return "dispatch_attention_fn" in source or "scaled_dot_product_attention" in source
