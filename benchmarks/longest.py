"""The longest sequence per rank within a step-peak budget, each memory feature on and off, measured side by side.

    python -m benchmarks.longest    # writes benchmarks/results/longest.{md,jsonl}, docs/benchmarks.md's table, the README's
    python -m benchmarks.longest --budget-mib 64 --blocks 4 --worlds 1 2   # another budget and depth
    python -m benchmarks.longest --budget-mib 64 --worlds 1 2 4 --resume  # run only what the jsonl lacks
    python -m benchmarks.longest --worlds 4 --layouts ulysses/sharded+ckpt+tile --resume  # one layout more

One invocation runs ``benchmarks.worker``'s measured search (every length it reports was run, see
``benchmarks.worker.search``) on the same wide Flux of ``--blocks`` double- and single-stream blocks,
the same cores, for:

- one process: plain, with the model's gradient checkpointing (``+ckpt``), and with checkpointing and
  the tiling option: feed-forward networks and inline MLPs in chunks, normalizations, attention
  projections and a block's products of them made again in the backward (``+ckpt+tile``);
- diffusers' own Ulysses (the manual path; ``enable_parallelism`` fails on CPU), with and without its
  gradient checkpointing;
- cp_plugin's Ulysses, ring, and ring x Ulysses (4 processes), each plain, ``+ckpt`` and ``+ckpt+tile``,
  on the ``sharded`` path (no rank holds the whole sequence; diffusers' runs gather their output).

The budget is the high-water mark of what one training step allocates on the worst rank
(``benchmarks.measure.PeakMemory``: weights and inputs excluded, scratch a kernel or gloo allocates
inside unseen). Ratios are to diffusers' Ulysses with checkpointing and to the plain one-process
step of the same run, the issue's two yardsticks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.provenance import describe
from benchmarks.readme import DOCS, replace_section
from benchmarks.run import launch
from benchmarks.worker import TEXT_TOKENS, WIDE_FLUX

FEATURES = ("", "+ckpt", "+ckpt+tile")
# What the rank at the peak held then, by when it was allocated (benchmarks.measure.current_kind; diffusers'
# collectives are not named, so theirs count as forward or backward).
KINDS = {"forward": "held from the forward (saved activations; block inputs when checkpointed)",
         "attention": "cp_plugin's attention outputs and partials",
         "communication": "cp_plugin's communication buffers",
         "backward": "backward (recompute, activation and weight gradients)"}
OUT = Path("benchmarks/results")
# docs/benchmarks.md carries the table, and the README its short form, between these lines (rewritten by each run).
README_START, README_END = "<!-- longest table: python -m benchmarks.longest -->", "<!-- end of longest table -->"
LAYOUTS = {
    1: [f"single{f}" for f in FEATURES],
    2: ["diffusers_ulysses", "diffusers_ulysses+ckpt", *(f"{split}/sharded{f}" for split in ("ulysses", "ring_p2p")
                                                        for f in FEATURES)],
    # 4 processes on 2 cores take a minute per step at these lengths: every feature on, each way to split
    4: ["diffusers_ulysses+ckpt", *(f"{split}/sharded+ckpt+tile" for split in ("ulysses", "ring_x_ulysses", "ring_p2p"))],
}


def features(name: str) -> str:
    """A layout's memory features: ``+ckpt+tile`` of ``ulysses/sharded+ckpt+tile``."""
    return name[name.index("+"):] if "+" in name else ""


