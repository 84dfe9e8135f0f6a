"""What a two-dimensional attention mask costs per rank: held whole, or read a tile at a time.

    python -m benchmarks.mask_memory       # writes benchmarks/results/mask_memory.md

A frame-causal ``BlockMask`` over the whole sequence (AnyFlow-FAR's kind: frames of 1560 tokens,
blocks of 128), 4 heads x 64, batch 1, float32, one forward and backward of attention over every
token: what a rank runs after Ulysses' exchange, where it holds all tokens of its heads. Two ways,
same inputs, same output and loss, in one run:

- ``dense``: the mask as one boolean ``(1, S, S)`` tensor, given to ``scaled_dot_product_attention``
  (what a model's dense mask costs, and how cp_plugin read a ``BlockMask`` before it read tiles);
- ``tiles``: ``cp_plugin.attention.ring.ring_attention`` on a ring of one with
  ``cp_plugin.attention.masks.BlockMaskTiles``: the mask's tiles made as each kernel call needs them,
  forward and again backward; tiles the mask leaves out are skipped, and tiles it attends whole run
  without a mask.

Peak: ``benchmarks.measure.PeakMemory`` (what the step allocates, the inputs not counted); time:
median of repeats. The error is the largest difference of the output and of the query, key and value
gradients between the two, relative to the dense run's largest value.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.measure import PeakMemory
from benchmarks.provenance import describe
from cp_plugin.attention.masks import BlockMaskTiles
from cp_plugin.attention.ring import ring_attention

HEADS, HEAD_DIM, FRAME, BLOCK = 4, 64, 1560, 128
Grads = tuple[torch.Tensor, ...]


def frame_causal_mask(seq: int) -> object:
    """flex attention's ``BlockMask``: each token attends its own frame and every earlier one."""
    from torch.nn.attention.flex_attention import create_block_mask

    frames = torch.arange(seq) // FRAME

    def frame_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return frames[kv] <= frames[q]

    return create_block_mask(frame_causal, 1, None, seq, seq, device="cpu", BLOCK_SIZE=BLOCK)


def dense_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, block_mask: object) -> Grads:
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    seq = q.shape[1]
    mask = BlockMaskTiles(block_mask, seq).tile((0, seq), (0, seq), q.device)
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask[:, None])
    out = out.transpose(1, 2)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))


def tiles_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, block_mask: object) -> Grads:
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = ring_attention(q, k, v, group=None, tiles=BlockMaskTiles(block_mask, q.shape[1]))
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))


def measure(step: Callable[..., Grads], inputs: tuple[torch.Tensor, ...], block_mask: object, repeats: int
            ) -> tuple[int, float, Grads]:
    """``(peak bytes, median seconds, the step's output and gradients)``."""
    with PeakMemory() as peak:
        result = step(*inputs, block_mask)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(*inputs, block_mask)
        times.append(time.perf_counter() - start)
    return peak.peak, sorted(times)[len(times) // 2], result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mask_memory.md"))
    args = parser.parse_args()
    command = "python -m benchmarks.mask_memory" + (f" --seq {' '.join(map(str, args.seq))}"
                                                    if args.seq != parser.get_default("seq") else "")
    lines = ["# A two-dimensional attention mask per rank: held whole, or read a tile at a time", "",
             f"{describe(command)} One process, {torch.get_num_threads()} threads; a frame-causal flex attention "
             f"BlockMask (frames of {FRAME} tokens, blocks of {BLOCK}), {HEADS} heads x {HEAD_DIM}, batch 1, fp32; one "
             "forward and backward of attention over every token (a rank after Ulysses' exchange). Peak: "
             "benchmarks.measure.PeakMemory, inputs not counted; time: median of "
             f"{args.repeats}. See the module docstring.", "",
             "| tokens | dense mask: peak MiB | tiles: peak MiB | tiles / dense peak | dense: s | tiles: s "
             "| tiles / dense time | max rel diff out / grads |", "|---|---|---|---|---|---|---|---|"]
    for seq in args.seq:
        g = torch.Generator().manual_seed(seq)
        inputs = tuple(torch.randn(1, seq, HEADS, HEAD_DIM, generator=g) for _ in range(4))
        block_mask = frame_causal_mask(seq)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dense_peak, dense_s, want = measure(dense_step, inputs, block_mask, args.repeats)
            tiles_peak, tiles_s, got = measure(tiles_step, inputs, block_mask, args.repeats)
        diffs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want)]
        mib = 2 ** 20
        lines.append(f"| {seq} | {dense_peak / mib:.1f} | {tiles_peak / mib:.1f} | {tiles_peak / dense_peak:.3f} "
                     f"| {dense_s:.2f} | {tiles_s:.2f} | {tiles_s / dense_s:.2f} | {diffs[0]:.1e} / {max(diffs[1:]):.1e} |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
