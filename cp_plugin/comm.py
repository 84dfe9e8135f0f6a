"""Bytes each rank sends, counted at cp_plugin's own collective call sites.

Training logs and benchmarks compare communication against theory (e.g. a ring moves
``(ring - 1) / ring`` of the KV per layer). Counting where we issue each collective is exact for
our traffic and costs one integer add; DDP's gradient all-reduce is not ours and is not counted.
Backward traffic is counted when the gradient reaches the collective (a tensor hook).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    """Record ``nbytes`` sent by this rank for a collective of ``kind`` (forward pass)."""
    COMM_STATS.record(kind, nbytes)


def count_backward(output: torch.Tensor, kind: str, fraction: float) -> torch.Tensor:
    """Record ``fraction`` of the gradient's bytes as sent when ``output``'s gradient arrives."""
    if output.requires_grad:
        output.register_hook(lambda grad: COMM_STATS.record(f"{kind}_backward", int(grad.nbytes * fraction)))
    return output