def ratios(records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Each record's longest sequence as ratios to the issue's yardsticks of the same run: the plain one-process
    step; diffusers' Ulysses with its checkpointing at the same number of ranks; and, on 4 ranks, 2 ranks with the
    same features (the same layout, or the longest of 2 ranks where it has no 2-rank form: ring x Ulysses)."""
    found = {(r["world"], r["name"]): r for r in records}
    baseline = found.get((1, "single"), {}).get("fits_seq")
    diffusers = {w: found.get((w, "diffusers_ulysses+ckpt"), {}).get("fits_seq") for w in (2, 4)}
    out = []
    for r in records:
        ref = diffusers.get(r["world"])
        fits = r.get("fits_seq")
        half = None
        if r["world"] == 4:
            two = [q.get("fits_seq") or 0 for q in records if q["world"] == 2 and not q["name"].startswith("diffusers")
                   and features(q["name"]) == features(r["name"])]
            half = found.get((2, r["name"]), {}).get("fits_seq") or max(two, default=0)
        out.append((f"{fits / baseline:.2f}x" if fits and baseline else "",
                    f"{fits / ref:.2f}x" if fits and ref and r["world"] > 1 else "",
                    f"{fits / half:.2f}x" if fits and half else ""))
    return out


def table(records: list[dict[str, Any]], budget_mib: float, blocks: int, origin: str) -> str:
    """The results file: ``origin`` is where the records were measured (:func:`provenance`)."""
    four = any(r["world"] == 4 for r in records)  # a column for cp 4 against cp 2 where 4 ranks were searched
    lines = [
        "# Longest sequence per rank within a step-peak budget, memory features on and off",
        "",
        f"{origin} gloo; Flux of "
        f"{WIDE_FLUX['num_attention_heads']} heads x {WIDE_FLUX['attention_head_dim']}, {blocks} double-stream + "
        f"{blocks} single-stream blocks, {TEXT_TOKENS} text tokens, batch 1, fp32; budget {budget_mib:g} MiB of step "
        "peak per rank (benchmarks.measure.PeakMemory, worst rank). Tokens are image tokens of the whole sequence; "
        "every length was run: `fits` is the longest within the budget, `next` the first beyond it. At the peak: "
        "what the worst rank held then, by kind: " + "; ".join(f"{k}: {v}" for k, v in KINDS.items()) + "."
        + (" On 4 ranks, `vs 2 ranks` divides by the same layout's 2-rank figure (for ring x Ulysses, which has "
           "none, by the longest 2-rank figure with the same features)." if four else ""),
        "",
        "| ranks | layout | fits (tokens) | its peak MiB | next (tokens) | its peak MiB | vs one process plain | "
        "vs diffusers Ulysses + ckpt, same ranks | " + ("vs 2 ranks, same features | " if four else "")
        + "at the peak, MiB: " + " / ".join(KINDS) + " |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if four else "") + "---|",
    ]
    for r, (vs_one, vs_diffusers, vs_two) in zip(records, ratios(records)):
        if "error" in r:
            lines.append(f"| {r['world']} | {r['name']} | fails: {r['error']} | | | | | | " + ("| " if four else "") + "|")
            continue
        fits = r["fits_seq"]
        kinds = " / ".join(f"{r['fits_by_kind'].get(kind, 0) / 2**20:.1f}" for kind in KINDS)
        lines.append(f"| {r['world']} | {r['name']} | {fits} | {r['fits_peak'] / 2**20:.1f} | {r['next_seq']} | "
                     f"{r['next_peak'] / 2**20:.1f} | {vs_one} | {vs_diffusers} | " + (f"{vs_two} | " if four else "")
                     + f"{kinds} |")
    return "\n".join(lines) + "\n"


def summary(records: list[dict[str, Any]]) -> str:
    """The README's short form of the table: each layout's longest sequence and its two ratios."""
    lines = ["| ranks | layout | longest sequence (tokens) | vs one process, plain | "
             "vs diffusers' Ulysses + its checkpointing |", "|---|---|---|---|---|"]
    for r, (vs_one, vs_diffusers, _) in zip(records, ratios(records)):
        fits = f"fails: {r['error']}" if "error" in r else r["fits_seq"]
        lines.append(f"| {r['world']} | {r['name']} | {fits} | {vs_one} | {vs_diffusers} |")
    return "\n".join(lines)


def read(raw: Path) -> list[dict[str, Any]]:
    """Everything a search has written so far (nothing if it has not started): its layouts' records, and a line
    per start saying where it ran (``{"provenance": ..., "resumed": rows measured before it}``)."""
    return [json.loads(line) for line in raw.read_text().splitlines()] if raw.exists() else []


def layouts(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The layouts' records among what a search wrote (the lines its starts wrote left out)."""
    return [e for e in entries if "provenance" not in e]


def provenance(entries: list[dict[str, Any]]) -> str:
    """Where the records were measured, from the lines each start wrote, so a rewritten report keeps them: a start
    after the first names the layouts it measured (the table lists them in the layouts' order, not the file's)."""
    starts: list[tuple[dict[str, Any], list[str]]] = []
    for entry in entries:
        if "provenance" in entry:
            starts.append((entry, []))
        elif starts:  # rows before any start's line: the first line's ``resumed`` counts them
            starts[-1][1].append(f"{entry['name']} ({entry['world']} rank{'s' if entry['world'] > 1 else ''})")
    (first, _), *later = starts
    line = first["provenance"]
    if first.get("resumed"):  # the start that measured the rows before it wrote no line (a file from before them)
        line += (f" The first {first['resumed']} rows come from an earlier start of the same command with the "
                 "same code, stopped part way; this line is the resumed start's (`--resume`).")
    for start, measured in later:
        if measured:
            line += f" The rows of {', '.join(measured)} come from a resumed start: {start['provenance']}"
    return line


def in_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records by ranks, then in the order of ``LAYOUTS`` (a resumed start appends its layouts at the end)."""
    def place(r: dict[str, Any]) -> tuple[int, int]:
        names = LAYOUTS.get(r["world"], [])
        return r["world"], names.index(r["name"]) if r["name"] in names else len(names)
    return sorted(records, key=place)


def page_table(report: str) -> str:
    """What docs/benchmarks.md shows of the results file: all of it below its title."""
    return "\n".join(report.splitlines()[2:]).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mib", type=float, default=128.0, help="step peak per rank")
    parser.add_argument("--blocks", type=int, default=2, help="double-stream and single-stream blocks each")
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2],
                        help="process counts to search (add 4 where there are cores for it: on 2 cores a 4-process "
                             "step at these lengths takes minutes)")
    parser.add_argument("--layouts", nargs="+", metavar="NAME",
                        help="search only these of each world's layouts (with --resume, added to the jsonl's)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the existing jsonl")
    parser.add_argument("--resume", action="store_true",
                        help="keep the jsonl's records (same command, stopped part way: a 4-process search on 2 "
                             "cores takes tens of minutes per layout) and search only the layouts it lacks")
    args = parser.parse_args()
    unknown = set(args.layouts or ()) - {name for world in args.worlds for name in LAYOUTS[world]}
    if unknown:
        parser.error(f"--layouts: {', '.join(sorted(unknown))} not among the layouts of --worlds "
                     f"{' '.join(map(str, args.worlds))}: {[LAYOUTS[world] for world in args.worlds]}")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "longest.jsonl"
    command = ("python -m benchmarks.longest "
               + " ".join(a for a in sys.argv[1:] if a not in ("--report-only", "--resume"))).strip()
    if not args.report_only:
        if not args.resume:
            raw.unlink(missing_ok=True)
        done = {(r["world"], r["name"]) for r in layouts(read(raw))}
        with raw.open("a") as f:
            f.write(json.dumps({"provenance": describe(command), "resumed": len(done)}) + "\n")
        for world in args.worlds:
            todo = [name for name in LAYOUTS[world]
                    if (world, name) not in done and (args.layouts is None or name in args.layouts)]
            if todo:
                launch(world, todo, [], 1, args.budget_mib, raw, blocks=args.blocks)
    entries = read(raw)
    records = in_order(layouts(entries))
    report = table(records, args.budget_mib, args.blocks, provenance(entries))
    (args.out / "longest.md").write_text(report)
    if args.out == OUT:  # the docs show the default budget's table; other budgets stay in their own folder
        replace_section(README_START, README_END, page_table(report), DOCS / "benchmarks.md")
        replace_section(README_START, README_END, summary(records))
    print(report)


if __name__ == "__main__":
    main()
