"""Products and sums over split tokens (linear attention), made whole by a sum over the CP group.

Linear attention (Sana's ReLU attention) never forms scores: it sums ``value^T key`` over every
token into a small ``(head_dim + 1, head_dim)`` state per head (and Sana-Video the keys, for its
normaliser), then multiplies each query by it.
Under a split each rank's product sums only its own tokens; the sum over ranks (an all-reduce,
whose adjoint is an all-reduce of the gradients) is the one-process state, and the queries then
stay local. The probe finds such products structurally (the contracted dimension is a split token
sequence, ``probe.py``); this rank's padding tokens are zeroed out of the sum first. Softmax
attention computed by hand (softmax over split keys) cannot be summed so and is refused by the probe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from cp_plugin.blockops import SUMS, CountingMode, OpCounter, foreign
from cp_plugin.comm import all_reduce

if TYPE_CHECKING:
    from cp_plugin.mesh import ParallelMesh
    from cp_plugin.padding import SequencePadding


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum); every rank's result feeds its own loss, so the gradient is summed over ranks too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return all_reduce(x, group, "token_sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return all_reduce(grad, ctx.group, "token_sum_backward"), None


class TokenReductions(CountingMode):
    """Inside one block forward: the products and sums its probe found adding over split tokens, summed over ranks."""

    def __init__(self, sums: tuple[tuple[int, int], ...], padding: SequencePadding, mesh: ParallelMesh) -> None:
        super().__init__()
        self.sums, self.counter, self.padding, self.mesh = dict(sums), OpCounter(SUMS), padding, mesh

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        dim = self.sums.get(self.counter.index(func))
        if dim is None:
            return func(*args, **kwargs)
        x, *rest = args
        with foreign():
            valid = self.padding.key_mask(x.shape[dim], 1, x.device)  # (1, tokens): this rank's real ones
            if valid is not None:
                shape = [1] * x.dim()
                shape[dim] = x.shape[dim]
                x = x * valid.reshape(shape).to(x.dtype)
            return _SumOverRanks.apply(func(x, *rest, **kwargs), self.mesh.cp_group)
