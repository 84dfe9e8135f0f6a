"""What each part of the tiling option costs in operations and saves in peak memory.

    python -m benchmarks.tiling_parts    # writes benchmarks/results/tiling_parts.md

The tiling option (``tile_feed_forward=True``) is three parts, applied in turn, each building on the
ones before (``cp_plugin.memory.TILING_PARTS``): the feed-forward networks and inline MLPs run a chunk
of tokens at a time, their hidden layers made again in the backward; normalizations keep only their
inputs, and an attention's projections of a norm's output and norms of its projections keep what
those were made of, made again in the backward; and a block's products of either with its
modulation or gate do the same. ``benchmarks.tiling_flops`` counts the whole option; this counts it
part by part, on the meta device at real widths (Flux.1 and Wan2.1-T2V-14B, as there), and measures
the peak of one training step on this CPU's narrow Flux (``benchmarks.tiling``'s, one process) after
each part, with and without gradient checkpointing: where the option's cost comes from, and what
each part buys for it.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel

from benchmarks.measure import PeakMemory
from benchmarks.provenance import describe
from benchmarks.tiling_flops import PROMPT, counted_with, flux_step, wan_step
from benchmarks.worker import TEXT_TOKENS, WIDE_FLUX, build, inputs_for, layouts_for, step_fn
from cp_plugin.memory import TILING_PARTS, apply_tiling, enable_checkpointing
from cp_plugin.model import Conversion
from cp_plugin.tiling import Tiles

OUT = Path("benchmarks/results/tiling_parts.md")
MIB = 2**20


def with_parts(model: torch.nn.Module, parts: int, checkpointing: bool) -> Conversion:
    """The memory options with the first ``parts`` of the tiling option's parts (0: none), applied as
    ``cp_plugin.memory.apply_memory_options`` applies them; ``.remove()`` undoes them."""
    options = apply_tiling(model, Tiles.every(), parts) if parts else Conversion()
    if checkpointing:
        enable_checkpointing(model, options)
    return options


def operations(model: torch.nn.Module, forward: Callable, tokens: int, checkpointing: bool, parts: int) -> int:
    """Floating-point operations of one forward and backward (``benchmarks.tiling_flops``) with ``parts``."""
    return counted_with(model, forward, tokens, functools.partial(with_parts, parts=parts,
                                                                   checkpointing=checkpointing))


def peak(tokens: int, checkpointing: bool, parts: int, blocks: int) -> int:
    """Peak bytes of one training step of ``benchmarks.tiling``'s Flux on one process with ``parts``."""
    layout = replace(layouts_for(1)["single"], blocks=blocks)
    model, mesh = build(layout)
    options = with_parts(model, parts, checkpointing)
    step = step_fn(model, inputs_for(layout, tokens, mesh))
    with PeakMemory() as measured:
        step()
    options.remove()
    return measured.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 65536], help="lengths counted at real widths")
    parser.add_argument("--peak-tokens", type=int, default=9216, help="the length whose peaks are measured")
    parser.add_argument("--blocks", type=int, default=2, help="double- and single-stream blocks of the measured Flux")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    command = ("python -m benchmarks.tiling_parts " + " ".join(sys.argv[1:])).strip()
    parts = range(1, len(TILING_PARTS) + 1)
    added = [("+ " if part > 1 else "") + TILING_PARTS[part - 1] for part in parts]
    lines = ["# Each part of the tiling option: operations and peak memory", "",
             f"{describe(command)} Parts applied in turn, each with the ones before it (`cp_plugin.memory."
             "TILING_PARTS`); the last column is the whole option.", "",
             "Operations of one forward and backward over the untiled step's (torch.utils.flop_counter's formulas "
             "on the meta device, recomputes included, elementwise work not counted; as `benchmarks.tiling_flops`):",
             "", "| model | tokens | checkpointed | " + " | ".join(added) + " |",
             "|---|---|---|" + "---|" * len(added)]
    with torch.device("meta"):  # diffusers' defaults are Flux.1's and Wan2.1-T2V-14B's configs
        flux = FluxTransformer2DModel(num_layers=1, num_single_layers=2)
        wan = WanTransformer3DModel(num_layers=1)
    for name, model, forward in ((f"Flux.1 (width {flux.inner_dim}, 1 double + 2 single blocks)", flux,
                                  flux_step(dict(flux.config), PROMPT)),
                                 ("Wan2.1-T2V-14B (width 5120, 1 block)", wan, wan_step)):
        for tokens in args.tokens:
            for checkpointing in (False, True):
                untiled = operations(model, forward, tokens, checkpointing, 0)
                ratios = [operations(model, forward, tokens, checkpointing, part) / untiled for part in parts]
                lines.append(f"| {name} | {tokens} | {'yes' if checkpointing else 'no'} | "
                             + " | ".join(f"{r:.3f}" for r in ratios) + " |")
                print(lines[-1], flush=True)
    lines += ["", f"Peak of one training step, MiB (benchmarks.measure.PeakMemory): `benchmarks.tiling`'s Flux of "
              f"{WIDE_FLUX['num_attention_heads']} heads x {WIDE_FLUX['attention_head_dim']}, {args.blocks} double- "
              f"+ {args.blocks} single-stream blocks, {TEXT_TOKENS} text tokens, fp32, one process, "
              f"{args.peak_tokens} image tokens:", "",
              "| checkpointed | untiled | " + " | ".join(added) + " |", "|---|---|" + "---|" * len(added)]
    for checkpointing in (False, True):
        peaks = [peak(args.peak_tokens, checkpointing, part, args.blocks) / MIB for part in (0, *parts)]
        lines.append(f"| {'yes' if checkpointing else 'no'} | " + " | ".join(f"{p:.1f}" for p in peaks) + " |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
