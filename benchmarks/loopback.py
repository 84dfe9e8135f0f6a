"""One ring rank on one device: a ``RingTransport`` that plays the other ranks from the full tensors.

``benchmarks.blockwise`` times the ring the library runs (``_RingAttention``: its loop, kernels,
masks and wide accumulators) without a second device. Communication becomes local copies: a KV
rotation copies the block the previous rank would send into the receive buffer; a dK/dV rotation
records what this rank sends (its contribution to that block's gradient) and receives zeros, since
the other ranks are not computing. The all-gather variant stacks every block; its reduce-scatter
records each block's contribution and keeps this rank's own. So after a step this rank's
``q.grad`` is exact, and ``dk_dv`` assembles what its queries contribute to every key block: the
gradients one fused SDPA of the same queries over all keys gives. With ``record=False`` (timing,
peak memory) nothing is kept that a real ring would have let go.
"""

from __future__ import annotations

import torch

from cp_plugin.attention.ring import Block


class _LoopbackExchange:
    """A ``RingComm`` whose peer is the full tensor: ``block`` is the index this rank sends next."""

    def __init__(self, ring: LoopbackRing, travels: str) -> None:
        # KV rotates from our own block on; dK/dV accumulators start at a block's second holder.
        self.ring, self.travels = ring, travels
        self.block = ring.rank if travels == "kv" else ring.rank - 1
        self._spare: Block | None = None

    def send_recv(self, send: Block, keep: bool = False) -> Block:
        size = self.ring.size
        if self.travels == "kv":  # the previous rank's block, copied into the spare buffers as a receive would
            recv = tuple(torch.empty_like(x) for x in send) if self._spare is None else self._spare
            for held, block in zip(recv, self.ring.kv_blocks[(self.block - 1) % size]):
                held.copy_(block)
            self._spare = None if keep else send
        else:  # our share of the block's gradient leaves; the other ranks add nothing
            self.ring.keep(self.block % size, send)
            recv = tuple(torch.zeros_like(x) for x in send)
        self.block -= 1
        return recv

    def wait(self) -> None:
        """Nothing in flight: copies are done when ``send_recv`` returns."""


class LoopbackRing:
    """Rank ``rank`` of a ``size``-rank ring whose KV is ``k``, ``v`` (full ``(B, S, H, D)`` tensors)."""

    def __init__(self, rank: int, size: int, k: torch.Tensor, v: torch.Tensor, record: bool = True) -> None:
        self.rank, self.size, self.record = rank, size, record
        self.k, self.v = k, v
        # views, so that the loopback itself allocates nothing a real rank would not
        self.kv_blocks = list(zip(k.chunk(size, dim=1), v.chunk(size, dim=1)))
        self.sent_dkv: dict[int, Block] = {}
        self.whole, self.part = self, slice(None)

    def heads(self, part: slice) -> LoopbackRing:
        """The ring of heads ``part`` only, recording into this one's contributions."""
        ring = LoopbackRing(self.rank, self.size, self.k[:, :, part], self.v[:, :, part], self.record)
        ring.whole, ring.part = self, part
        return ring

    def keep(self, block: int, dkv: Block) -> None:
        """Record this rank's dK/dV contribution to ``block`` (only when recording), in its heads' place."""
        if not self.record:
            return
        if self.whole is self:
            self.sent_dkv[block] = dkv
            return
        shapes = [x.shape for x in self.whole.kv_blocks[block]]
        into = self.whole.sent_dkv.setdefault(block, tuple(x.new_zeros(s) for x, s in zip(dkv, shapes)))
        for whole, part in zip(into, dkv):
            whole[:, :, self.part] = part

    def exchange(self, travels: str, kind: str) -> _LoopbackExchange:
        return _LoopbackExchange(self, travels)

    def all_gather(self, xs: Block, kind: str) -> Block:
        shapes, given = [tuple(x.shape) for x in self.kv_blocks[0]], [tuple(x.shape) for x in xs]
        if given != shapes:
            raise ValueError(f"the loopback ring gathers KV blocks of shapes {shapes}, got {given}")
        return tuple(torch.stack(parts) for parts in zip(*self.kv_blocks))

    def reduce_scatter(self, blocks: Block, kind: str) -> Block:
        for block in range(self.size):
            self.keep(block, tuple(x[block] for x in blocks))
        return tuple(x[self.rank].clone() for x in blocks)

    def dk_dv(self, own: Block) -> Block:
        """``(dk, dv)``, each ``(B, S, H, D)``: this rank's contributions to every block, ``own`` for its own block."""
        parts = {**self.sent_dkv, self.rank: own}
        return tuple(torch.cat([parts[j][i].to(x.dtype) for j in range(self.size)], dim=1) for i, x in enumerate(own))
