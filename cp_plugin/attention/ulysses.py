"""Ulysses: trade a sequence shard for a head shard with one all-to-all, and back.

Before attention each rank holds ``S/u`` tokens of all ``H`` heads; after the exchange it holds
all ``S`` tokens of ``H/u`` heads, so attention over those heads is purely local. Query, key and
value travel stacked in one all-to-all (one latency instead of three). torch's differentiable
all-to-all supplies the backward (the opposite exchange), so no autograd code lives here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from cp_plugin.comm import count_backward, count_sent


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-to-all of equal chunks along dim 0 (chunk ``j`` goes to rank ``j``)."""
    kept = 1 / dist.get_world_size(group)  # the chunk addressed to ourselves never leaves
    count_sent("all_to_all", int(x.nbytes * (1 - kept)))
    out = funcol.wait_tensor(funcol.all_to_all_single_autograd(x, None, None, group))
    return count_backward(out, "all_to_all", 1 - kept)


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(..., B, S/u, H, D)`` -> ``(..., B, S, H/u, D)``; leading dims (e.g. stacked q/k/v) ride along."""
    u = dist.get_world_size(group)
    *lead, b, s_local, h, d = x.shape
    n = len(lead)
    # (..., B, S/u, u, H/u, D) -> (u, ..., B, S/u, H/u, D): chunk j goes to rank j (its head group).
    x = _all_to_all(x.reshape(*lead, b, s_local, u, h // u, d).movedim(n + 2, 0).contiguous(), group)
    # chunk j now holds rank j's tokens: put them in sequence order.
    return x.movedim(0, n + 1).reshape(*lead, b, u * s_local, h // u, d)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(..., B, S, H/u, D)`` -> ``(..., B, S/u, H, D)``: the inverse of :func:`seq_to_heads`."""
    u = dist.get_world_size(group)
    *lead, b, s, h_local, d = x.shape
    n = len(lead)
    # (..., B, u, S/u, H/u, D) -> (u, ..., B, S/u, H/u, D): sequence chunk j goes back to rank j.
    x = _all_to_all(x.reshape(*lead, b, u, s // u, h_local, d).movedim(n + 1, 0).contiguous(), group)
    # chunk j now holds head group j of our tokens: put heads in order.
    return x.movedim(0, n + 2).reshape(*lead, b, s // u, u * h_local, d)


def gather_key_mask(key_mask: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(B, S/u)`` -> ``(B, S)`` boolean key mask in the token order :func:`seq_to_heads` produces."""
    u = dist.get_world_size(group)
    gathered = key_mask.new_empty(u * key_mask.shape[0], *key_mask.shape[1:])
    dist.all_gather_into_tensor(gathered, key_mask.contiguous(), group=group)
    count_sent("mask_all_gather", key_mask.nbytes * (u - 1))
    return gathered.view(u, *key_mask.shape).movedim(0, 1).flatten(1, 2)
