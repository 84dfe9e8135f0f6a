"""What keeping the attention outputs through a recompute buys: ``checkpoint_policy`` "full" vs "save_attention".

    python -m benchmarks.checkpoint_policy          # writes benchmarks/results/checkpoint_policy.{md,jsonl}
    python -m benchmarks.checkpoint_policy --seq 4096 --blocks 4

One invocation runs ``benchmarks.worker`` on the same wide Flux of ``--blocks`` double- and
single-stream blocks, the same inputs and loss, for one process and for cp_plugin's Ulysses and ring
on 2 processes (the ``sharded`` path), each with whole-block recompute (``+ckpt``) and with the
``save_attention`` policy (``+sac``), and reports per layout and length the step time (median of
repeats, slowest rank), the step's peak and saved activations per rank, and the error against the
plain one-process step. The ``save_attention`` rows give their time and peak as ratios to the
``+ckpt`` row beside them: what the policy saves, and what it costs in memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

from benchmarks.provenance import describe
from benchmarks.run import launch, summarize

LAYOUTS = {1: ["single", "single+ckpt", "single+sac"],
           2: [f"{split}/sharded{policy}" for split in ("ulysses", "ring_p2p") for policy in ("+ckpt", "+sac")]}


def table(rows: list[dict[str, Any]], blocks: int, repeats: int, command: str) -> str:
    by_name = {(r["world"], r["layout"], r["seq"]): r for r in rows}
    lines = [
        f"# Checkpoint policies: whole-block recompute vs keeping the attention outputs, {platform.machine()} CPU", "",
        f"{describe(command)} Flux of {blocks}+{blocks} blocks (4 heads x 64), median of "
        f"{repeats} steps, worst rank. Errors are against the plain one-process step (output, gradients). Saved "
        "counts what autograd keeps (the block inputs); the attention outputs the policy keeps show in the step "
        "peak.", "",
        "| processes | layout | tokens | step ms | vs +ckpt | step peak MiB | vs +ckpt | saved MiB | output err "
        "| grad err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["layout"] == "single" or "error" in r:
            continue
        full = by_name.get((r["world"], r["layout"].replace("+sac", "+ckpt"), r["seq"]))
        versus = ("", "") if full is None or "+sac" not in r["layout"] else (
            f"{r['time_s'] / full['time_s']:.2f}x", f"{r['peak_mib'] / full['peak_mib']:.2f}x")
        lines.append(f"| {r['world']} | {r['layout']} | {r['seq']} | {r['time_s'] * 1e3:.0f} | {versus[0]} "
                     f"| {r['peak_mib']:.1f} | {versus[1]} | {r['saved_mib']:.1f} | {r['out_err']:.1e} "
                     f"| {r['grad_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", nargs="+", type=int, default=[4096, 9216])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "checkpoint_policy.jsonl"
    raw.unlink(missing_ok=True)
    for world, layouts in LAYOUTS.items():
        launch(world, layouts, args.seq, args.repeats, 0.0, raw, args.blocks)
    rows = summarize([json.loads(line) for line in raw.read_text().splitlines()])
    command = "python -m benchmarks.checkpoint_policy " + " ".join(argv if argv is not None else sys.argv[1:])
    report = args.out / "checkpoint_policy.md"
    report.write_text(table(rows, args.blocks, args.repeats, command.strip()))
    print(report.read_text())
    return report


if __name__ == "__main__":
    main()
