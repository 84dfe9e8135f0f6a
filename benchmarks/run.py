"""Side-by-side CPU benchmark: one process vs every context-parallel layout, in one run.

    python -m benchmarks.run                      # writes benchmarks/results/{cpu.md,raw.jsonl,*.png}

Launches ``benchmarks.worker`` with ``torchrun`` for 1, 2 and 4 processes on the same cores
(one process uses every core; N processes use cores/N threads each) and the same global tokens,
then reports per layout and path (``module``: full inputs, gathered output, the loss on every
rank, as a one-process LightningModule runs and as diffusers' CP always runs; ``sharded``:
pre-sharded inputs, local output and loss), as ratios to the one-process run measured in the same
invocation: step time (median of repeats, with the min-max spread), saved activations per rank
(target <= 1.05/cp), peak bytes allocated during the step per rank, bytes each rank handed to
cp_plugin's collectives vs the layout's theoretical minimum, and the max relative error of outputs
and gradients. Then it searches, with measured steps, the longest sequence whose step peak fits
``--search-mib`` per rank, and extrapolates the 4 GiB figure from the measured peaks (labelled so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.provenance import describe
from benchmarks.worker import TEXT_TOKENS, WIDE_FLUX
from cp_plugin.layout import attention_bytes_sent
from fixtures.models import TINY_FLUX

_BOTH_PATHS = ["ulysses/module", "ulysses/sharded", "ring_p2p/module", "ring_p2p/sharded", "ring_allgather/sharded"]
LAYOUTS_BY_WORLD = {
    1: ["single"],
    2: [*_BOTH_PATHS, "diffusers_ulysses", "diffusers_ring"],
    4: [*_BOTH_PATHS, "ring_x_ulysses/module", "ring_x_ulysses/sharded", "diffusers_ulysses", "diffusers_ring"],
}
BUDGET_GIB = 4.0


def theoretical_bytes(record: dict[str, Any]) -> float | None:
    """Minimum bytes one rank must send per forward+backward step for this layout.

    Per attention layer, ``cp_plugin.layout.attention_bytes_sent`` (the formula ``parallel="auto"``
    estimates with; with X the bytes of one local q/k/v shard, ``8 X (u-1)/u`` for Ulysses and
    ``6 X (r-1)`` for a ring in float32). The ``module`` path also gathers the output (image tokens x
    output channels): every rank sends its shard to ``cp-1`` peers forward, and backward
    reduce-scatters the full gradient, sending ``(cp-1)/cp`` of it: ``2 Y (cp-1)`` with Y the output
    shard's bytes.
    """
    if record["diffusers"] or record["ring"] * record["ulysses"] == 1:  # diffusers' own, or one process
        return None
    u, r = record["ulysses"], record["ring"]
    hidden = WIDE_FLUX["num_attention_heads"] * WIDE_FLUX["attention_head_dim"]
    layers = 2 * record.get("blocks", 1)  # benchmarks.worker's Flux: ``blocks`` double- and single-stream blocks each
    gather = 2 * record["seq"] / (u * r) * WIDE_FLUX["in_channels"] * 4 * (u * r - 1) if record["path"] == "module" else 0
    return layers * attention_bytes_sent(record["seq"] + TEXT_TOKENS, hidden, r, u, element_size=4) + gather


def launch(world: int, layouts: list[str], seqs: list[int], repeats: int, search_mib: float, raw: Path,
           blocks: int = 1, interleave_tiling: bool = False) -> None:
    cmd = ["torchrun", "--standalone", f"--nproc-per-node={world}", "-m", "benchmarks.worker",
           "--layouts", *layouts, "--repeats", str(repeats), "--out", str(raw), "--blocks", str(blocks)]
    if interleave_tiling:
        cmd.append("--interleave-tiling")
    if seqs:
        cmd += ["--seq", *map(str, seqs)]
    if search_mib:
        cmd += ["--search-mib", str(search_mib)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (world, layout, seq): worst rank's figures, as ratios to the one-process run."""
    cases: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        if not rec.get("search"):
            cases[(rec["world"], rec["name"], rec["seq"])].append(rec)
    single = {seq: recs[0] for (world, name, seq), recs in cases.items() if name == "single"}
    rows = []
    for (world, name, seq), recs in sorted(cases.items()):
        base = single[seq]
        row: dict[str, Any] = {"world": world, "layout": name, "seq": seq}
        errors = [r["error"] for r in recs if "error" in r]
        if errors:
            rows.append({**row, "error": errors[0]})
            continue
        cp = recs[0]["ring"] * recs[0]["ulysses"]
        saved = max(r["saved_bytes"] for r in recs)
        peak = max(r["peak_bytes"] for r in recs)
        row.update(
            cp=cp,
            path=recs[0]["path"],
            peak_mib=peak / 2**20,
            peak_ratio=peak / base["peak_bytes"],
            time_ratio=recs[0]["time_median_s"] / base["time_median_s"],
            time_spread=(recs[0]["time_low_s"] / base["time_median_s"], recs[0]["time_high_s"] / base["time_median_s"]),
            time_s=recs[0]["time_median_s"],
            saved_mib=saved / 2**20,
            act_ratio=saved / base["saved_bytes"],
            act_target=1.05 / cp,
            sent_mib=max(r["bytes_sent"] for r in recs) / 2**20,
            out_err=max((r.get("out_rel_err", 0.0) for r in recs), default=0.0),
            grad_err=max((r.get("grad_rel_err", 0.0) for r in recs), default=0.0),
        )
        theory = theoretical_bytes(recs[0])
        row["sent_vs_theory"] = None if theory is None else max(r["bytes_sent"] for r in recs) / theory
        rows.append(row)
    return rows


