"""cp_plugin's collectives, each counting the bytes of the tensor it hands over.

Training logs and benchmarks compare communication against theory (e.g. a ring moves
``(ring - 1) / ring`` of the KV per layer). So that the comparison can fail, the count is not a
formula: every collective cp_plugin issues goes through a function here (or through
``RingComm``, which counts each send), and what is recorded is the part of the very tensor handed
to the collective that is addressed to other ranks. Backward passes issue their collectives
through the same functions, so they are counted the same way. DDP's gradient all-reduce is not
ours and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cp_plugin.compat import all_gather_single, reduce_scatter_single


@dataclass
class CommStats:
    """Running totals for this process; ``reset()`` at the start of whatever you measure."""

    bytes_sent: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def record(self, kind: str, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes

    def reset(self) -> None:
        self.bytes_sent = 0
        self.by_kind.clear()


COMM_STATS = CommStats()


def count_sent(kind: str, nbytes: int) -> None:
    """Record ``nbytes`` sent by this rank for a collective of ``kind``."""
    COMM_STATS.record(kind, nbytes)


def _to_others(x: torch.Tensor, group: dist.ProcessGroup) -> int:
    """Bytes of ``x`` that leave this rank when dim 0 is split into one equal chunk per rank.

    The chunk addressed to this rank stays (all-to-all, reduce-scatter); every other chunk is sent.
    """
    return x.nbytes - x.chunk(dist.get_world_size(group))[dist.get_rank(group)].nbytes


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, kind: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Equal chunks of ``x`` along dim 0, chunk ``j`` to rank ``j``; chunk ``j`` of the result came from rank ``j``.

    ``out``: a contiguous tensor shaped as ``x`` to receive into (a view of the caller's result), else a new one.
    """
    x = x.contiguous()
    out = torch.empty_like(x) if out is None else out
    dist.all_to_all_single(out, x, group=group)
    count_sent(kind, _to_others(x, group))
    return out


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, kind: str) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, in rank order (gloo wants dim 0); ``x`` goes to each peer."""
    x = x.contiguous()
    size = dist.get_world_size(group)
    out = x.new_empty(size * x.shape[0], *x.shape[1:])
    all_gather_single(out, x, group=group)
    count_sent(kind, x.nbytes * (size - 1))
    return out


def reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup, kind: str) -> torch.Tensor:
    """Sum over ranks of ``x``, split along dim 0: this rank gets the sum of every rank's chunk ``rank``."""
    x = x.contiguous()
    out = x.new_empty(x.shape[0] // dist.get_world_size(group), *x.shape[1:])
    reduce_scatter_single(out, x, group=group)
    count_sent(kind, _to_others(x, group))
    return out


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup, kind: str) -> torch.Tensor:
    """The sum over ranks of ``x`` (a new tensor); counted as a reduce-scatter followed by an all-gather."""
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    count_sent(kind, 2 * _to_others(out.reshape(-1), group))
    return out
