"""Mesh layout, sampler over dp only, and RNG streams shared inside a CP group (real processes)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from exact import FlowMatchingModule, SyntheticFlowData, quiet_trainer
from launcher import run_distributed
from torch.utils.data import DataLoader

from cp_plugin import ContextParallelStrategy, ParallelConfig, ParallelMesh

LAYOUTS = [(2, 1, 2), (1, 2, 2), (2, 2, 1), (1, 1, 4), (4, 1, 1)]  # (dp, ring, ulysses) on 4 ranks


def describe_meshes() -> list[dict[str, Any]]:
    torch.set_num_threads(1 + dist.get_rank())  # the ranks' kernels need different work to keep them busy
    out = []
    for dp, ring, ulysses in LAYOUTS:
        mesh = ParallelMesh.build(ParallelConfig(ring_degree=ring, ulysses_degree=ulysses, dp_degree=dp), "cpu")
        out.append(
            {
                "ranks": (mesh.dp_rank, mesh.ring_rank, mesh.ulysses_rank, mesh.cp_rank),
                "cp_group": dist.get_process_group_ranks(mesh.cp_group),
                "dp_group": dist.get_process_group_ranks(mesh.dp_group),
                "sampler": mesh.sampler_kwargs,
                "seed": mesh.seed(100),
                "lanes": mesh.kernel_lanes,
            }
        )
    return out


@pytest.mark.timeout(120)
def test_cp_groups_are_neighbouring_ranks_with_ulysses_innermost() -> None:
    results = run_distributed(describe_meshes, 4)
    for i, (dp, ring, ulysses) in enumerate(LAYOUTS):
        cp = ring * ulysses
        for rank, per_rank in enumerate(results):
            got = per_rank[i]
            expected_ranks = (rank // cp, (rank % cp) // ulysses, rank % ulysses, rank % cp)
            assert got["ranks"] == expected_ranks, (dp, ring, ulysses, rank)
            assert got["cp_group"] == list(range(rank - rank % cp, rank - rank % cp + cp))
            assert got["dp_group"] == list(range(rank % cp, 4, cp))
            assert got["sampler"] == {"num_replicas": dp, "rank": rank // cp}
            assert got["seed"] == 100 + rank // cp
            assert got["lanes"] == 1  # the least of every rank's, so that every ring rank groups its heads alike


class RecordingModule(FlowMatchingModule):
    """Records what each rank sees and draws inside ``training_step``, as user code would."""

    def __init__(self) -> None:
        super().__init__("flux")
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append({"t": batch["t"].clone(), "noise": torch.randn(3), "timestep": torch.rand(2)})
        return super().training_step(batch, batch_idx)


def record_samples_and_randomness(seed: int | None) -> list[dict[str, torch.Tensor]]:
    if seed is not None:
        L.seed_everything(seed, verbose=False)
    module = RecordingModule()
    trainer = quiet_trainer(ContextParallelStrategy(ulysses_degree=2), 2, 4)
    trainer.fit(module, DataLoader(SyntheticFlowData("flux"), batch_size=2, shuffle=True))
    return module.seen


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", [None, 7])
def test_cp_group_shares_samples_and_random_numbers_dp_ranks_differ(seed: int | None) -> None:
    seen = run_distributed(record_samples_and_randomness, 4, seed, init_process_group=False)
    for step in range(2):
        for key in ("t", "noise", "timestep"):
            group0 = [seen[r][step][key] for r in (0, 1)]
            group1 = [seen[r][step][key] for r in (2, 3)]
            assert group0[0].equal(group0[1]) and group1[0].equal(group1[1]), f"{key} differs inside a CP group"
            assert not group0[0].equal(group1[0]), f"{key} is the same on both dp ranks"


def test_strategy_is_registered_with_lightning() -> None:
    for name, start_method in (("context_parallel", "popen"), ("context_parallel_spawn", "spawn")):
        trainer = L.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
        assert isinstance(trainer.strategy, ContextParallelStrategy)
        assert trainer.strategy._start_method == start_method
    strategy = ContextParallelStrategy(ParallelConfig(ring_degree=2), ulysses_degree=2, rotate_method="allgather")
    assert (strategy.parallel_config.ring_degree, strategy.parallel_config.ulysses_degree) == (2, 2)
    assert strategy.parallel_config.rotate_method == "allgather"
