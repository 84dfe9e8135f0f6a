"""Ring attention that trains: KV blocks travel around the ring, forward and backward.

Each ring rank holds one block of the sequence. In the forward pass the KV blocks rotate: at every
step a rank attends its queries to the block it holds (``attention_forward``, with LSE) and merges
the partial result by LSE (in float32 with ``convert_to_fp32``), while the next block is already
in flight (``RingComm`` posts the send/receive *before* the compute, so transfer overlaps compute,
and at most two KV blocks are resident). The backward pass makes the same rotation, recomputing
each block's gradients from the saved global output and LSE; dq accumulates locally in float32,
and the dK/dV accumulator of a block follows the block from its second holder on and reaches its
owner after the last step, so dK/dV, like KV, make ``ring - 1`` hops: the minimum traffic. Only
``q, k, v, out, lse`` of the local shard are saved, O(S_local) per rank.

The heads go round in groups (:func:`heads_per_pass`), one group's passes after another, forward and
backward: the blocks in flight, the accumulators and the kernels' outputs are one group's, not all
heads'. In the backward our KV is held once, heads outermost, so each group's block travels from
where it lies, and each group's dK/dV take its place once it has left.

``rotate_method="allgather"`` gathers every KV block at once instead (O(S) memory, no overlap),
kept to compare against; its backward returns dK/dV to their owners with a reduce-scatter.
Bytes sent are counted in :data:`cp_plugin.comm.COMM_STATS` under ``ring_p2p``/``ring_allgather``
(forward) and ``ring_p2p_backward``/``ring_allgather_backward``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from cp_plugin.attention.kernels import (
    additive_mask,
    attention_backward,
    attention_forward,
    check_dtype,
    kernel_lanes,
    merge_partial,
)
from cp_plugin.attention.masks import MaskTiles, Reach
from cp_plugin.comm import all_gather, count_sent, reduce_scatter
from cp_plugin.config import divisors

Block = tuple[torch.Tensor, ...]
"""What one ring step hands on: a KV block ``(k, v)``, or the dK/dV accumulators of one, each ``(B, S_local, H, D)``
(the callers' order of dims, in which the kernels lay out their outputs too), dense in any order in memory
(:func:`in_memory_order`). The tensors travel side by side, so neither pass copies a pair into one buffer to send it."""


class RingComm:
    """Double-buffered ring exchange: send to the next ring rank, receive from the previous.

    ``send_recv`` posts the transfers and returns the receive buffers at once, so the caller
    computes on its current block while the next one is in flight; ``wait`` completes them. The
    comm owns the spare buffers: a sent block is free once ``wait`` returns, so it receives the
    transfer after next, unless the caller keeps it (our own block, which the autograd function saves
    for the backward) or no transfer follows. Besides our own block, that is two blocks resident, never more.
    """

    def __init__(self, group: dist.ProcessGroup, kind: str) -> None:
        self.group, self.kind = group, kind
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.next, self.prev = (rank + 1) % size, (rank - 1) % size
        self._pending: list[dist.Work] = []
        self._sending: Block = ()  # held until its transfer completes, whatever the caller drops meanwhile
        self._spare: Block | None = None

    def send_recv(self, send: Block, keep: bool = False) -> Block:
        """Post ``send`` to the next rank and a receive from the previous one; returns its buffers. ``keep``: ``send``
        never receives a later transfer, because the caller keeps it (our own block, saved for the backward) or none
        follows (the exchange's last), so the comm lets go of it once it has left."""
        if self._pending:
            raise RuntimeError("RingComm.send_recv called before wait(): the spare buffer may still be in flight")
        recv = tuple(torch.empty_like(x) for x in send) if self._spare is None else self._spare
        # One batch for both directions: every rank posts the same pairs in the same order, so
        # gloo and NCCL match them without the send-before-receive deadlock of blocking p2p.
        self._pending = dist.batch_isend_irecv([
            op for out, into in zip(send, recv)
            for op in (dist.P2POp(dist.isend, in_memory_order(out).contiguous(), group=self.group, group_peer=self.next),
                       dist.P2POp(dist.irecv, in_memory_order(into), group=self.group, group_peer=self.prev))
        ])
        count_sent(self.kind, sum(x.nbytes for x in send))
        self._sending = send
        self._spare = None if keep else send
        return recv

    def wait(self) -> None:
        """Complete the posted transfers: the received buffers are filled, the sent ones may be reused."""
        for work in self._pending:
            work.wait()
        self._pending, self._sending = [], ()


def in_memory_order(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its dims in the order of its strides, largest first (a view): where ``x`` is dense in any order of
    dims, the contiguous tensor a transfer sends or receives into (a group of heads of a KV held heads outermost,
    sent without a copy). A receive buffer (``empty_like`` a block) is dense with its dims in that order, so every
    ring rank, laying its blocks out alike, reads the bytes where the sender wrote them."""
    return x.permute(sorted(range(x.dim()), key=lambda d: -x.stride(d)))


class BlockExchange(Protocol):
    """One double-buffered rotation: post a send and a receive, compute, then wait (``RingComm``)."""

    def send_recv(self, send: Block, keep: bool = False) -> Block: ...

    def wait(self) -> None: ...


class RingTransport(Protocol):
    """Everything ``_RingAttention`` asks of communication, so the one ring loop runs over any transport.

    :class:`GroupTransport` is the real one (a process group). ``benchmarks.loopback`` supplies one
    that plays the other ranks from full tensors on one device, so the library's own loop, kernels,
    masks and accumulators can be timed without a second device.
    """

    rank: int
    size: int

    def exchange(self, travels: str, kind: str) -> BlockExchange:
        """A rotation of ``travels`` (``"kv"`` blocks, or ``"dkv"`` accumulators), bytes counted as ``kind``."""

    def all_gather(self, xs: Block, kind: str) -> Block:
        """Per tensor of ``xs`` (a KV block), ``(size, *x.shape)``: every ring rank's, in ring order."""

    def reduce_scatter(self, blocks: Block, kind: str) -> Block:
        """Per tensor, ``blocks[i][j]`` summed over ring ranks arrives at rank ``j``; returns this rank's sums."""

    def heads(self, part: slice) -> RingTransport:
        """The transport for one group of heads going round the ring (``part`` of every block's heads)."""


class GroupTransport:
    """The ring over a process group: point-to-point ``RingComm`` rotations and cp_plugin's counted collectives."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def exchange(self, travels: str, kind: str) -> RingComm:
        return RingComm(self.group, kind)

    def all_gather(self, xs: Block, kind: str) -> Block:
        return tuple(all_gather(x, self.group, kind).view(self.size, *x.shape) for x in xs)

    def reduce_scatter(self, blocks: Block, kind: str) -> Block:
        return tuple(reduce_scatter(x.flatten(0, 1), self.group, kind) for x in blocks)

    def heads(self, part: slice) -> GroupTransport:
        return self  # every rank sends what it is given


class _Alone:
    """A ring of one: rank 0 holds every block; nothing travels (its exchanges are never posted)."""

    rank, size = 0, 1

    def exchange(self, travels: str, kind: str) -> _Alone:
        return self

    def wait(self) -> None:
        """Nothing was posted."""

    def all_gather(self, xs: Block, kind: str) -> Block:
        return tuple(x[None] for x in xs)

    def reduce_scatter(self, blocks: Block, kind: str) -> Block:
        return tuple(x[0] for x in blocks)

    def heads(self, part: slice) -> _Alone:
        return self


_ALONE = _Alone()


class _RingAttention(torch.autograd.Function):
    """Ring attention over ``(B, S_local, H, D)`` shards; each KV block travels as the pair ``(k, v)``.

    Communication goes through ``transport`` (a :class:`RingTransport`), the only thing that
    differs between training (:class:`GroupTransport`) and ``benchmarks.blockwise`` (loopback).
    The kernels see ``(B, H, S, D)`` views of the same tensors, and the output is theirs,
    ``(B, H, S_local, D)``: a view made here could not be written in place by the caller.

    ``key_masks`` is ``None`` or ``(r, B, S_local)``: per KV block ``j``, the key mask over it (bytes
    per token, so gathered once instead of travelling with the blocks). ``tiles`` is ``None`` or a
    two-dimensional mask over the whole sequence (:class:`~cp_plugin.attention.masks.MaskTiles`),
    read a tile at a time as each block is computed, forward and again backward.

    ``heads`` heads go round the ring at a time (:func:`head_groups`): each group makes its own passes, forward and
    backward, so the blocks in flight and the kernels' outputs are a group's, not all heads'.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_masks, tiles, transport, scale, rotate_method,  # type: ignore[override]
                convert_to_fp32, heads):
        acc_dtype = _wide(q.dtype) if convert_to_fp32 else q.dtype
        groups = head_groups(q.shape[2], heads)
        if len(groups) == 1:
            k, v = k.contiguous(), v.contiguous()  # as it travels; saved for the backward
            out, lse = _forward_pass(q, (k, v), key_masks, tiles, transport, scale, rotate_method, acc_dtype)
        else:
            batch, length, count, dim = q.shape
            # laid out as the queries are, heads inside tokens: the caller's merge of the heads is then a view of it
            out = q.new_empty(batch, length, count, dim).transpose(1, 2)
            lse = q.new_empty(batch, count, length, dtype=_wide(q.dtype))
            for part in groups:  # a group's block is copied to travel; what is saved is ``k`` and ``v`` themselves
                out[:, part], lse[:, part] = _forward_pass(
                    q[:, :, part], (k[:, :, part].contiguous(), v[:, :, part].contiguous()), key_masks,
                    _heads_of(tiles, part), transport.heads(part), scale, rotate_method, acc_dtype)
        ctx.save_for_backward(q, k, v, out, lse, key_masks)
        ctx.transport, ctx.scale, ctx.rotate_method = transport, scale, rotate_method
        ctx.tiles, ctx.heads = tiles, heads
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse, key_masks = ctx.saved_tensors
        # A query that attends no key at all (a row of a two-dimensional mask) has LSE -inf and an output of zero, as
        # SDPA gives it; any finite LSE makes its probabilities exp(-inf) = 0, so its gradients are zero too, not NaN.
        lse = lse.masked_fill(lse == float("-inf"), 0.0)
        queries = q.transpose(1, 2)
        dq = torch.zeros_like(queries, dtype=_wide(q.dtype))
        groups = head_groups(q.shape[2], ctx.heads)
        args = (key_masks, ctx.scale, ctx.rotate_method)
        if len(groups) == 1:
            # From here only the pass holds our own block: under a checkpoint the recomputed block is freed once the
            # ring has moved past it.
            blocks, kv_dtype = [(k, v)], k.dtype
            del k, v
            dk, dv = _backward_pass(grad_out, queries, blocks, out, lse, dq, ctx.tiles, ctx.transport, *args)
            dk, dv = dk.to(kv_dtype), dv.to(kv_dtype)
        else:
            # Our KV once more, ours to write, heads outermost: under a checkpoint nothing else holds the recomputed
            # ``k`` and ``v``, freed here. A group's block is then one piece of memory, which travels as it is, and
            # its dK/dV take its place once it has left, so KV and dK/dV together take one KV's memory at every step.
            # Returned laid out as ``k`` and ``v`` were, one after the other once the ring is done: the backward of
            # the ops that made them (views, reshapes) would copy them otherwise, and at a higher peak than this.
            layouts = (_layout(k), _layout(v))
            dk = _heads_outermost(k)
            del k
            dv = _heads_outermost(v)
            del v
            for part in groups:
                block = (dk[:, :, part], dv[:, :, part])
                _backward_pass(grad_out[:, part], queries[:, part], [block], out[:, part], lse[:, part], dq[:, part],
                               _heads_of(ctx.tiles, part), ctx.transport.heads(part), *args, into=block)
                del block
            dk = _laid_out(dk, layouts[0])
            dv = _laid_out(dv, layouts[1])
        return dq.to(q.dtype).transpose(1, 2), dk, dv, *(None,) * 7


def heads_per_pass(query: torch.Tensor, most: int | None, lanes: int | None = None) -> int:
    """How many heads go round the ring together, for queries ``(B, S_local, H, D)``: a divisor of ``H``.

    The fewer heads a pass takes, the smaller the blocks in flight and the kernels' outputs (the ring's share of a
    step's peak falls as 1/groups), but a kernel call needs ``lanes`` of work to keep the device busy
    (:func:`~cp_plugin.attention.kernels.kernel_lanes`: query rows on CUDA, (batch, head) pairs elsewhere), so a
    pass takes the fewest heads that give it that. ``most`` (``ring_heads_per_pass``) caps it instead: the largest
    divisor of ``H`` not above it. Every ring rank must choose alike (their blocks must match): the mesh agrees on
    ``lanes`` once, when it is built (``None``: this process's own).
    """
    batch, rows, count, _ = query.shape
    fits = divisors(count)
    if most is not None:
        return max(d for d in fits if d <= most)
    lanes = kernel_lanes(query.device.type) if lanes is None else lanes
    per_head = batch * rows if query.device.type == "cuda" else batch
    return next(d for d in fits if d * per_head >= lanes or d == count)


def head_groups(count: int, heads: int) -> list[slice]:
    """The heads that go round the ring together: ``heads`` at a time (a divisor of ``count``)."""
    return [slice(first, first + heads) for first in range(0, count, heads)]


def _heads_of(tiles: MaskTiles | None, part: slice) -> MaskTiles | None:
    """A two-dimensional mask for heads ``part`` only (itself where one mask serves every head)."""
    return None if tiles is None else tiles.for_heads(part.start, part.stop)


def _forward_pass(q: torch.Tensor, kv: Block, key_masks: torch.Tensor | None, tiles: MaskTiles | None,
                  transport: RingTransport, scale: float, rotate_method: str, acc_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of our queries ``(B, S_local, h, D)`` over every KV block, our own ``kv`` first: ``out``
    ``(B, h, S_local, D)`` in the queries' dtype, ``lse`` ``(B, h, S_local)``."""
    rank, size = transport.rank, transport.size
    queries = q.transpose(1, 2)
    tile = _TileOf(tiles, rank, q.shape[1], kv[0].shape[1])
    out = lse = None
    if rotate_method == "allgather":
        for origin, block in enumerate(zip(*transport.all_gather(kv, "ring_allgather"))):
            mask = _mask_of(key_masks, origin)
            # from the second merge on, ``out`` is a merge's own result: written in place
            out, lse = merge_partial(out, lse, *_block_forward(queries, block, mask, tile.of(origin), scale,
                                                               acc_dtype), in_place=origin > 1)
    else:
        comm = transport.exchange("kv", "ring_p2p")
        for step in range(size):
            incoming = comm.send_recv(kv, keep=_kv_kept(step, size)) if step + 1 < size else None
            origin = (rank - step) % size
            mask = _mask_of(key_masks, origin)
            out, lse = merge_partial(out, lse, *_block_forward(queries, kv, mask, tile.of(origin), scale,
                                                               acc_dtype), in_place=step > 1)
            if incoming is not None:
                comm.wait()
                kv = incoming
    return out.to(q.dtype), lse.squeeze(-1)


def _backward_pass(grad_out: torch.Tensor, queries: torch.Tensor, blocks: list[Block], out: torch.Tensor,
                   lse: torch.Tensor, dq: torch.Tensor, tiles: MaskTiles | None, transport: RingTransport,
                   key_masks: torch.Tensor | None, scale: float, rotate_method: str, into: Block | None = None
                   ) -> Block:
    """Add our queries' gradient ``(B, h, S_local, D)`` into ``dq`` and return our own block's dK/dV, in ``dq``'s
    (wide) dtype. ``blocks`` hands over our own KV block, the pass taking the only reference to it. ``into``: where
    to write them instead (returned), the memory of that block itself, which they take once it has left: from then
    on no step holds our block's dK/dV beside it (only where ``into`` has ``dq``'s dtype, so that the accumulators
    coming home are added at that width; else written there at the end)."""
    kv: Block | None = blocks.pop()
    rank, size = transport.rank, transport.size
    tile = _TileOf(tiles, rank, queries.shape[2], kv[0].shape[1])
    if rotate_method == "allgather":
        per_block = [
            _block_backward(grad_out, queries, block, _mask_of(key_masks, origin), tile.of(origin), out, lse,
                            scale, dq)
            for origin, block in enumerate(zip(*transport.all_gather(kv, "ring_allgather_backward")))
        ]
        return _placed(transport.reduce_scatter(tuple(torch.stack(parts) for parts in zip(*per_block)),
                                                "ring_allgather_backward"), into)
    kv_comm = transport.exchange("kv", "ring_p2p_backward")
    dkv_comm = transport.exchange("dkv", "ring_p2p_backward")
    own_dkv = incoming_dkv = None
    for step in range(size):
        incoming_kv = kv_comm.send_recv(kv, keep=_kv_kept(step, size)) if step + 1 < size else None
        origin = (rank - step) % size
        block_dkv = _block_backward(grad_out, queries, kv, _mask_of(key_masks, origin), tile.of(origin), out,
                                    lse, scale, dq)
        # Done with it: on the last step nothing else holds the block (our own, recomputed under a
        # checkpoint, once it has left), so it is freed before the buffer for our accumulator is made.
        kv = None
        if step == 0:  # our own block: keep its share until its accumulator comes home
            own_dkv = block_dkv
        else:
            if incoming_dkv is not None:  # the accumulator of the block we now hold
                dkv_comm.wait()  # it travelled while we computed
                _accumulate(block_dkv, incoming_dkv)
            # on to the block's next holder; after the last step that is its owner, and the comm keeps no spare
            incoming_dkv = dkv_comm.send_recv(block_dkv, keep=step + 1 == size)
        if incoming_kv is not None:
            kv_comm.wait()
            kv = incoming_kv
        if step == 0 and into is not None and into[0].dtype == own_dkv[0].dtype:
            own_dkv = _placed(own_dkv, into)  # our block has left (or goes nowhere): its dK/dV take its place
        block_dkv = None  # kept where it must be (as ``own_dkv``, or by the comm until it has left), not beside the next
    dkv_comm.wait()
    if incoming_dkv is not None:  # our own block's accumulator, home after ring - 1 hops
        _accumulate(own_dkv, incoming_dkv)
    return _placed(own_dkv, into)


def _kv_kept(step: int, size: int) -> bool:
    """Whether the KV block sent at ``step`` must not receive a later transfer: our own (step 0, saved for the
    backward), or the ring's last send (at step ``size - 2``), after which no transfer comes."""
    return step == 0 or step + 2 == size


def _placed(dkv: Block, into: Block | None) -> Block:
    """``dkv`` written into ``into`` (``into`` returned), or ``dkv`` itself where ``into`` is ``None`` or is it."""
    if into is None or all(a is b for a, b in zip(dkv, into)):
        return dkv
    for slot, x in zip(into, dkv):
        slot.copy_(x)
    return into


def _heads_outermost(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` ``(B, S, H, D)``, shaped as it but held heads outermost: a group of its heads is one piece."""
    return x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)


def _layout(x: torch.Tensor) -> tuple[int, ...] | None:
    """The strides a copy of ``x`` takes, as ``clone`` lays one out: ``x``'s own where it is dense, else ``None``
    (contiguous)."""
    return x.stride() if in_memory_order(x).is_contiguous() else None


def _laid_out(x: torch.Tensor, strides: tuple[int, ...] | None) -> torch.Tensor:
    """A copy of ``x`` with ``strides`` (contiguous where ``None``)."""
    return x.contiguous() if strides is None else x.new_empty_strided(x.shape, strides).copy_(x)


def _accumulate(into: Block, more: Block) -> None:
    """Add ``more`` into ``into``, tensor by tensor."""
    for acc, part in zip(into, more):
        acc += part


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half precision, the dtype itself when it is wider."""
    return torch.promote_types(dtype, torch.float32)


def _mask_of(key_masks: torch.Tensor | None, origin: int) -> torch.Tensor | None:
    return None if key_masks is None else key_masks[origin]


# Keys per tile of a two-dimensional mask, at the least: below this a kernel call is mostly overhead.
MIN_TILE_KEYS = 128
# Queries per tile, as a multiple of its keys: enough rows per kernel call to run at speed, few enough that the rows
# of a block-causal or block-sparse mask's tile often attend nothing (skipped) or everything (no mask).
TILE_ROWS_PER_KEY = 4


def tile_keys(q: torch.Tensor, per_head: bool) -> int:
    """Keys per tile of a two-dimensional mask for queries ``q`` ``(B, H, S_q, D)``: as many as the queries' width
    ``H x D`` (``D`` for a mask per head), so that a tile's additive bias, ``(B, rows, keys)`` (``(B, H, rows, keys)``),
    is never larger than the queries themselves (and its boolean mask a quarter of that): the mask costs what one
    more activation costs, whatever the length."""
    return max(MIN_TILE_KEYS, q.shape[3] * (1 if per_head else q.shape[1]))


def tile_rows(q: torch.Tensor, per_head: bool) -> int:
    """Queries per tile of a two-dimensional mask: ``TILE_ROWS_PER_KEY`` times its keys."""
    return TILE_ROWS_PER_KEY * tile_keys(q, per_head)


@dataclass(frozen=True)
class _TileOf:
    """Where this rank's queries and each KV block sit in the whole sequence, to read a two-dimensional mask's tiles:
    ring rank ``r`` holds queries and keys ``r * S_local`` onwards."""

    tiles: MaskTiles | None
    rank: int
    queries: int
    keys: int

    def of(self, origin: int) -> _BlockTile | None:
        if self.tiles is None:
            return None
        return _BlockTile(self.tiles, self.rank * self.queries, origin * self.keys)


@dataclass(frozen=True)
class _BlockTile:
    tiles: MaskTiles
    first_query: int
    first_key: int

    def chunks(self, q: torch.Tensor, keys: int, key_mask: torch.Tensor | None
               ) -> Iterator[tuple[slice, int, int, torch.Tensor | None]]:
        """``(rows, start, stop, mask)`` per tile of our queries and the block's keys that attends anything: the mask
        ``(B, rows, stop - start)`` (``(B, H, rows, stop - start)`` for a mask per head) with the key mask applied,
        or the key mask alone ``(B, stop - start)`` (``None`` without one) where the tile attends every key."""
        per_head = len(self.tiles.lead) == 2
        height, step = tile_rows(q, per_head), tile_keys(q, per_head)
        for top in range(0, q.shape[2], height):
            bottom = min(q.shape[2], top + height)
            rows = (self.first_query + top, self.first_query + bottom)
            for start in range(0, keys, step):
                stop = min(keys, start + step)
                cols = (self.first_key + start, self.first_key + stop)
                reach = self.tiles.reach(rows, cols)
                if reach is Reach.NONE:
                    continue
                key_part = None if key_mask is None else key_mask[:, start:stop]
                if reach is Reach.ALL:
                    yield slice(top, bottom), start, stop, key_part
                    continue
                mask = self.tiles.tile(rows, cols, q.device)
                if key_part is not None:  # (B, keys) under a (B, rows, keys) or (B, heads, rows, keys) tile
                    mask = mask & key_part[(slice(None),) + (None,) * (mask.dim() - 2)]
                yield slice(top, bottom), start, stop, mask


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
            acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``q`` over keys ``k`` under a boolean ``mask``: a query that attends none gets LSE -inf."""
    out, lse = attention_forward(q, k, v, scale, additive_mask(mask, q, k))
    if mask is not None:  # the kernel reports LSE 0 for a row with no valid key in the block; it is -inf
        empty = ~mask.any(-1)  # (B,) for a key mask, (B, rows) or (B, H, rows) for a tile of a 2-D mask
        empty = empty[:, None, None] if empty.dim() == 1 else empty[:, None] if empty.dim() == 2 else empty
        lse = lse.masked_fill(empty, float("-inf"))
    return out.to(acc_dtype), lse


def _block_forward(
    q: torch.Tensor, kv: Block, key_mask: torch.Tensor | None, tile: _BlockTile | None, scale: float,
    acc_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of our queries ``(B, H, S, D)`` over the block; over a two-dimensional mask, tile by tile (a
    query that attends none of the block's keys gets 0 and -inf)."""
    k, v = (x.transpose(1, 2) for x in kv)
    if tile is None:
        return _attend(q, k, v, key_mask, scale, acc_dtype)
    out = q.new_zeros(q.shape, dtype=acc_dtype)
    lse = q.new_full((*q.shape[:3], 1), float("-inf"), dtype=_wide(q.dtype))
    for rows, start, stop, mask in tile.chunks(q, k.shape[2], key_mask):
        chunk = _attend(q[:, :, rows], k[:, :, start:stop], v[:, :, start:stop], mask, scale, acc_dtype)
        # ``out`` is ours: its rows are merged in place
        lse[:, :, rows] = merge_partial(out[:, :, rows], lse[:, :, rows], *chunk, in_place=True)[1]
    return out, lse.squeeze(-1)


def _block_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    kv: Block,
    key_mask: torch.Tensor | None,
    tile: _BlockTile | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    dq: torch.Tensor,
) -> Block:
    """Add this block's dq into ``dq`` (queries ``(B, H, S, D)``) and return its dK/dV, shaped and laid out as the
    block travels, in ``dq``'s (wide) dtype."""
    k, v = (x.transpose(1, 2) for x in kv)
    if tile is None:
        chunk_dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, scale, additive_mask(key_mask, q, k))
        dq += chunk_dq
        del chunk_dq  # at the ring's peak, one block's share of q fewer
        return tuple(x.transpose(1, 2).to(dq.dtype).contiguous() for x in (dk, dv))
    dkv = tuple(x.new_zeros(x.shape, dtype=dq.dtype) for x in kv)  # keys no tile attends get no gradient
    dk_all, dv_all = (x.transpose(1, 2) for x in dkv)
    for rows, start, stop, mask in tile.chunks(q, k.shape[2], key_mask):
        q_rows, k_part, v_part = q[:, :, rows], k[:, :, start:stop], v[:, :, start:stop]
        chunk_dq, dk, dv = attention_backward(grad_out[:, :, rows], q_rows, k_part, v_part, out[:, :, rows],
                                              lse[:, :, rows], scale, additive_mask(mask, q_rows, k_part))
        dq[:, :, rows] += chunk_dq
        dk_all[:, :, start:stop] += dk
        dv_all[:, :, start:stop] += dv
    return dkv


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    scale: float | None = None,
    rotate_method: str = "p2p",
    convert_to_fp32: bool = True,
    key_mask: torch.Tensor | None = None,
    tiles: MaskTiles | None = None,
    most_heads: int | None = None,
    lanes: int | None = None,
) -> torch.Tensor:
    """Full-sequence attention of ring shards ``(B, S_local, H, D)`` (ring rank ``r`` holds block ``r``).

    Returns this rank's shard of the output, ``(B, S_local, H, D)`` in the input dtype; gradients
    flow to the local ``query``, ``key`` and ``value``.

    Args:
        group: the ring's process group; its rank order is the order of the sequence blocks. ``None``:
            a ring of one, which holds the whole sequence (attention over a two-dimensional mask's tiles).
        scale: softmax scale, ``head_dim ** -0.5`` by default (as SDPA).
        rotate_method: ``"p2p"`` (double-buffered ring, two KV blocks resident) or ``"allgather"``
            (every KV block at once; for comparison).
        convert_to_fp32: merge the partial outputs in float32; ``False`` merges in the input dtype.
        key_mask: optional boolean ``(B, S_local)``, True where a key may be attended to.
        tiles: optional two-dimensional mask over the whole ring sequence (a block-causal one, flex
            attention's ``BlockMask``): each step reads the tiles of our queries and the block in flight.
        most_heads: at most this many heads go round the ring at a time (:func:`heads_per_pass`; ``None``: the
            fewest that keep the device busy).
        lanes: what a kernel call needs to keep the device busy, agreed by every ring rank (``ParallelMesh``);
            ``None``: this process's own (:func:`heads_per_pass`).
    """
    if rotate_method not in ("p2p", "allgather"):
        raise ValueError(f"rotate_method={rotate_method!r} is not supported; use 'p2p' or 'allgather'")
    check_dtype(query)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    transport = _ALONE if group is None else GroupTransport(group)
    key_masks = None if key_mask is None else transport.all_gather((key_mask,), "ring_mask")[0]
    out = _RingAttention.apply(query, key, value, key_masks, tiles, transport, scale, rotate_method, convert_to_fp32,
                               heads_per_pass(query, most_heads, lanes))
    return out.transpose(1, 2)
