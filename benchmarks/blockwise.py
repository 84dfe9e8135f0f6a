"""Blockwise attention as one ring rank computes it, versus one fused SDPA of the same FLOPs, on one device.

    python -m benchmarks.blockwise --device cuda --dtype bf16 --seq 16384 32768 65536 131072 --ring 2 4 8
    python -m benchmarks.blockwise --device cpu --dtype fp32 --seq 2048 4096 --ring 2      # runs anywhere

A ring rank holds ``S/r`` queries and attends them to ``r`` KV blocks of ``S/r`` tokens, one at a
time, with ``cp_plugin.attention.kernels`` (attention with LSE, the LSE merge, the backward from the
merged output and LSE): exactly the ring's compute, without its communication. The fused baseline
is ``F.scaled_dot_product_attention`` of the same ``S/r`` queries over all ``S`` keys, forward and
backward: the same FLOPs in one kernel call. Efficiency = fused time / blockwise time (target >= 0.9
on GPU). Each case also checks the blockwise output and q/k/v gradients against the fused ones and
reports the peak device memory of both (CUDA only). Writes ``benchmarks/results/blockwise_<device>.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cp_plugin.attention.kernels import attention_backward, attention_forward, merge_partial

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def blockwise_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, ring: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ring rank's attention forward and backward over ``ring`` KV blocks: ``(out, dq, dk, dv)``.

    ``q`` is the rank's ``(B, H, S/r, D)`` shard, ``k``/``v`` the full ``(B, H, S, D)`` sequence that
    the ring would deliver block by block; merges run in float32 as with ``convert_to_fp32``.
    """
    scale = q.shape[-1] ** -0.5
    blocks = list(zip(k.chunk(ring, 2), v.chunk(ring, 2)))
    out = lse = None
    for kb, vb in blocks:
        block_out, block_lse = attention_forward(q, kb, vb, scale)
        out, lse = merge_partial(out, lse, block_out.float(), block_lse)
    out, lse = out.to(q.dtype), lse.squeeze(-1)
    dq = torch.zeros_like(q, dtype=torch.float32)
    dks, dvs = [], []
    for kb, vb in blocks:
        block_dq, dk, dv = attention_backward(grad_out, q, kb, vb, out, lse, scale)
        dq += block_dq
        dks.append(dk)
        dvs.append(dv)
    return out, dq.to(q.dtype), torch.cat(dks, 2), torch.cat(dvs, 2)


def fused_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same attention as one ``scaled_dot_product_attention`` call, forward and backward."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), dq, dk, dv


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float, float, int]:
    """Median, min, max seconds of ``fn`` after one warm-up call, and its peak device memory in bytes."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(samples), min(samples), max(samples), peak


def max_rel_error(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> float:
    return max(float((g.float() - w.float()).abs().max() / w.float().abs().max()) for g, w in zip(got, want))


def run_case(seq: int, ring: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    g = torch.Generator(device).manual_seed(0)
    dtype = DTYPES[args.dtype]
    shape = (args.batch, args.heads, seq, args.head_dim)
    k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(2))
    q, grad_out = (torch.randn(shape[:2] + (seq // ring, args.head_dim), generator=g, device=device, dtype=dtype)
                   for _ in range(2))
    error = max_rel_error(blockwise_step(q, k, v, grad_out, ring), fused_step(q, k, v, grad_out))
    fused = timed(lambda: fused_step(q, k, v, grad_out), device, args.repeats)
    blockwise = timed(lambda: blockwise_step(q, k, v, grad_out, ring), device, args.repeats)
    # forward: 2 matmuls of 2 FLOPs per multiply-add; backward: 5 (the scores are recomputed)
    flops = 2 * 7 * args.batch * args.heads * (seq // ring) * seq * args.head_dim
    return {"seq": seq, "ring": ring, "efficiency": fused[0] / blockwise[0],
            "spread": (fused[0] / blockwise[2], fused[0] / blockwise[1]), "fused_s": fused[0],
            "blockwise_s": blockwise[0], "tflops": flops / blockwise[0] / 1e12, "fused_peak": fused[3],
            "blockwise_peak": blockwise[3], "error": error}


def peaks(row: dict) -> str:
    """Peak memory cell: CUDA's allocator statistics; a CPU run has none to read."""
    if not row["fused_peak"]:
        return "n/a"
    return f"{row['blockwise_peak'] / 2**20:.0f} / {row['fused_peak'] / 2**20:.0f}"


def report(rows: list[dict], args: argparse.Namespace, device: torch.device, command: str) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    lines = [
        f"# Blockwise (ring-rank) attention vs one fused SDPA, {name}",
        "",
        f"`{command}`; torch {torch.__version__}, {args.dtype}, batch {args.batch}, {args.heads} heads x "
        f"{args.head_dim}; forward + backward of one ring rank's S/r queries over S keys; median of "
        f"{args.repeats} [min-max]. Efficiency = fused time / blockwise time (target >= 0.9 on GPU).",
        "",
        "| tokens S | ring r | efficiency | blockwise ms | fused ms | blockwise TFLOP/s | peak MiB blockwise / fused "
        "| max rel err vs fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["spread"]
        lines.append(
            f"| {r['seq']} | {r['ring']} | {r['efficiency']:.2f} [{low:.2f}-{high:.2f}] | {r['blockwise_s'] * 1e3:.1f} "
            f"| {r['fused_s'] * 1e3:.1f} | {r['tflops']:.1f} | {peaks(r)} | {r['error']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seq", nargs="+", type=int, default=[16384, 32768, 65536, 131072])
    parser.add_argument("--ring", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for seq in args.seq:
        for ring in args.ring:
            if seq % ring:
                raise ValueError(f"--seq {seq} is not divisible by --ring {ring}; use multiples of every ring size")
            rows.append(run_case(seq, ring, args, device))
            print(rows[-1], flush=True)
    command = "python -m benchmarks.blockwise " + " ".join(sys.argv[1:])
    text = report(rows, args, device, command.strip())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"blockwise_{device.type}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
