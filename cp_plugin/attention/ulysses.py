"""Ulysses: trade a sequence shard for a head shard with an all-to-all, and back.

Before attention each rank holds ``S/u`` tokens of all ``H`` heads; after the exchange it holds
all ``S`` tokens of ``H/u`` heads, so attention over those heads is purely local. Query, key and
value travel one after the other, each in its own all-to-all: one at a time, a send and a receive
buffer of one tensor are alive beside the results, where one exchange of all three would hold
stacked send and receive buffers of all three (six tensors' worth) at the moment a checkpointed
block's recompute peaks, in the backward beside the attention's gradients. At batch 1 the exchange
to head shards receives straight into its result, in sequence order. The exchange is its own
autograd function: its adjoint is the inverse exchange of the gradients, which the backward issues
itself through :func:`cp_plugin.comm.all_to_all`, so the bytes counted are those of the gradients
actually handed over.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cp_plugin.comm import all_gather, all_to_all


def _heads_out(x: torch.Tensor, u: int) -> torch.Tensor:
    """``(B, S/u, H, D)`` -> ``(u, B, S/u, H/u, D)`` (a view): head group ``j`` first, for rank ``j``."""
    b, s, h, d = x.shape
    return x.reshape(b, s, u, h // u, d).movedim(2, 0)


def _tokens_in(y: torch.Tensor) -> torch.Tensor:
    """``(u, B, S/u, H/u, D)``, chunk ``j`` rank ``j``'s tokens -> ``(B, S, H/u, D)`` in sequence order."""
    u, b, s, h, d = y.shape
    return y.movedim(0, 1).reshape(b, u * s, h, d)


def _tokens_out(x: torch.Tensor, u: int) -> torch.Tensor:
    """``(B, S, H/u, D)`` -> ``(u, B, S/u, H/u, D)`` (a view): sequence chunk ``j`` first, back to rank ``j``."""
    b, s, h, d = x.shape
    return x.reshape(b, u, s // u, h, d).movedim(1, 0)


def _heads_in(y: torch.Tensor) -> torch.Tensor:
    """``(u, B, S/u, H/u, D)``, chunk ``j`` head group ``j`` -> ``(B, S/u, H, D)`` with heads in order."""
    u, b, s, h, d = y.shape
    return y.movedim(0, 2).reshape(b, s, u * h, d)


def _exchange(xs: tuple[torch.Tensor, ...], to_heads: bool, group: dist.ProcessGroup, kind: str
              ) -> tuple[torch.Tensor, ...]:
    """An all-to-all of each tensor of ``xs`` in turn, sequence shards to head shards (``to_heads``) or back."""
    u = dist.get_world_size(group)
    split, join = (_heads_out, _tokens_in) if to_heads else (_tokens_out, _heads_in)
    out = []
    for x in xs:
        if to_heads and x.shape[0] == 1:  # batch 1: the exchange delivers the tokens in order, straight into place
            b, s, h, d = x.shape
            result = x.new_empty(b, u * s, h // u, d)
            all_to_all(split(x, u), group, kind, out=_tokens_out(result, u))
        else:
            result = join(all_to_all(split(x, u), group, kind))
            # an autograd function's output that is a view of its own buffer cannot be modified in place by the code
            # that called attention
            result = result if result._base is None else result.clone()
        out.append(result)
    return tuple(out)


class _AllToAll(torch.autograd.Function):
    """Sequence shards to head shards (or back) for several tensors at once; the backward sends each gradient
    back the other way, its adjoint."""

    @staticmethod
    def forward(ctx, group: dist.ProcessGroup, to_heads: bool, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.group, ctx.to_heads = group, to_heads
        return _exchange(xs, to_heads, group, "all_to_all")

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        # Chunk j of an output came from rank j, so sending chunk j of its gradient back to rank j is the adjoint.
        return None, None, *_exchange(grads, not ctx.to_heads, ctx.group, "all_to_all_backward")


def seq_to_heads(group: dist.ProcessGroup, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each ``(B, S/u, H, D)`` -> ``(B, S, H/u, D)``, one all-to-all after another."""
    return _AllToAll.apply(group, True, *xs)


def heads_to_seq(group: dist.ProcessGroup, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each ``(B, S, H/u, D)`` -> ``(B, S/u, H, D)``: the inverse of :func:`seq_to_heads`."""
    return _AllToAll.apply(group, False, *xs)


def gather_key_mask(key_mask: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``(B, S/u)`` -> ``(B, S)`` boolean key mask in the token order :func:`seq_to_heads` produces."""
    u = dist.get_world_size(group)
    gathered = all_gather(key_mask, group, "mask_all_gather")
    return gathered.view(u, *key_mask.shape).movedim(0, 1).flatten(1, 2)
