"""Random streams for context parallelism: equal inside a CP group, distinct across dp replicas.

The ranks of a CP group process one sequence together, so whatever user code draws for it (noise,
timesteps, dropout masks of replicated layers) must be identical on all of them, while data-parallel
replicas must draw independently. Both adapters seed this way once the mesh exists.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from cp_plugin.mesh import ParallelMesh


def shared_base_seed(device: torch.device) -> int:
    """The run's seed (``PL_GLOBAL_SEED`` when set by ``seed_everything``), else one drawn on rank 0."""
    if "PL_GLOBAL_SEED" in os.environ:
        return int(os.environ["PL_GLOBAL_SEED"])
    seed = torch.randint(0, 2**31 - 1, (1,), device=device)
    dist.broadcast(seed, src=0)
    return int(seed.item())


def seed_per_dp_rank(mesh: ParallelMesh, base_seed: int) -> int:
    """Seed torch, numpy and random with ``base_seed + dp_rank``; return that seed."""
    seed = mesh.seed(base_seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return seed
