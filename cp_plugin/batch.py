"""Checks every adapter runs on a batch: the ranks of a CP group must hold the very same batch.

If they do not (a sampler over all ranks, augmentation seeded by global rank, ragged lengths),
context parallelism would silently stitch different samples into one sequence. A four-number
fingerprint all-gathered over the CP group catches it for the price of one tiny collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection

from cp_plugin.mesh import ParallelMesh


def fingerprint(batch: Any, device: torch.device) -> torch.Tensor:
    """Tensor count, a shape signature, sum and absolute sum of every tensor in ``batch`` (float64)."""
    tensors: list[torch.Tensor] = []
    apply_to_collection(batch, torch.Tensor, tensors.append)
    return torch.tensor(
        [
            len(tensors),
            sum(sum((i + 1) * s for i, s in enumerate(t.shape)) for t in tensors),
            sum(float(t.double().sum()) for t in tensors),
            sum(float(t.double().abs().sum()) for t in tensors),
        ],
        dtype=torch.float64,
        device=device,
    )


def check_same_batch(batch: Any, mesh: ParallelMesh, device: torch.device) -> None:
    """Raise on every rank of a CP group whose ranks were fed different batches."""
    mine = fingerprint(batch, device)
    everyone = torch.empty(mesh.cp_size * mine.numel(), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(everyone, mine, group=mesh.cp_group)
    everyone = everyone.view(mesh.cp_size, -1)
    if not torch.allclose(everyone, everyone[:1].expand_as(everyone), rtol=1e-9, atol=0.0):
        shapes: list[tuple[int, ...]] = []
        apply_to_collection(batch, torch.Tensor, lambda t: shapes.append(tuple(t.shape)))
        raise ValueError(
            f"the ranks of context-parallel group {dist.get_process_group_ranks(mesh.cp_group)} received different "
            f"batches (this rank {dist.get_rank()}: shapes {shapes}); every rank of a CP group must read the same "
            "samples: shard data over dp ranks only (the strategy/plugin's sampler does) and do not seed data "
            "augmentation by global rank"
        )
