"""Split and gather sequence tensors over the context-parallel group, with exact adjoints.

Exactness rests on one rule: every collective's backward is its true adjoint. Taking a shard of a
tensor every CP rank holds is a slice (backward: the gradient in place, zeros elsewhere); gathering
shards is an all-gather whose adjoint is a *reduce-scatter* (sum of every rank's gradient for that
shard), not "keep my own slice" as diffusers' inference gather does. With exact adjoints each rank's
gradient is its share of the gradient of the mean of the per-rank losses, so a plain average over
all ranks (DDP) is right whether the loss is taken on gathered outputs, on local tokens, or mixes
both, and parameters used after the gather (loss heads) are right too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from cp_plugin.comm import all_gather, reduce_scatter
from cp_plugin.mesh import ParallelMesh


def local_shard(tensor: torch.Tensor, dim: int, mesh: ParallelMesh, *, name: str = "tensor") -> torch.Tensor:
    """This rank's contiguous ``1/cp`` slice of ``tensor`` along ``dim`` (a view)."""
    length = tensor.size(dim)
    if length % mesh.cp_size:
        raise ValueError(
            f"sequence length {length} of {name} (dim {dim}, shape {tuple(tensor.shape)}) is not divisible by the "
            f"context-parallel size {mesh.cp_size} (ring_degree x ulysses_degree); use a length that is a multiple "
            f"of {mesh.cp_size} (e.g. {length + mesh.cp_size - length % mesh.cp_size}), or let the model split it "
            "(no shard_batch): its split hooks pad uneven image/video sequences and mask the padding"
        )
    return tensor.chunk(mesh.cp_size, dim)[mesh.cp_rank]


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim``; the backward reduce-scatters the gradient, issuing (and counting) it itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.dim, ctx.group = dim, group
        # Collectives split dim 0: move the sequence dim there and back.
        return all_gather(x.movedim(dim, 0), group, "all_gather").movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return reduce_scatter(grad.movedim(ctx.dim, 0), ctx.group, "all_gather_backward").movedim(0, ctx.dim), None, None


def gather_sequence(tensor: torch.Tensor, dim: int, mesh: ParallelMesh) -> torch.Tensor:
    """Concatenate every CP rank's shard along ``dim``; the backward reduce-scatters (sums) gradients."""
    return _GatherSequence.apply(tensor, dim % tensor.dim(), mesh.cp_group)


def shard_batch(batch: Any, dims: Mapping[str, int], mesh: ParallelMesh) -> Any:
    """Shard the named entries of a dict batch along their sequence dims; other entries pass through."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"shard_batch={dict(dims)} needs batches that are dicts of tensors, got {type(batch).__name__}; "
            "return a dict from your dataset/collate_fn or drop shard_batch"
        )
    missing = [key for key in dims if key not in batch]
    if missing:
        raise KeyError(f"shard_batch names {missing}, which are not in the batch (keys: {sorted(batch)})")
    return {key: local_shard(value, dims[key], mesh, name=f"batch['{key}']") if key in dims else value
            for key, value in batch.items()}
