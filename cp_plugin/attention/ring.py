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

``rotate_method="allgather"`` gathers every KV block at once instead (O(S) memory, no overlap),
kept to compare against; its backward returns dK/dV to their owners with a reduce-scatter.
Bytes sent are counted in :data:`cp_plugin.comm.COMM_STATS` under ``ring_p2p``/``ring_allgather``
(forward) and ``ring_p2p_backward``/``ring_allgather_backward``.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from cp_plugin.attention.kernels import (
    additive_mask,
    attention_backward,
    attention_forward,
    check_dtype,
    merge_partial,
)
from cp_plugin.comm import all_gather, count_sent, reduce_scatter


class RingComm:
    """Double-buffered ring exchange: send to the next ring rank, receive from the previous.

    ``send_recv`` posts both transfers and returns the receive buffer at once, so the caller
    computes on its current block while the next one is in flight; ``wait`` completes them. The
    comm owns the spare buffer: a sent buffer is free once ``wait`` returns, so it receives the
    transfer after next, unless the caller keeps it (our own block, which the autograd function saves
    stacked, so that neither pass copies ``k`` and ``v`` into one more buffer). Besides our own block,
    that is two blocks resident, never more.
    """

    def __init__(self, group: dist.ProcessGroup, kind: str) -> None:
        self.group, self.kind = group, kind
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.next, self.prev = (rank + 1) % size, (rank - 1) % size
        self._pending: list[dist.Work] = []
        self._spare: torch.Tensor | None = None

    def send_recv(self, send: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """Post ``send`` to the next rank and a receive from the previous one; returns its buffer. ``keep``: the
        caller keeps ``send`` (our own block, saved for the backward), so it never receives a later transfer."""
        if self._pending:
            raise RuntimeError("RingComm.send_recv called before wait(): the spare buffer may still be in flight")
        recv = torch.empty_like(send) if self._spare is None else self._spare
        # One batch for both directions: every rank posts the same pair in the same order, so
        # gloo and NCCL match them without the send-before-receive deadlock of blocking p2p.
        self._pending = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, send, group=self.group, group_peer=self.next),
                dist.P2POp(dist.irecv, recv, group=self.group, group_peer=self.prev),
            ]
        )
        count_sent(self.kind, send.nbytes)
        self._spare = None if keep else send
        return recv

    def wait(self) -> None:
        """Complete the posted pair: the received buffer is filled, the sent one may be reused."""
        for work in self._pending:
            work.wait()
        self._pending = []


