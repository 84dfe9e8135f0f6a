"""Ulysses: trade a sequence shard for a head shard with one all-to-all, and back.

Before attention each rank holds ``S/u`` tokens of all ``H`` heads; after the exchange it holds
all ``S`` tokens of ``H/u`` heads, so attention over those heads is purely local. Query, key and
value travel stacked in one all-to-all (one latency instead of three). The all-to-all is its own
autograd function: its adjoint is the same exchange of the gradient, which the backward issues
itself through :func:`cp_plugin.comm.all_to_all`, so the bytes counted are those of the gradient
actually handed over.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_plugin.comm import all_gather, all_to_all


class _AllToAll(torch.autograd.Function):
    """Equal chunks along dim 0, chunk ``j`` to rank ``j``; the backward sends each gradient chunk back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return all_to_all(x, group, "all_to_all")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        # Chunk j of the output came from rank j, so sending chunk j back to rank j is the adjoint.
        return all_to_all(grad, ctx.group, "all_to_all_backward"), None


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(..., B, S/u, H, D)`` -> ``(..., B, S, H/u, D)``; leading dims (e.g. stacked q/k/v) ride along."""
    u = dist.get_world_size(group)
    *lead, b, s_local, h, d = x.shape
    n = len(lead)
    # (..., B, S/u, u, H/u, D) -> (u, ..., B, S/u, H/u, D): chunk j goes to rank j (its head group).
    x = _AllToAll.apply(x.reshape(*lead, b, s_local, u, h // u, d).movedim(n + 2, 0), group)
    # chunk j now holds rank j's tokens: put them in sequence order.
    return x.movedim(0, n + 1).reshape(*lead, b, u * s_local, h // u, d)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(..., B, S, H/u, D)`` -> ``(..., B, S/u, H, D)``: the inverse of :func:`seq_to_heads`."""
    u = dist.get_world_size(group)
    *lead, b, s, h_local, d = x.shape
    n = len(lead)
    # (..., B, u, S/u, H/u, D) -> (u, ..., B, S/u, H/u, D): sequence chunk j goes back to rank j.
    x = _AllToAll.apply(x.reshape(*lead, b, u, s // u, h_local, d).movedim(n + 1, 0), group)
    # chunk j now holds head group j of our tokens: put heads in order.
    return x.movedim(0, n + 2).reshape(*lead, b, s // u, u * h_local, d)


def gather_key_mask(key_mask: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(B, S/u)`` -> ``(B, S)`` boolean key mask in the token order :func:`seq_to_heads` produces."""
    u = dist.get_world_size(group)
    gathered = all_gather(key_mask, group, "mask_all_gather")
    return gathered.view(u, *key_mask.shape).movedim(0, 1).flatten(1, 2)
