"""Rank 0's peak memory while saving an FSDP2 checkpoint: sharded (DCP, each rank its shards) vs one file.

    python -m benchmarks.checkpoint_memory                        # launches torchrun with 4 processes
    torchrun --nproc-per-node 4 -m benchmarks.checkpoint_memory   # the same, on your own launcher

A wider tiny-architecture Flux (``benchmarks.worker.WIDE_FLUX`` with ``--layers`` double-stream
blocks), sharded with FSDP2 over every rank, takes one AdamW step; then each rank saves it both ways
the Lightning strategy does, in the same run:

- one file (``save_distributed_checkpoint=False``): ``full_model_state`` / ``full_optimizer_state``
  gather the weights and AdamW state onto rank 0, which ``torch.save`` s them;
- sharded (the default under FSDP2): ``cp_plugin.checkpoint.save`` writes each rank's shards with DCP.

Measured on rank 0 around each save: the growth of the process's resident high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` just before the save), which sees gathered
tensors and serialisation buffers alike (``benchmarks.measure.PeakMemory`` cannot follow DTensor
ops), and the bytes of whole (non-DTensor) tensors in the state the save builds. The sharded save
runs first, so it cannot reuse memory the one-file save freed. Rank 0 writes
``benchmarks/results/checkpoint_memory.md``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

from benchmarks.launch import driver_parser, run_or_relaunch
from benchmarks.provenance import describe
from benchmarks.worker import WIDE_FLUX, flux_inputs
from cp_plugin import ParallelConfig, ParallelMesh, checkpoint
from cp_plugin.fsdp import full_model_state, full_optimizer_state, shard_module
from cp_plugin.model import apply_context_parallel
from fixtures.models import tiny_flux

MIB = 2**20


def resident_peak() -> int | None:
    """This process's resident high-water mark in bytes (``VmHWM``), or ``None`` off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_resident_peak() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux ``clear_refs`` 5); whether it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def whole_bytes(state: Any) -> int:
    """Bytes of the whole (non-DTensor) tensors in a state: gathered copies (a DTensor is its rank's shard)."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(state)
               if isinstance(t, torch.Tensor) and not isinstance(t, DTensor))


def measured(save: Callable[[], int]) -> dict[str, Any]:
    """Resident growth, whole-tensor bytes and seconds of one collective ``save`` on this rank."""
    dist.barrier()
    reset = reset_resident_peak()
    before = resident_peak()
    start = time.perf_counter()
    tensors = save()
    seconds = time.perf_counter() - start
    after = resident_peak()
    dist.barrier()
    grown = after - before if reset and before is not None and after is not None else None
    return {"tensors": tensors, "resident": grown, "seconds": seconds}


def run_rank(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = ParallelMesh.build(ParallelConfig(ring_degree=args.ring), "cpu")
    model = tiny_flux(**WIDE_FLUX, num_layers=args.layers)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    apply_context_parallel(model, mesh)
    shard_module(model, mesh.shard_mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = flux_inputs(args.seq)
    target = inputs.pop("target")
    F.mse_loss(model(**inputs, return_dict=False)[0], target).backward()
    optimizer.step()
    optimizer.zero_grad()

    root = Path(dist_broadcast_str(tempfile.mkdtemp(prefix="cp_ckpt_bench_") if rank == 0 else ""))

    def one_file() -> int:  # what ContextParallelStrategy(save_distributed_checkpoint=False) does
        state = {"state_dict": full_model_state(model), "optimizer_states": [full_optimizer_state(model, optimizer)]}
        if rank == 0:
            torch.save(state, root / "one.ckpt")
        return whole_bytes(state)

    def sharded() -> int:  # the default under FSDP2
        state = checkpoint.sharded_states(model, [optimizer])
        checkpoint.save(root / "sharded.ckpt", state, {}, checkpoint.describe_models(model))
        return whole_bytes(state)

    sharded_row = measured(sharded)  # first: it cannot reuse memory the one-file save freed
    rows = {"one file": measured(one_file), "sharded": sharded_row}
    if rank == 0:
        files = {"one file": (root / "one.ckpt").stat().st_size,
                 "sharded": max(f.stat().st_size for f in (root / "sharded.ckpt").glob("*.distcp"))}
        text = report(rows, files, model_bytes, world, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(text)
        shutil.rmtree(root)
    dist.barrier()
    dist.destroy_process_group()


def dist_broadcast_str(value: str) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def report(rows: dict[str, dict[str, Any]], files: dict[str, int], model_bytes: int, world: int,
           args: argparse.Namespace) -> str:
    command = args.command or f"torchrun --nproc-per-node {world} -m benchmarks.checkpoint_memory"
    lines = [
        "# Rank 0's peak memory during an FSDP2 checkpoint save: sharded (DCP) vs one file",
        "",
        (
            f"{describe(command)} gloo; wide Flux of benchmarks/worker.py with {args.layers} double-stream blocks "
            f"({model_bytes / MIB:.1f} MiB of fp32 weights, {3 * model_bytes / MIB:.1f} MiB with AdamW's two moments), "
            f"FSDP2 over {world} ranks (ring {args.ring} x dp {world // args.ring}), saved after one AdamW step, "
            "both ways in the same run (sharded first). *Resident*: growth of rank 0's resident high-water mark "
            "(VmHWM, reset just before the save); *whole tensors*: bytes of non-DTensor tensors in the state rank 0 "
            "builds (gathered copies; the sharded state holds only DTensor shards and AdamW's step counts); "
            "*largest file*: the one file, or the largest rank's shard file."
        ),
        "",
        "| save | rank 0 resident peak growth MiB | rank 0 whole tensors MiB | largest file MiB | seconds |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        resident = "n/a" if row["resident"] is None else f"{row['resident'] / MIB:.1f}"
        lines.append(f"| {name} | {resident} | {row['tensors'] / MIB:.2f} | {files[name] / MIB:.1f} | {row['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = driver_parser(__doc__.splitlines()[0], world=4)
    parser.add_argument("--ring", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8, help="double-stream blocks of the wide Flux")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/checkpoint_memory.md"))
    run_or_relaunch("benchmarks.checkpoint_memory", parser.parse_args(), run_rank)


if __name__ == "__main__":
    main()