class BlockExchange(Protocol):
    """One double-buffered rotation: post a send and a receive, compute, then wait (``RingComm``)."""

    def send_recv(self, send: torch.Tensor, keep: bool = False) -> torch.Tensor: ...

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

    def all_gather(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """``(size, *x.shape)``: every ring rank's ``x`` (a KV block), in ring order."""

    def reduce_scatter(self, blocks: torch.Tensor, kind: str) -> torch.Tensor:
        """``blocks[j]`` summed over ring ranks arrives at rank ``j``; returns this rank's sum."""


class GroupTransport:
    """The ring over a process group: point-to-point ``RingComm`` rotations and cp_plugin's counted collectives."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def exchange(self, travels: str, kind: str) -> RingComm:
        return RingComm(self.group, kind)

    def all_gather(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        return all_gather(x, self.group, kind).view(self.size, *x.shape)

    def reduce_scatter(self, blocks: torch.Tensor, kind: str) -> torch.Tensor:
        return reduce_scatter(blocks.flatten(0, 1), self.group, kind)


class _RingAttention(torch.autograd.Function):
    """Ring attention over ``(B, H, S_local, D)`` shards; KV travels as one stacked ``(2, ...)`` buffer.

    Communication goes through ``transport`` (a :class:`RingTransport`), the only thing that
    differs between training (:class:`GroupTransport`) and ``benchmarks.blockwise`` (loopback).

    ``key_masks`` is ``None`` or, per KV block ``j``, the boolean mask of our queries over it:
    ``(r, B, S_local)`` key masks (bytes per token, so gathered once instead of travelling with the
    blocks), or ``(r, B, S_q, S_local)`` blocks of a two-dimensional mask every rank holds.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_masks, transport, scale, rotate_method, convert_to_fp32):  # type: ignore[override]
        acc_dtype = _wide(q.dtype) if convert_to_fp32 else q.dtype
        rank, size = transport.rank, transport.size
        kv = own_kv = torch.stack((k, v))  # saved as it is: the backward needs it stacked too
        out = lse = None
        if rotate_method == "allgather":
            for origin, block in enumerate(transport.all_gather(kv, "ring_allgather")):
                out, lse = merge_partial(out, lse, *_block_forward(q, block, _mask_of(key_masks, origin), scale, acc_dtype))
        else:
            comm = transport.exchange("kv", "ring_p2p")
            for step in range(size):
                incoming = comm.send_recv(kv, keep=step == 0) if step + 1 < size else None
                mask = _mask_of(key_masks, (rank - step) % size)
                out, lse = merge_partial(out, lse, *_block_forward(q, kv, mask, scale, acc_dtype))
                if incoming is not None:
                    comm.wait()
                    kv = incoming
        out, lse = out.to(q.dtype), lse.squeeze(-1)
        ctx.save_for_backward(q, own_kv, out, lse, key_masks)
        ctx.transport, ctx.scale, ctx.rotate_method = transport, scale, rotate_method
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, kv, out, lse, key_masks = ctx.saved_tensors
        transport, scale = ctx.transport, ctx.scale
        rank, size = transport.rank, transport.size
        dq = torch.zeros_like(q, dtype=_wide(q.dtype))
        kv_dtype = kv.dtype
        if ctx.rotate_method == "allgather":
            blocks = transport.all_gather(kv, "ring_allgather_backward")
            dkv_all = torch.stack(
                [_block_backward(grad_out, q, block, _mask_of(key_masks, origin), out, lse, scale, dq)
                 for origin, block in enumerate(blocks)]
            )
            dkv = transport.reduce_scatter(dkv_all, "ring_allgather_backward")
        else:
            kv_comm = transport.exchange("kv", "ring_p2p_backward")
            dkv_comm = transport.exchange("dkv", "ring_p2p_backward")
            own_dkv = incoming_dkv = None
            for step in range(size):
                incoming_kv = kv_comm.send_recv(kv, keep=step == 0) if step + 1 < size else None
                mask = _mask_of(key_masks, (rank - step) % size)
                block_dkv = _block_backward(grad_out, q, kv, mask, out, lse, scale, dq)
                if step == 0:  # our own block: keep its share until its accumulator comes home
                    own_dkv = block_dkv
                else:
                    if incoming_dkv is not None:  # the accumulator of the block we now hold
                        dkv_comm.wait()  # it travelled while we computed
                        block_dkv += incoming_dkv
                    # on to the block's next holder; after the last step that is its owner
                    incoming_dkv = dkv_comm.send_recv(block_dkv)
                if incoming_kv is not None:
                    kv_comm.wait()
                    kv = incoming_kv
            dkv_comm.wait()
            if incoming_dkv is not None:  # our own block's accumulator, home after ring - 1 hops
                own_dkv += incoming_dkv
            dkv = own_dkv
        dk, dv = dkv.to(kv_dtype).unbind(0)
        return dq.to(q.dtype), dk, dv, None, None, None, None, None


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half precision, the dtype itself when it is wider."""
    return torch.promote_types(dtype, torch.float32)


def _mask_of(key_masks: torch.Tensor | None, origin: int) -> torch.Tensor | None:
    return None if key_masks is None else key_masks[origin]


def _block_forward(
    q: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None, scale: float, acc_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = attention_forward(q, kv[0], kv[1], scale, additive_mask(key_mask, q, kv[0]))
    if key_mask is not None:  # the kernel reports LSE 0 for a row with no valid key in the block; it is -inf
        empty = ~key_mask.any(-1)  # (B,) for a key mask, (B, S_q) for a block of a 2-D mask
        lse = lse.masked_fill(empty[:, None, None] if empty.dim() == 1 else empty[:, None], float("-inf"))
    return out.to(acc_dtype), lse


def _block_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    kv: torch.Tensor,
    key_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    dq: torch.Tensor,
) -> torch.Tensor:
    """Add this block's dq into ``dq`` and return its ``(2, ...)`` dK/dV in ``dq``'s (wide) dtype."""
    bias = additive_mask(key_mask, q, kv[0])
    block_dq, dk, dv = attention_backward(grad_out, q, kv[0], kv[1], out, lse, scale, bias)
    dq += block_dq
    return torch.stack((dk, dv)).to(dq.dtype)


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    scale: float | None = None,
    rotate_method: str = "p2p",
    convert_to_fp32: bool = True,
    key_mask: torch.Tensor | None = None,
    full_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full-sequence attention of ring shards ``(B, S_local, H, D)`` (ring rank ``r`` holds block ``r``).

    Returns this rank's shard of the output, ``(B, S_local, H, D)`` in the input dtype; gradients
    flow to the local ``query``, ``key`` and ``value``.

    Args:
        group: the ring's process group; its rank order is the order of the sequence blocks.
        scale: softmax scale, ``head_dim ** -0.5`` by default (as SDPA).
        rotate_method: ``"p2p"`` (double-buffered ring, two KV blocks resident) or ``"allgather"``
            (every KV block at once; for comparison).
        convert_to_fp32: merge the partial outputs in float32; ``False`` merges in the input dtype.
        key_mask: optional boolean ``(B, S_local)``, True where a key may be attended to.
        full_mask: optional boolean ``(B or 1, S, S)`` over the whole ring sequence, held by every
            rank (a genuinely two-dimensional mask such as a block-causal one): each step uses the
            rows of our queries and the columns of the block in flight.
    """
    if rotate_method not in ("p2p", "allgather"):
        raise ValueError(f"rotate_method={rotate_method!r} is not supported; use 'p2p' or 'allgather'")
    check_dtype(query)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    transport = GroupTransport(group)
    key_masks = None if key_mask is None else transport.all_gather(key_mask, "ring_mask")
    if full_mask is not None:
        s_local = q.shape[2]
        rows = full_mask[:, transport.rank * s_local : (transport.rank + 1) * s_local]
        blocks = rows.unflatten(2, (transport.size, s_local)).movedim(2, 0)  # (r, B, S_q, S_local)
        key_masks = blocks if key_masks is None else blocks & key_masks[:, :, None, :]
    out = _RingAttention.apply(q, k, v, key_masks, transport, scale, rotate_method, convert_to_fp32)
    return out.transpose(1, 2)
