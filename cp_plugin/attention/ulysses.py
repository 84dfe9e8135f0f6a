"""Ulysses: trade a sequence shard for a head shard with one all-to-all, and back.

Before attention each rank holds ``S/u`` tokens of all ``H`` heads; after the exchange it holds
all ``S`` tokens of ``H/u`` heads, so attention over those heads is purely local. Query, key and
value travel in one all-to-all (one latency instead of three). The backward of an exchange is the
opposite exchange, so gradients need no extra bookkeeping.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(..., B, S/u, H, D)`` -> ``(..., B, S, H/u, D)``; leading dims (e.g. stacked q/k/v) ride along."""
    u = dist.get_world_size(group)
    *lead, b, s_local, h, d = x.shape
    n = len(lead)
    # (..., B, S/u, u, H/u, D) -> (u, ..., B, S/u, H/u, D): chunk j goes to rank j (its head group).
    x = x.reshape(*lead, b, s_local, u, h // u, d).movedim(n + 2, 0).contiguous()
    x = _all_to_all(x, group)
    # chunk j now holds rank j's tokens: put them in sequence order.
    return x.movedim(0, n + 1).reshape(*lead, b, u * s_local, h // u, d)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(..., B, S, H/u, D)`` -> ``(..., B, S/u, H, D)``: the inverse of :func:`_seq_to_heads`."""
    u = dist.get_world_size(group)
    *lead, b, s, h_local, d = x.shape
    n = len(lead)
    # (..., B, u, S/u, H/u, D) -> (u, ..., B, S/u, H/u, D): sequence chunk j goes back to rank j.
    x = x.reshape(*lead, b, u, s // u, h_local, d).movedim(n + 1, 0).contiguous()
    x = _all_to_all(x, group)
    # chunk j now holds head group j of our tokens: put heads in order.
    return x.movedim(0, n + 2).reshape(*lead, b, s // u, u * h_local, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _seq_to_heads(grad, ctx.group), None


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable ``(..., B, S/u, H, D) -> (..., B, S, H/u, D)`` over the Ulysses group."""
    return _SeqToHeads.apply(x, group)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable ``(..., B, S, H/u, D) -> (..., B, S/u, H, D)`` over the Ulysses group."""
    return _HeadsToSeq.apply(x, group)
