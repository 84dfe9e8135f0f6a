"""One node of a simulated two-node run (for tests/test_multinode.py): train each layout, save what rank 0 saw.

    torchrun --nnodes 2 --node-rank {0,1} --nproc-per-node 2 --master-addr 127.0.0.1 --master-port P \\
        two_nodes.py --out FILE --cases JSON

Each case is ``[optimizer, layout]``; every rank fits ``FlowMatchingModule`` under
``ContextParallelStrategy(**layout)`` with ``Trainer(num_nodes=2, devices=2)``, and rank 0 writes the
losses, weights before and after (FSDP2 shards gathered), how FSDP2 placed a weight, and the ranks of
every rank's Ulysses group.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

sys.path[:0] = [str(Path(__file__).resolve().parents[i]) for i in (1, 2)]  # tests/ (exact.py), the checkout (fixtures/)

from exact import FlowMatchingModule, SyntheticFlowData, quiet_trainer  # noqa: E402

from cp_plugin import ContextParallelStrategy  # noqa: E402

STEPS, PER_RANK = 3, 2


def fit(optimizer: str, layout: dict) -> dict:
    module = FlowMatchingModule("flux", optimizer)
    before = {k: v.clone() for k, v in module.transformer.state_dict().items()}
    strategy = ContextParallelStrategy(**layout)
    trainer = quiet_trainer(strategy, STEPS, 2, num_nodes=2)
    trainer.fit(module, DataLoader(SyntheticFlowData("flux"), batch_size=PER_RANK, shuffle=True))
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.transformer.state_dict().items()}
    groups: list = [None] * dist.get_world_size()
    dist.all_gather_object(groups, dist.get_process_group_ranks(strategy.parallel_mesh.ulysses_group))
    weight = next(module.transformer.parameters())
    placements = [type(p).__name__ for p in weight.placements] if isinstance(weight, DTensor) else []
    return {"losses": module.step_losses, "placements": placements, "before": before, "state": state, "dp_size": strategy.dp_size,
            "ulysses_groups": groups}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=json.loads, required=True)
    args = parser.parse_args()
    results = [fit(optimizer, layout) for optimizer, layout in args.cases]
    if dist.get_rank() == 0:
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
