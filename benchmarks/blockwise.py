"""The ring the library runs, one rank of it on one device, versus one fused SDPA of the same FLOPs.

    python -m benchmarks.blockwise --device cuda --dtype bf16 --seq 16384 32768 65536 131072 --ring 2 4 8
    python -m benchmarks.blockwise --device cpu --dtype fp32 --seq 2048 4096 --ring 2 --rotate p2p allgather

A ring rank holds ``S/r`` queries and attends them to ``r`` KV blocks of ``S/r`` tokens. This runs
``cp_plugin.attention.ring._RingAttention`` itself (its loop, kernels, key masks, wide accumulators,
forward and backward) as ring rank 0, over ``benchmarks.loopback.LoopbackRing``: the other ranks'
KV blocks come from the full tensors by local copies, so only the transfers are left out. The fused
baseline is ``F.scaled_dot_product_attention`` of the same ``S/r`` queries over all ``S`` keys,
forward and backward: the same FLOPs in one kernel call. Efficiency = fused time / ring time
(target >= 0.9 on GPU). Each case checks the ring's output and q/k/v gradients against the fused
ones (untimed, with the loopback recording dK/dV) and reports the peak memory of both: CUDA's
allocator statistics on a GPU, ``benchmarks.measure.PeakMemory`` elsewhere.
``--masked-keys F`` masks the last fraction ``F`` of the keys (the path padded sequences take).
Writes ``benchmarks/results/blockwise_<device>.md``.
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

from benchmarks.loopback import LoopbackRing
from benchmarks.measure import PeakMemory
from benchmarks.provenance import describe
from cp_plugin.attention.ring import _RingAttention, heads_per_pass

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def key_mask(batch: int, seq: int, masked: float, device: torch.device) -> torch.Tensor | None:
    """Boolean ``(B, S)`` keys to attend: all but the last ``masked`` fraction, or ``None`` for no mask."""
    if not masked:
        return None
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    mask[:, seq - int(seq * masked):] = False
    return mask


def ring_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, ring: int, rotate: str,
              mask: torch.Tensor | None = None, record: bool = True) -> Grads:
    """Ring rank 0's ``_RingAttention`` forward and backward over a loopback ring: ``(out, dq, dk, dv)``.

    ``q`` is the rank's ``(B, H, S/r, D)`` shard, ``k``/``v`` the full ``(B, H, S, D)`` sequence
    the ring delivers block by block, ``mask`` an optional boolean ``(B, S)`` key mask. ``dk``/``dv``
    are what this rank's queries contribute to every key (full length) when ``record`` is set;
    without it (timing, peak memory) the loopback keeps nothing a real ring would not.
    """
    # the ring takes (B, S, H, D) shards: views of the same tensors
    loop = LoopbackRing(0, ring, k.transpose(1, 2), v.transpose(1, 2), record=record)
    k0, v0 = (x.transpose(1, 2).chunk(ring, 1)[0].detach().requires_grad_() for x in (k, v))
    q0 = q.transpose(1, 2).detach().requires_grad_()
    masks = None if mask is None else mask.unflatten(1, (ring, -1)).movedim(1, 0)
    out = _RingAttention.apply(q0, k0, v0, masks, None, loop, q.shape[-1] ** -0.5, rotate, True,
                               heads_per_pass(q0, None))
    out.backward(grad_out)
    out, dq = out.detach(), q0.grad.transpose(1, 2)
    if not record:
        return out, dq, k0.grad.transpose(1, 2), v0.grad.transpose(1, 2)
    dk, dv = (x.transpose(1, 2) for x in loop.dk_dv((k0.grad, v0.grad)))
    return out, dq, dk, dv


def fused_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
               mask: torch.Tensor | None = None) -> Grads:
    """The same attention as one ``scaled_dot_product_attention`` call, forward and backward."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), dq, dk, dv


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes ``fn`` allocates at its high-water mark, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with PeakMemory() as peak:
        fn()
    return peak.peak


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float, float]:
    """Median, min, max seconds of ``fn`` after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), min(samples), max(samples)


def max_rel_error(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> float:
    return max(float((g.float() - w.float()).abs().max() / w.float().abs().max()) for g, w in zip(got, want))


def run_case(seq: int, ring: int, rotate: str, args: argparse.Namespace, device: torch.device) -> dict:
    g = torch.Generator(device).manual_seed(0)
    dtype = DTYPES[args.dtype]
    shape = (args.batch, args.heads, seq, args.head_dim)
    k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(2))
    q, grad_out = (torch.randn(shape[:2] + (seq // ring, args.head_dim), generator=g, device=device, dtype=dtype)
                   for _ in range(2))
    mask = key_mask(args.batch, seq, args.masked_keys, device)
    error = max_rel_error(ring_step(q, k, v, grad_out, ring, rotate, mask), fused_step(q, k, v, grad_out, mask))
    fused_fn = lambda: fused_step(q, k, v, grad_out, mask)  # noqa: E731
    ring_fn = lambda: ring_step(q, k, v, grad_out, ring, rotate, mask, record=False)  # noqa: E731
    fused, ringed = timed(fused_fn, device, args.repeats), timed(ring_fn, device, args.repeats)
    # forward: 2 matmuls of 2 FLOPs per multiply-add; backward: 5 (the scores are recomputed)
    flops = 2 * 7 * args.batch * args.heads * (seq // ring) * seq * args.head_dim
    return {"seq": seq, "ring": ring, "rotate": rotate, "heads_per_pass": heads_per_pass(q.transpose(1, 2), None),
            "efficiency": fused[0] / ringed[0],
            "spread": (fused[0] / ringed[2], fused[0] / ringed[1]), "fused_s": fused[0], "ring_s": ringed[0],
            "tflops": flops / ringed[0] / 1e12, "fused_peak": peak_bytes(fused_fn, device),
            "ring_peak": peak_bytes(ring_fn, device), "kv_block": 2 * k.nbytes // ring, "error": error}


def report(rows: list[dict], args: argparse.Namespace, device: torch.device, command: str) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    peak_source = "CUDA allocator" if device.type == "cuda" else "benchmarks.measure.PeakMemory"
    lines = [
        f"# The library's ring attention (one rank, loopback ring) vs one fused SDPA, {name}",
        "",
        f"{describe(command, device)} {args.dtype}, batch {args.batch}, {args.heads} heads x "
        f"{args.head_dim}, last {args.masked_keys:g} of the keys masked; forward + backward of ring rank 0's S/r "
        f"queries over S keys with `_RingAttention` (KV blocks handed over by local copies); median of "
        f"{args.repeats} [min-max]. Efficiency = fused time / ring time (target >= 0.9 on GPU). Peak: bytes "
        f"allocated above the inputs ({peak_source}), also in KV blocks (k and v of S/r tokens).",
        "",
        "| tokens S | ring r | rotate | heads a pass | efficiency | ring ms | fused ms | ring TFLOP/s "
        "| peak MiB ring / fused | ring peak in KV blocks | max rel err vs fused |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["spread"]
        lines.append(
            f"| {r['seq']} | {r['ring']} | {r['rotate']} | {r['heads_per_pass']} "
            f"| {r['efficiency']:.2f} [{low:.2f}-{high:.2f}] "
            f"| {r['ring_s'] * 1e3:.1f} | {r['fused_s'] * 1e3:.1f} | {r['tflops']:.2f} "
            f"| {r['ring_peak'] / 2**20:.1f} / {r['fused_peak'] / 2**20:.1f} | {r['ring_peak'] / r['kv_block']:.2f} "
            f"| {r['error']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seq", nargs="+", type=int, default=[16384, 32768, 65536, 131072])
    parser.add_argument("--ring", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--rotate", nargs="+", choices=["p2p", "allgather"], default=["p2p"])
    parser.add_argument("--masked-keys", type=float, default=0.0, help="fraction of keys masked at the end")
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
            for rotate in args.rotate:
                rows.append(run_case(seq, ring, rotate, args, device))
                print(rows[-1], flush=True)
    command = "python -m benchmarks.blockwise " + " ".join(sys.argv[1:])
    text = report(rows, args, device, command.strip())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"blockwise_{device.type}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
