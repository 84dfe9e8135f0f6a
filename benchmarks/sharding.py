"""Bytes of parameters, gradients and optimizer state per rank: replicated (DDP) vs FSDP2 over every rank.

    python -m benchmarks.sharding                                 # launches torchrun with 4 processes
    torchrun --nproc-per-node 4 -m benchmarks.sharding            # the same, on your own launcher

The wide Flux of ``benchmarks.worker`` under dp x ring (ring 2), one AdamW step on the same tokens,
then every rank counts the storages its parameters, gradients and optimizer state hold (each
storage once, padding included, so FSDP2's rounding of shards shows). Rank 0 writes
``benchmarks/results/sharding.md``. Sharding is expected to hold about 1/world of the replicated bytes.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from benchmarks.launch import driver_parser, run_or_relaunch
from benchmarks.measure import storages
from benchmarks.provenance import describe
from benchmarks.worker import WIDE_FLUX, flux_inputs
from cp_plugin import ParallelConfig, ParallelMesh
from cp_plugin.fsdp import shard_module
from cp_plugin.model import apply_context_parallel
from fixtures.models import tiny_flux

KINDS = ("parameters", "gradients", "optimizer state")


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a DTensor counts its local shard)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        for storage in storages(tensor.to_local() if isinstance(tensor, DTensor) else tensor):
            seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def measure(fsdp: bool, ring: int, seq: int) -> dict[str, int]:
    """One AdamW step of the wide Flux, replicated under DDP or sharded; this rank's bytes by kind."""
    mesh = ParallelMesh.build(ParallelConfig(ring_degree=ring), "cpu")
    model = tiny_flux(**WIDE_FLUX)
    apply_context_parallel(model, mesh)
    if fsdp:
        shard_module(model, mesh.shard_mesh)
        wrapped = model
    else:
        wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = flux_inputs(seq)
    target = inputs.pop("target")
    F.mse_loss(wrapped(**inputs, return_dict=False)[0], target).backward()
    optimizer.step()
    params = list(model.parameters())
    return {
        "parameters": held_bytes(params),
        "gradients": held_bytes(p.grad for p in params if p.grad is not None),
        "optimizer state": held_bytes(
            v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
        ),
    }


def report(rows: list[dict[str, Any]], world: int, ring: int, seq: int, command: str) -> str:
    mib = 2**20
    lines = [
        "# Sharding: parameters, gradients and AdamW state per rank, DDP vs FSDP2",
        "",
        (
            f"{describe(command)} Wide Flux of benchmarks/worker.py ({sum(rows[0]['ddp'].values()) / mib:.1f} MiB "
            f"replicated), {world} ranks as dp {world // ring} x ring {ring}, one AdamW step on {seq} tokens, fp32. "
            "FSDP2 shards over all ranks (the flattened dp x ring mesh). Bytes are the distinct storages each rank "
            "holds (padding included); DDP's gradient buckets, about one more gradient's worth, are not counted."
        ),
        "",
        "| rank | " + " | ".join(f"{kind} MiB DDP / FSDP2" for kind in KINDS) + " | total MiB DDP / FSDP2 | ratio | 1/world |",
        "|---|" + "---|" * (len(KINDS) + 3),
    ]
    for rank, row in enumerate(rows):
        ddp, fsdp = row["ddp"], row["fsdp"]
        cells = " | ".join(f"{ddp[k] / mib:.2f} / {fsdp[k] / mib:.2f}" for k in KINDS)
        total_ddp, total_fsdp = sum(ddp.values()), sum(fsdp.values())
        lines.append(f"| {rank} | {cells} | {total_ddp / mib:.2f} / {total_fsdp / mib:.2f} | "
                     f"{total_fsdp / total_ddp:.3f} | {1 / world:.3f} |")
    return "\n".join(lines) + "\n"


def run_rank(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    row = {"ddp": measure(False, args.ring, args.seq), "fsdp": measure(True, args.ring, args.seq)}
    rows: list[Any] = [None] * world
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        text = report(rows, world, args.ring, args.seq, args.command or f"torchrun --nproc-per-node {world} -m benchmarks.sharding")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        worst = max(sum(r["fsdp"].values()) / sum(r["ddp"].values()) for r in rows)
        print(text + f"\nworst rank: FSDP2 holds {worst:.3f} of the replicated bytes (1/world = {1 / world:.3f})")
    dist.destroy_process_group()


def main() -> None:
    parser = driver_parser(__doc__.splitlines()[0], world=4)
    parser.add_argument("--ring", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sharding.md"))
    run_or_relaunch("benchmarks.sharding", parser.parse_args(), run_rank)


if __name__ == "__main__":
    main()
