"""Two nodes simulated on one host: two ``torchrun --nnodes 2`` launches of 2 processes, joined over 127.0.0.1.

Lightning's ``Trainer(num_nodes=2, devices=2)`` under ``ContextParallelStrategy`` trains exactly as
one process under ring 2 x ulysses 2 and dp 2 x ulysses 2, with every Ulysses group (the all-to-all,
which moves the most bytes) inside one node, and with HSDP (``fsdp=True, hsdp=True``: FSDP2 shards
inside each node and replicates across the two).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from exact import assert_update_close, reference_run
from launcher import free_port

SCRIPT = Path(__file__).resolve().parent / "scripts" / "two_nodes.py"
STEPS, PER_RANK = 3, 2
CASES = [
    ("sgd", {"ring_degree": 2, "ulysses_degree": 2}),
    ("adamw", {"ulysses_degree": 2}),
    ("sgd", {"ulysses_degree": 2, "fsdp": True, "hsdp": True}),
]


def launch_two_nodes(out: Path) -> None:
    port = free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2",
             "--master-addr=127.0.0.1", f"--master-port={port}", str(SCRIPT), "--out", str(out),
             "--cases", json.dumps(CASES)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    logs = [node.communicate(timeout=500)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-3000:] for log in logs)


@pytest.mark.timeout(600)
def test_two_simulated_nodes_train_exactly_with_ulysses_inside_a_node_and_hsdp(tmp_path: Path) -> None:
    launch_two_nodes(tmp_path / "results.pt")
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    for (optimizer, layout), result in zip(CASES, results):
        what = f"{optimizer} {layout}"
        for rank, group in enumerate(result["ulysses_groups"]):
            assert {r // 2 for r in group} == {rank // 2}, f"{what}: rank {rank}'s Ulysses group {group} spans nodes"
        if layout.get("hsdp"):  # replicated across the 2 nodes, sharded inside each
            assert result["placements"] == ["Replicate", "Shard"], result["placements"]
        reference = reference_run("flux", optimizer, result["dp_size"], PER_RANK, STEPS)
        dp = result["dp_size"]
        # rank 0's losses are those of dp replica 0: the first PER_RANK samples of each global batch
        assert len(result["losses"]) == STEPS
        if dp == 1:
            assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5), f"{what}: losses"
        for name, before in result["before"].items():  # AdamW's first steps are ~lr * sign(grad): compare norms
            assert_update_close(result["state"][name], reference["state"][name], before, 1e-5, STEPS, f"{what}: {name}",
                                norm=optimizer == "adamw")
