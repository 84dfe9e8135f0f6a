"""How much of the ring's communication its compute hides: double buffering measured, forward and backward.

    python -m benchmarks.overlap                  # 2 processes under torchrun; writes benchmarks/results/overlap_cpu.md
    torchrun --nproc-per-node 2 -m benchmarks.overlap --seq 2048 8192

The library's ring (``cp_plugin.attention.ring.ring_attention``, p2p) posts the next KV block's (and, in
the backward, the next dK/dV accumulator's) transfer before computing on the current block, and waits
after. On ring shards ``(1, S/r, H, D)`` of every rank, per sequence length, forward + backward:

- **step**: the ring as the library runs it (median of repeats, each step between barriers);
- **serial step**: the same step with every transfer waited for as soon as it is posted (no overlap);
- **transfer**: the same rotations (KV blocks forward; KV blocks and float32 dK/dV backward) with no
  compute between them, i.e. what communication costs on its own;
- **exposed**: the time the step spends inside ``RingComm.wait`` (median over the step's own runs):
  communication the compute did not hide, and also waiting for a slower peer to post its transfer
  (ranks out of step), which no schedule hides;
- **hidden** = 1 - exposed / transfer (negative when waiting for peers outweighs the transfers), and the
  time the overlap saves = serial step - step.

It runs on CPU over gloo. gloo moves data on its own threads, which share the cores with the
attention kernels: a transfer hidden here still slows the compute it overlaps, so ``hidden`` says
that the schedule overlaps, and the serial-vs-step difference what that is worth on these cores. It
cannot say what a GPU gains: there NCCL copies run on their own engines and streams, so a transfer
is hidden whenever a block's attention outlasts it, and that ratio of link speed to attention speed
is nothing a CPU run measures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from benchmarks.launch import driver_parser, run_or_relaunch
from benchmarks.provenance import describe
from cp_plugin.attention.ring import Block, RingComm, heads_per_pass, ring_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class WaitClock:
    """Seconds spent inside ``RingComm.wait`` while installed (the exposed communication)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def installed(self) -> Iterator[None]:
        original = RingComm.wait

        def timed_wait(comm: RingComm) -> None:
            start = time.perf_counter()
            original(comm)
            self.seconds += time.perf_counter() - start

        RingComm.wait = timed_wait  # type: ignore[method-assign]
        try:
            yield
        finally:
            RingComm.wait = original  # type: ignore[method-assign]


@contextmanager
def serial_transfers() -> Iterator[None]:
    """Every ``send_recv`` waits for its own transfer before returning: the ring without overlap."""
    original = RingComm.send_recv

    def send_recv_and_wait(comm: RingComm, send: Block, keep: bool = False) -> Block:
        received = original(comm, send, keep)
        RingComm.wait(comm)
        return received

    RingComm.send_recv = send_recv_and_wait  # type: ignore[method-assign]
    try:
        yield
    finally:
        RingComm.send_recv = original  # type: ignore[method-assign]


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after a warm-up, each between barriers (the slowest rank)."""
    fn()
    samples = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run_length(seq: int, args: argparse.Namespace) -> dict[str, float]:
    world, rank = dist.get_world_size(), dist.get_rank()
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(rank)
    shape = (1, seq // world, args.heads, args.head_dim)
    q, k, v, grad = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    group = dist.group.WORLD

    def step() -> None:
        qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
        ring_attention(qs, ks, vs, group=group).backward(grad)

    kv = (k, v)  # what travels: each (B, S/r, H, D)
    dkv = tuple(torch.zeros_like(x, dtype=torch.promote_types(dtype, torch.float32)) for x in kv)

    def transfers() -> None:
        for block, rounds in ((kv, world - 1), (kv, world - 1), (dkv, world - 1)):
            comm = RingComm(group, "overlap")
            for _ in range(rounds):
                comm.send_recv(block)
                comm.wait()

    clock, waits = WaitClock(), []

    def step_and_its_waits() -> None:
        clock.seconds = 0.0
        step()
        waits.append(clock.seconds)

    with clock.installed():
        step_s = timed(step_and_its_waits, args.repeats)
    # The median over the same timed runs as the step's (not the warm-up): each run waits no longer than it
    # takes, so the exposed time never exceeds the step time.
    exposed = statistics.median(waits[1:])
    with serial_transfers():
        serial_s = timed(step, args.repeats)
    transfer_s = timed(transfers, args.repeats)
    worst = torch.tensor([step_s, serial_s, transfer_s, exposed], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    step_s, serial_s, transfer_s, exposed = worst.tolist()
    return {"seq": seq, "step_s": step_s, "serial_s": serial_s, "transfer_s": transfer_s, "exposed_s": exposed,
            "hidden": 1 - exposed / transfer_s if transfer_s else 0.0,
            "kv_mib": sum(x.nbytes for x in kv) / 2**20}


def report(rows: list[dict[str, float]], args: argparse.Namespace, command: str) -> str:
    world = dist.get_world_size()
    lines = [
        f"# Ring overlap: how much communication the double-buffered ring hides, {platform.machine()} CPU, gloo", "",
        f"{describe(command)} {world} processes x {torch.get_num_threads()} threads, ring "
        f"{world}, {args.heads} heads x {args.head_dim} ({heads_per_pass(torch.empty(1, 1, args.heads, 1), None)} a pass "
        f"of the ring), {args.dtype}, forward + backward of "
        f"`cp_plugin.attention.ring.ring_attention`; median of {args.repeats}, worst rank. See the module docstring "
        "of `benchmarks/overlap.py` for what a CPU figure can and cannot say about a GPU.", "",
        "| tokens | KV block MiB | step ms | serial step ms (no overlap) | saved by overlap | transfer alone ms "
        "| exposed in wait ms | hidden |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['seq']} | {r['kv_mib']:.1f} | {r['step_s'] * 1e3:.1f} | {r['serial_s'] * 1e3:.1f} "
                     f"| {1 - r['step_s'] / r['serial_s']:.0%} | {r['transfer_s'] * 1e3:.1f} "
                     f"| {r['exposed_s'] * 1e3:.1f} | {r['hidden']:.0%} |")
    return "\n".join(lines) + "\n"


def run_rank(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    rows = [run_length(seq, args) for seq in args.seq]
    if dist.get_rank() == 0:
        text = report(rows, args, args.command or "torchrun -m benchmarks.overlap")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overlap_cpu.md").write_text(text)
        print(text)
    dist.destroy_process_group()


def main() -> None:
    parser = driver_parser(__doc__.splitlines()[0], world=2)
    parser.add_argument("--seq", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    run_or_relaunch("benchmarks.overlap", parser.parse_args(), run_rank)


if __name__ == "__main__":
    main()