def extrapolated_tokens(rows: list[dict[str, Any]]) -> dict[tuple[int, str], int]:
    """An extrapolation, not a run: the sequence whose step peak would reach ``BUDGET_GIB`` per rank,
    on the line through the measured peaks of the two longest sequences."""
    fits = {}
    by_layout: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for row in rows:
        if "error" not in row:
            by_layout[(row["world"], row["layout"])].append(row)
    for key, points in by_layout.items():
        if len(points) < 2:
            continue
        (s0, m0), (s1, m1) = [(p["seq"], p["peak_mib"]) for p in sorted(points, key=lambda p: p["seq"])[-2:]]
        slope = (m1 - m0) / (s1 - s0)
        fits[key] = int((BUDGET_GIB * 1024 - (m0 - slope * s0)) / slope)
    return fits


def markdown(rows: list[dict[str, Any]], fits: dict[tuple[int, str], int], searches: list[dict[str, Any]],
             search_mib: float, command: str) -> str:
    lines = [
        "# CPU benchmark: context-parallel layouts vs one process",
        "",
        f"{describe(command)} Model: Flux, {WIDE_FLUX['num_attention_heads']} heads x "
        f"{WIDE_FLUX['attention_head_dim']}, {TINY_FLUX['num_layers']} double + {TINY_FLUX['num_single_layers']} "
        f"single blocks, {TEXT_TOKENS} text tokens, batch 1, fp32; one forward+backward step on the same global "
        "tokens.",
        "Ratios are to the one-process run of the same invocation (same cores: 1 process x all threads vs "
        "N processes x cores/N threads). Path: `module` = full inputs, gathered output, the loss on the full output "
        "on every rank (a one-process LightningModule; diffusers' CP); `sharded` = pre-sharded inputs, local output "
        "and loss. Time: median of repeats [min-max]. Activations: bytes saved for backward, worst rank. Peak: "
        "high-water mark of the bytes the step allocates (benchmarks.measure.PeakMemory), worst rank. Sent: bytes "
        "of the tensors handed to cp_plugin's collectives, vs the theoretical minimum. 4 GiB tokens: an "
        "EXTRAPOLATION (line through the measured peaks of the two longest sequences); the measured search is below.",
        "",
        "| ranks | layout | path | tokens | step time vs 1 proc | activations/rank vs 1 proc (target <=1.05/cp) "
        "| peak/rank MiB (vs 1 proc) | sent/rank MiB | sent vs theory | 4 GiB tokens (extrapolated) "
        "| max rel err out / grad |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        prefix = f"| {row['world']} | {row['layout']} |"
        if "error" in row:
            lines.append(f"{prefix} module | {row['seq']} | fails: {row['error']} | | | | | | |")
            continue
        low, high = row["time_spread"]
        theory = "n/a (not instrumented)" if row["sent_vs_theory"] is None else f"{row['sent_vs_theory']:.3f}"
        sent = "" if row["layout"].startswith("diffusers") else f"{row['sent_mib']:.1f}"
        ok = "ok" if row["act_ratio"] <= row["act_target"] else "OVER"
        lines.append(
            f"{prefix} {row['path']} | {row['seq']} | {row['time_ratio']:.2f}x [{low:.2f}-{high:.2f}] "
            f"| {row['act_ratio']:.3f} ({ok}, target {row['act_target']:.3f}) "
            f"| {row['peak_mib']:.1f} ({row['peak_ratio']:.3f}) | {sent} | {theory} "
            f"| {fits.get((row['world'], row['layout']), '')} | {row['out_err']:.1e} / {row['grad_err']:.1e} |"
        )
    lines += [
        "",
        f"## Longest sequence within a {search_mib:g} MiB step peak per rank (measured search)",
        "",
        "Every length here was run: one step per probe, its peak measured on every rank (the worst counts). "
        "Lengths are side x side image tokens (+ text), side in steps of 4; `fits` is the longest that stayed "
        "within the budget, `next` the next length, which did not.",
        "",
        "| ranks | layout | path | fits: tokens (peak MiB) | next: tokens (peak MiB) | probes |",
        "|---|---|---|---|---|---|",
    ]
    for rec in sorted(searches, key=lambda r: (r["world"], r["name"])):
        prefix = f"| {rec['world']} | {rec['name']} | {rec['path']} |"
        if "error" in rec:
            lines.append(f"{prefix} fails: {rec['error']} | | |")
            continue
        lines.append(f"{prefix} {rec['fits_seq']} ({rec['fits_peak'] / 2**20:.1f}) "
                     f"| {rec['next_seq']} ({rec['next_peak'] / 2**20:.1f}) | {len(rec['probes'])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    for metric, label, fname in (("saved_mib", "saved activations per rank (MiB)", "memory.png"),
                                 ("peak_mib", "step peak memory per rank (MiB)", "peak.png"),
                                 ("time_ratio", "step time vs one process", "time.png")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=metric == "time_ratio")
        for ax, world in zip(axes, (2, 4)):
            series = defaultdict(list)
            for r in ok:
                if r["world"] in (1, world):
                    series[r["layout"]].append((r["seq"], r[metric] if r["layout"] != "single" or metric != "time_ratio" else 1.0))
            for layout, points in sorted(series.items()):
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=layout)
            ax.set_title(f"{world} ranks" if world > 1 else "one process")
            ax.set_xlabel("tokens")
            ax.set_xscale("log", base=2)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", nargs="+", type=int, default=[1024, 4096, 9216, 16384])
    parser.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--search-mib", type=float, default=128.0,
                        help="step-peak budget per rank for the measured longest-sequence search (0: skip it)")
    parser.add_argument("--search-worlds", nargs="+", type=int, default=[1, 2],
                        help="process counts that run the search (on 2 cores, 4 processes at the lengths that fill "
                             "the budget take minutes per step)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--summarize-only", action="store_true", help="rewrite the report from the existing raw.jsonl")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "raw.jsonl"
    if not args.summarize_only:
        raw.unlink(missing_ok=True)
        for world in [1, *args.worlds]:
            search_mib = args.search_mib if world in args.search_worlds else 0.0
            launch(world, LAYOUTS_BY_WORLD[world], args.seq, args.repeats, search_mib, raw)
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    rows = summarize(records)
    command = "python -m benchmarks.run " + " ".join(a for a in sys.argv[1:] if a != "--summarize-only")
    searches = [rec for rec in records if rec.get("search")]
    report = markdown(rows, extrapolated_tokens(rows), searches, args.search_mib, command.strip())
    (args.out / "cpu.md").write_text(report)
    plot(rows, args.out)
    print(report)


if __name__ == "__main__":
    main()
