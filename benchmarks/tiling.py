"""What tiled feed-forward networks cost in step time and save in peak memory, where they are on by default.

    python -m benchmarks.tiling            # writes benchmarks/results/tiling.{md,jsonl}
    python -m benchmarks.tiling --lora     # the same with LoRA adapters (a fine-tune): tiling_lora.{md,jsonl}
    python -m benchmarks.tiling --auto     # the default, tile_feed_forward="auto": tiling_auto.{md,jsonl}

``benchmarks.worker`` runs the same Flux (``--blocks`` double- and single-stream blocks), the same global
tokens and cores, with and without ``+tile`` (``cp_plugin.tiling``, chunks chosen per call: on from 2048
tokens per call), on one process and on Ulysses 2 (sharded path), plain and with the model's gradient
checkpointing, in one invocation. Each pair is reported as tiled / untiled: step time and peak memory
per rank; the errors against the one-process untiled step show tiling changes nothing else. Step time
is measured on one model with tiling put on and taken off in turn, a tiled step after each untiled
one (``benchmarks.worker.interleaved_tiling``): the median of the pairs' ratios, with their min-max.
Timed in separate runs instead, one after the other, a machine's drift over minutes reads as
tiling's cost. With ``--lora`` every layout is ``+lora``: a frozen base with rank-4 adapters on the
attention and MLP layers (``benchmarks.worker.LORA``), the errors taken over the adapters' gradients.
With ``--auto`` the tiled layouts are ``+autotile`` (``tile_feed_forward="auto"``, which takes a call only
where the whole sequence is at least ``cp_plugin.memory.AUTO_TILING_WIDTHS`` of the model's widths), at a
length below that (its hooks in place, taking nothing) and at it: what the default costs where it is on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.provenance import describe
from benchmarks.run import launch
from benchmarks.worker import TEXT_TOKENS, WIDE_FLUX

AUTO_TITLE = ', tile_feed_forward="auto" (the default)'
PAIRS = {1: ["single", "single+ckpt"], 2: ["ulysses/sharded", "ulysses/sharded+ckpt"]}


def tiled(name: str, auto: bool = False) -> str:
    return f"{name}+{'autotile' if auto else 'tile'}"


def adapted(names: list[str], lora: bool) -> list[str]:
    """``names``, each ``+lora`` where the run trains adapters."""
    return [f"{name}+lora" if lora else name for name in names]


def table(records: list[dict[str, Any]], blocks: int, command: str, lora: bool = False, auto: bool = False) -> str:
    interleaved = {(r["world"], r["name"], r["seq"]): r for r in records if r.get("interleaved")}
    worst: dict[tuple, dict[str, Any]] = {}
    for r in (r for r in records if not r.get("interleaved")):  # the worst rank of each case
        key = (r["world"], r["name"], r["seq"])
        if key not in worst or r.get("peak_bytes", 0) > worst[key].get("peak_bytes", 0):
            worst[key] = r
    lines = [
        f"# Tiled feed-forward networks{' under LoRA' if lora else ''}"
        f"{AUTO_TITLE if auto else ''}: step time and peak memory, tiled / untiled",
        "",
        f"{describe(command)} Flux of {WIDE_FLUX['num_attention_heads']} "
        f"heads x {WIDE_FLUX['attention_head_dim']}, {blocks} double- + {blocks} single-stream blocks, {TEXT_TOKENS} "
        f"text tokens, fp32{'; a frozen base with rank-4 LoRA adapters on the attention and MLP layers' if lora else ''}"
        "; one forward+backward step; time: median [min-max] of tiled / untiled over pairs of steps "
        "taken in turn on one model; peak: "
        "benchmarks.measure.PeakMemory, worst rank; errors of the tiled step against one untiled process.", "",
        "| ranks | layout | tokens | tiled step time / untiled | tiled peak / untiled | max rel err out / grad |",
        "|---|---|---|---|---|---|",
    ]
    for world, names in PAIRS.items():
        for name in adapted(names, lora):
            for seq in sorted({r["seq"] for r in records}):
                base, tile = worst.get((world, name, seq)), worst.get((world, tiled(name, auto), seq))
                if base is None or tile is None:
                    continue
                if "error" in base or "error" in tile:
                    lines.append(f"| {world} | {name} | {seq} | fails: {base.get('error') or tile.get('error')} | | |")
                    continue
                pairs = interleaved[(world, tiled(name, auto), seq)]
                ratios = [t / u for t, u in zip(pairs["time_tiled_s"], pairs["time_untiled_s"], strict=True)]
                ratio, low, high = statistics.median(ratios), min(ratios), max(ratios)
                lines.append(f"| {world} | {name} | {seq} | {ratio:.3f} [{low:.3f}-{high:.3f}] "
                             f"| {tile['peak_bytes'] / base['peak_bytes']:.3f} "
                             f"| {tile.get('out_rel_err', 0.0):.1e} / {tile.get('grad_rel_err', 0.0):.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", nargs="+", type=int, help="tokens (default: 4096 9216; with --auto 4096 16384)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--lora", action="store_true", help="a frozen base with LoRA adapters (tiling_lora.md)")
    parser.add_argument("--auto", action="store_true", help='tile_feed_forward="auto", the default (tiling_auto.md)')
    args = parser.parse_args()
    args.seq = args.seq or ([4096, 16384] if args.auto else [4096, 9216])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "tiling" + ("_lora" if args.lora else "") + ("_auto" if args.auto else "")
    raw = args.out / f"{stem}.jsonl"
    raw.unlink(missing_ok=True)
    for world, names in PAIRS.items():  # world 1 first: its untiled "single" step is the errors' reference
        launch(world, [n for name in adapted(names, args.lora) for n in (name, tiled(name, args.auto))], args.seq,
               args.repeats, 0.0, raw, blocks=args.blocks, interleave_tiling=True)
    records = [json.loads(line) for line in raw.read_text().splitlines()]
    report = table(records, args.blocks, ("python -m benchmarks.tiling " + " ".join(sys.argv[1:])).strip(), args.lora,
                   args.auto)
    (args.out / f"{stem}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
