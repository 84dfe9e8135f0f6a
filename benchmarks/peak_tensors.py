"""What holds a training step's peak memory, tensor by tensor, on the worst rank.

    python -m benchmarks.peak_tensors     # writes benchmarks/results/peak_tensors.md
    python -m benchmarks.peak_tensors --world 2 --layout ring_p2p/sharded+ckpt+tile --seq 7744 --out /tmp/peak

``benchmarks.longest`` finds the longest sequence within a step-peak budget and splits each peak by
kind (held from the forward, attention, communication, backward). This names the tensors: one
training step of the same wide Flux, inputs and layouts (``benchmarks.worker``), measured by
``benchmarks.measure.PeakMemory`` with labels, and the tensors live at the high-water mark of the
rank with the highest peak, grouped by when (kind), the op that allocated them and their shape. The
default is the first length beyond the 128 MiB budget for cp_plugin's Ulysses with checkpointing and
tiling at 2 ranks: what a longer sequence has to make room in.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.launch import driver_parser, run_or_relaunch
from benchmarks.measure import PeakMemory
from benchmarks.provenance import describe
from benchmarks.worker import WIDE_FLUX, build, inputs_for, layout_named, layouts_for, step_fn, tag_phases

MIB = 2**20


def measure(name: str, seq: int, blocks: int) -> tuple[int, int, dict[str, int]]:
    """(rank, peak bytes, live bytes at the peak by label) of the rank whose step peaks highest."""
    layout = layout_named(layouts_for(dist.get_world_size()), name, blocks)
    model, mesh = build(layout)
    tag_phases()
    step = step_fn(model, inputs_for(layout, seq, mesh))
    with PeakMemory(labelled=True) as peak:
        step()
    ranks: list[tuple[int, int, dict[str, int]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (dist.get_rank(), peak.peak, peak.labels_at_peak))
    return max(ranks, key=lambda r: r[1])  # type: ignore[arg-type, return-value]


def report(args: argparse.Namespace, rank: int, peak: int, labels: dict[str, int]) -> str:
    """The report: every label holding at least ``--min-mib`` at the peak, largest first, and the rest summed."""
    shown = sorted(((n, label) for label, n in labels.items() if n >= args.min_mib * MIB), reverse=True)
    rest = peak - sum(n for n, _ in shown)
    lines = [
        "# What holds the step's peak memory, tensor by tensor",
        "",
        f"{describe(args.command or 'python -m benchmarks.peak_tensors')} gloo; Flux of "
        f"{WIDE_FLUX['num_attention_heads']} heads x {WIDE_FLUX['attention_head_dim']}, {args.blocks} double-stream + "
        f"{args.blocks} single-stream blocks, batch 1, fp32; layout `{args.layout}` on {dist.get_world_size()} "
        f"ranks at {args.seq} image tokens. Rank {rank} peaked highest: {peak / MIB:.1f} MiB "
        "(benchmarks.measure.PeakMemory). Live at that moment, by when they were allocated (forward: held from "
        "the forward; backward: recompute and gradients; attention and communication: cp_plugin's), the op "
        "that allocated them and their shape:",
        "",
        "| MiB | share of the peak | allocated in: op (shape) |",
        "|---|---|---|",
        *(f"| {n / MIB:.2f} | {n / peak:.1%} | {label} |" for n, label in shown),
        f"| {rest / MIB:.2f} | {rest / peak:.1%} | everything smaller than {args.min_mib} MiB |",
        "",
    ]
    return "\n".join(lines)


def run_rank(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    rank, peak, labels = measure(args.layout, args.seq, args.blocks)
    if dist.get_rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        text = report(args, rank, peak, labels)
        (args.out / "peak_tensors.md").write_text(text)
        print(text, flush=True)
    dist.barrier()  # every rank leaves the group together: one leaving while rank 0 writes could abort at exit
    dist.destroy_process_group()


def main() -> None:
    parser = driver_parser(__doc__.splitlines()[0], world=2)
    parser.add_argument("--layout", default="ulysses/sharded+ckpt+tile", help="a benchmarks.worker layout name")
    parser.add_argument("--seq", type=int, default=15376, help="image tokens (a square number: side x side)")
    parser.add_argument("--blocks", type=int, default=2, help="double-stream and single-stream blocks each")
    parser.add_argument("--min-mib", type=float, default=1.0, help="smaller groups are summed in one row")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    run_or_relaunch("benchmarks.peak_tensors", parser.parse_args(), run_rank)


if __name__ == "__main__":
    main()
