"""One command that checks a GPU end to end in a few minutes: kernels, the ring, a training step.

    python -m benchmarks.gpu              # on a CUDA machine: writes benchmarks/results/gpu_<device name>.md
    python -m benchmarks.gpu --tiny       # the same checks at toy sizes (any device; the test suite runs it)
    python -m benchmarks.gpu --parts steps --no-cudnn-sdp   # one part again, with cuDNN's SDPA switched off

Three parts, each on the device alone (no process group: one GPU is enough):

1. **Kernel exactness.** The blockwise path the ring runs (``cp_plugin.attention.ring._RingAttention``
   over ``benchmarks.loopback.LoopbackRing``, forward and backward) against one fused SDPA, in bf16 and
   fp32, without and with a key mask (an odd number of keys per block), on each kernel the library picks
   there: cuDNN (bf16, masked or not, Hopper and newer), flash (bf16, with cuDNN's SDPA switched off),
   memory-efficient (fp32, and bf16 masked blocks without cuDNN); then one block's kernels alone with a mask
   per query and with a batch entry whose keys are all masked, at an odd key count and at 64 keys past a
   whole 128-key tile (where cuDNN's backward with a bias is known to give NaN), against float32 math
   attention. Each error is held to its dtype's bound.
2. **Ring throughput.** Ring rank 0's attention at ring 2 as a ratio to fused SDPA of the same FLOPs,
   16K-128K tokens, bf16 (``benchmarks.blockwise``'s measure), with its TFLOP/s; at two lengths also with
   the last quarter of the keys masked.
3. **A training step of a Flux-width model** (one double-stream and one single-stream block, 24 heads x
   128, 512 text tokens, bf16) at 32K, 64K and 128K image tokens on one device: peak memory (CUDA's
   allocator, above the weights and inputs), tokens/s, model TFLOP/s (``torch.utils.flop_counter`` of
   the plain step; a recompute is not useful work) and utilisation against the device's dense bf16
   peak, plain, with the model's gradient checkpointing, and with checkpointing and tiled
   feed-forward networks (``cp_plugin.tiling``). An option that runs out of memory at a length is that
   row's result.

A part that fails with a device error (CUDA, cuBLAS, cuDNN) leaves this process's CUDA context unusable
and, run asynchronously, names a later kernel than the one that failed; so it is rerun at once in fresh
processes: with ``CUDA_LAUNCH_BLOCKING=1`` (the traceback then ends at the failing kernel) and with
cuDNN's SDPA switched off (the kernel known to fail at some shapes). The results file gets each rerun's
outcome, and the figures of one that passes, marked as such.

Needs only what the README's install line installs, on a CUDA build of torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.blockwise import fused_step, max_rel_error, peak_bytes, ring_step, run_case, timed
from benchmarks.provenance import describe
from cp_plugin.attention.kernels import additive_mask, attention_backward, attention_forward, kernel_for
from cp_plugin.memory import apply_memory_options
from fixtures.models import tiny_flux

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets, by a name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
               "A100": 312.0, "L40S": 362.0, "B200": 2250.0}
BOUNDS = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # max relative error of out / dq / dk / dv vs fused SDPA
FEATURES = {"plain": {}, "checkpointing": {"gradient_checkpointing": True},
            "checkpointing + tiling": {"gradient_checkpointing": True, "tiling": True}}


@dataclass(frozen=True)
class Sizes:
    """What each part runs at: the full check, or ``--tiny`` (any device, seconds)."""

    heads: int
    head_dim: int
    kernel_tokens: int
    ring_tokens: tuple[int, ...]
    masked_ring_tokens: tuple[int, ...]  # also timed with the last quarter of the keys masked
    step_tokens: tuple[int, ...]
    text_tokens: int
    rope: tuple[int, int, int]
    repeats: int
    tile_tokens: int | None  # None: the library's automatic chunks; a toy sequence is below them, so it sets some


FULL = Sizes(24, 128, 8192, (16384, 32768, 65536, 131072), (16384, 65536), (32768, 65536, 131072), 512, (16, 56, 56),
             3, None)
TINY = Sizes(2, 16, 256, (256, 512), (256,), (256, 512), 16, (4, 6, 6), 1, 64)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"


def peak_tflops(name: str) -> float | None:
    return next((peak for fragment, peak in PEAK_TFLOPS.items() if fragment in name), None)


# 1. kernels ----------------------------------------------------------------------------------------------------------
def kernel_cases(device: torch.device) -> list[tuple[str, torch.dtype, bool, bool]]:
    """``(label, dtype, masked, cudnn on)``: every kernel the ring picks on this device, with and without masks."""
    cases = [("bf16", torch.bfloat16, False, True), ("bf16", torch.bfloat16, True, True),
             ("fp32", torch.float32, False, True), ("fp32", torch.float32, True, True)]
    if device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
        # where cuDNN would otherwise serve: flash, and the memory-efficient kernel for a masked block
        cases[2:2] = [("bf16", torch.bfloat16, False, False), ("bf16", torch.bfloat16, True, False)]
    return cases


def kernel_check(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for label, dtype, masked, cudnn in kernel_cases(device):
        g = torch.Generator(device).manual_seed(0)
        # a masked block holds an odd number of keys: a bias row length no kernel gets aligned for free
        seq, ring = sizes.kernel_tokens + (2 if masked else 0), 2
        k, v = (torch.randn(1, sizes.heads, seq, sizes.head_dim, generator=g, device=device, dtype=dtype)
                for _ in range(2))
        q, grad = (torch.randn(1, sizes.heads, seq // ring, sizes.head_dim, generator=g, device=device, dtype=dtype)
                   for _ in range(2))
        mask = None
        if masked:
            mask = torch.ones(1, seq, dtype=torch.bool, device=device)
            mask[:, -seq // 4:] = False
        enabled = device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled()
        if device.type == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(cudnn and enabled)
        try:
            kernel = kernel_for(q, additive_mask(mask, q, k))
            error = max_rel_error(ring_step(q, k, v, grad, ring, "p2p", mask), fused_step(q, k, v, grad, mask))
        finally:
            if device.type == "cuda":
                torch.backends.cuda.enable_cudnn_sdp(enabled)
        rows.append({"dtype": label, "mask": "last quarter masked" if masked else "none", "keys": seq // ring,
                     "kernel": kernel, "error": error, "bound": BOUNDS[dtype]})
    return rows + other_masks(sizes, device)


def other_masks(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    """One KV block through the kernels alone, bf16, with masks the key-masked ring above does not make: a mask per
    query (a block of block-causal attention), and a batch entry whose keys are all masked (a block past the
    padding: its output and gradients must be zeros, not NaN), against float32 math attention; an odd key count,
    and one 64 keys past a whole 128-key tile, where cuDNN's backward with a bias gave NaN for rows whose LSE is
    -inf (``cp_plugin.attention.kernels.whole_key_tiles``)."""
    g = torch.Generator(device).manual_seed(0)
    batch, queries, scale = 2, sizes.kernel_tokens // 8 + 1, sizes.head_dim ** -0.5
    rows = []
    for keys in (sizes.kernel_tokens // 4 + 3, sizes.kernel_tokens // 4 // 128 * 128 + 64):
        q, grad = (torch.randn(batch, sizes.heads, queries, sizes.head_dim, generator=g, device=device,
                               dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(batch, sizes.heads, keys, sizes.head_dim, generator=g, device=device,
                            dtype=torch.bfloat16) for _ in range(2))
        per_query = torch.rand(batch, queries, keys, generator=g, device=device) > 0.3
        per_query[..., 0] = True
        key_mask = torch.rand(batch, keys, generator=g, device=device) > 0.3
        key_mask[0, 0], key_mask[1] = True, False
        for label, mask, dense, checked in (("per query", per_query, per_query[:, None], batch),
                                            ("batch entry 1 all masked", key_mask, key_mask[:, None, None], 1)):
            bias = additive_mask(mask, q, k)
            out, lse = attention_forward(q, k, v, scale, bias)
            got = (out, *attention_backward(grad, q, k, v, out, lse, scale, bias))
            exact = [x.detach().float().requires_grad_() for x in (q, k, v)]
            with sdpa_kernel(SDPBackend.MATH):
                want = torch.nn.functional.scaled_dot_product_attention(*exact, attn_mask=dense, scale=scale)
            want.backward(grad.float())
            error = max_rel_error(tuple(x[:checked] for x in got), (want[:checked], *(x.grad[:checked] for x in exact)))
            if not all(bool(x[checked:].isfinite().all()) and not bool(x[checked:].any()) for x in got):
                error = math.inf  # a fully masked entry must contribute nothing
            rows.append({"dtype": "bf16", "mask": label, "keys": keys, "kernel": kernel_for(q, bias), "error": error,
                         "bound": BOUNDS[torch.bfloat16]})
    return rows


# 2. ring ------------------------------------------------------------------------------------------------------------
def ring_throughput(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    dtype = "bf16" if device.type == "cuda" else "fp32"
    rows = []
    for masked, lengths in ((0.0, sizes.ring_tokens), (0.25, sizes.masked_ring_tokens)):
        args = argparse.Namespace(dtype=dtype, batch=1, heads=sizes.heads, head_dim=sizes.head_dim,
                                  masked_keys=masked, repeats=sizes.repeats)
        rows += [{**run_case(seq, 2, "p2p", args, device), "mask": "last quarter masked" if masked else "none"}
                 for seq in lengths]
    return rows


# 3. a training step -------------------------------------------------------------------------------------------------
def flux_model(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    width = sizes.heads * sizes.head_dim
    model = tiny_flux(num_layers=1, num_single_layers=1, num_attention_heads=sizes.heads,
                      attention_head_dim=sizes.head_dim, in_channels=64, joint_attention_dim=width,
                      pooled_projection_dim=width, axes_dims_rope=sizes.rope)
    return model.to(device=device, dtype=dtype)


def flux_inputs(sizes: Sizes, tokens: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator(device).manual_seed(0)
    width = sizes.heads * sizes.head_dim
    rows = torch.arange(tokens, device=device)
    return {
        "hidden_states": torch.randn(1, tokens, 64, generator=g, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, sizes.text_tokens, width, generator=g, device=device, dtype=dtype),
        "pooled_projections": torch.randn(1, width, generator=g, device=device, dtype=dtype),
        "timestep": torch.tensor([0.5], device=device, dtype=dtype),
        # float32 positions: bf16 rounds rows past 256 (the model computes its rotary angles in float anyway)
        "img_ids": torch.stack([torch.zeros_like(rows), rows // 256, rows % 256], -1).float(),
        "txt_ids": torch.zeros(sizes.text_tokens, 3, device=device),
    }


def training_steps(sizes: Sizes, device: torch.device) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = flux_model(sizes, device, dtype)  # built once: each option is applied, measured and removed
    rows = []
    for tokens in sizes.step_tokens:
        inputs = flux_inputs(sizes, tokens, device, dtype)
        flops = None
        for feature, options in FEATURES.items():
            applied = apply_memory_options(model, **{"gradient_checkpointing": False, "tiling": False,
                                                     "tile_tokens": sizes.tile_tokens, **options})

            def step(batch: dict[str, Any] = inputs) -> None:  # leaves no gradients: each peak is the step's own
                out = model(**batch, return_dict=False)[0]
                out.float().square().mean().backward()
                model.zero_grad(set_to_none=True)

            row: dict[str, Any] = {"tokens": tokens, "feature": feature, "tiled": len(applied.paths)}
            try:
                if not options:  # the plain step's FLOPs: what the model needs, whatever a feature recomputes
                    with FlopCounterMode(display=False) as counter:
                        step()
                    flops = counter.get_total_flops()
                median, _, _ = timed(step, device, sizes.repeats)
                row.update(peak=peak_bytes(step, device), tokens_per_s=tokens / median, step_s=median,
                           tflops=None if flops is None else flops / median / 1e12)
            except torch.OutOfMemoryError:  # a result (this option does not fit here), not a failure of the check
                row["error"] = "out of memory"
                model.zero_grad(set_to_none=True)
            finally:
                applied.remove()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# report ---------------------------------------------------------------------------------------------------------------
def kernel_lines(kernels: list[dict], peak: float | None) -> list[str]:
    lines = ["| dtype | mask | keys per block | kernel | max rel err (out, dq, dk, dv) | bound | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in kernels:
        verdict = "ok" if r["error"] <= r["bound"] else "OVER THE BOUND"
        lines.append(f"| {r['dtype']} | {r['mask']} | {r['keys']} | {r['kernel']} "
                     f"| {r['error']:.1e} | {r['bound']:.0e} | {verdict} |")
    return lines


def ring_lines(ring: list[dict], peak: float | None) -> list[str]:
    lines = ["| tokens | key mask | heads a pass | efficiency (fused / ring time) | ring TFLOP/s | max rel err |",
             "|---|---|---|---|---|---|"]
    for r in ring:
        lines.append(f"| {r['seq']} | {r['mask']} | {r['heads_per_pass']} | {r['efficiency']:.2f} "
                     f"| {r['tflops']:.3g} | {r['error']:.1e} |")
    return lines


def step_lines(steps: list[dict], peak: float | None) -> list[str]:
    util = f"utilisation of {peak:g} TFLOP/s dense bf16" if peak else "utilisation (device peak unknown)"
    lines = [f"| image tokens | memory option | peak MiB | step s | tokens/s | model TFLOP/s | {util} | networks tiled |",
             "|---|---|---|---|---|---|---|---|"]
    for r in steps:
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r['feature']} | {r['error']} | | | | | {r['tiled']} |")
            continue
        known = r["tflops"] is not None  # unknown where the plain step did not fit to be counted
        tflops, share = (f"{r['tflops']:.3g}", f"{r['tflops'] / peak:.2f}" if peak else "n/a") if known else ("n/a",) * 2
        lines.append(f"| {r['tokens']} | {r['feature']} | {r['peak'] / 2**20:.1f} | {r['step_s']:.3f} "
                     f"| {r['tokens_per_s']:.0f} | {tflops} | {share} | {r['tiled']} |")
    return lines


PARTS = {  # title, what runs it, how its rows read (given the device's peak TFLOP/s, which only the steps use)
    "kernels": ("1. Kernel exactness, forward and backward: the ring's blockwise path vs fused SDPA (ring 2); one "
                "block's kernels with other masks vs float32 math attention",
                kernel_check, kernel_lines),
    "ring": ("2. Ring throughput: ring rank 0 (ring 2) vs fused SDPA of the same FLOPs", ring_throughput, ring_lines),
    "steps": ("3. One training step of a Flux-width model (1 double- + 1 single-stream block), one device",
              training_steps, step_lines),
}


# How a part that failed with a device error is rerun, each in a fresh process: (what the rerun changes, environment,
# extra arguments).
RERUNS = (("CUDA_LAUNCH_BLOCKING=1 (the traceback ends at the failing kernel)", {"CUDA_LAUNCH_BLOCKING": "1"}, []),
          ("cuDNN's SDPA switched off", {}, ["--no-cudnn-sdp"]))
DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "CUDNN_STATUS", "AcceleratorError")
RERUN_TIMEOUT_S = 180
TAIL_LINES = 12  # of a failed part's traceback (or a rerun's stderr) kept for the results file


def device_error(text: str) -> bool:
    """Whether an error came from the device (its context is then unusable) rather than from the check's code."""
    return any(fragment in text for fragment in DEVICE_ERRORS)


def rerun(key: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rerun part ``key`` in a fresh process per entry of ``RERUNS``: ``{"how", "rows" or "error", "tail"}`` each."""
    outcomes = []
    for how, env, extra in RERUNS:
        with tempfile.TemporaryDirectory() as out:
            rows_file = Path(out) / "rows.json"
            cmd = [sys.executable, "-m", "benchmarks.gpu", "--parts", key, "--device", args.device, "--out", out,
                   "--rows", str(rows_file), "--no-rerun", *(["--tiny"] if args.tiny else []), *extra]
            try:
                proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                                      timeout=RERUN_TIMEOUT_S)
                written = json.loads(rows_file.read_text()) if rows_file.exists() else {}
                result = written.get("done", {}).get(key, f"exit {proc.returncode}")
                tail = written.get("tracebacks", {}).get(key, proc.stderr.strip().splitlines()[-TAIL_LINES:])
            except subprocess.TimeoutExpired:
                tail, result = [], f"did not finish in {RERUN_TIMEOUT_S} s"
        outcome = {"how": how, "tail": tail}
        outcome.update({"error": result} if isinstance(result, str) else {"rows": result})
        outcomes.append(outcome)
    return outcomes


def report(name: str, command: str, done: dict[str, list[dict] | str], seconds: float,
           reruns: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """The results file; a part that raised shows its error and its reruns, one that has not run yet says so."""
    peak = peak_tflops(name)
    lines = [f"# GPU check: {name}", "",
             f"{describe(command, 'cuda' if torch.cuda.is_available() else None)} {seconds:.0f} s in all.", ""]
    for key, (title, _, rows_of) in PARTS.items():
        lines += [f"## {title}", ""]
        if key not in done:
            lines.append("Not run (not asked for, or the check stopped before this part).")
        elif isinstance(done[key], str):
            lines.append(f"**Failed:** {done[key]}")
            for outcome in (reruns or {}).get(key, []):
                lines += ["", f"Rerun in a fresh process with {outcome['how']}: "
                          + (f"**failed:** {outcome['error']}" if "error" in outcome else "**passed**:"), ""]
                lines += rows_of(outcome["rows"], peak) if "rows" in outcome else []
                if "error" in outcome and outcome["tail"]:
                    lines += ["```", *outcome["tail"], "```"]
        else:
            lines += rows_of(done[key], peak)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    """Run the three parts, rewriting the results file after each, so a check cut short still leaves its figures.

    A part that raises is recorded in the file (one that raised a device error is first rerun in fresh processes,
    ``RERUNS``) and the next one runs; the command then fails, naming it.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes, any device (what the test suite runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS),
                        help="run only these parts (a rerun of one that failed, e.g. with CUDA_LAUNCH_BLOCKING=1)")
    parser.add_argument("--no-cudnn-sdp", action="store_true", help="switch cuDNN's SDPA off (what a rerun tries)")
    parser.add_argument("--no-rerun", action="store_true", help="do not rerun a part that fails with a device error")
    parser.add_argument("--rows", type=Path, help="also write each part's rows or error, and traceback, as JSON")
    args = parser.parse_args(argv)
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("benchmarks.gpu needs a CUDA device (a CUDA build of torch); without one, run it with --tiny")
    sizes = TINY if args.tiny else FULL
    name = device_name(device)
    command = ("python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.md"
    start = time.perf_counter()
    done: dict[str, list[dict] | str] = {}
    reruns: dict[str, list[dict[str, Any]]] = {}
    tracebacks: dict[str, list[str]] = {}  # a failed part's last frames (a rerun's, to name the failing kernel)
    for key, (title, run, _) in PARTS.items():
        if key not in args.parts:
            continue
        began = time.perf_counter()
        try:
            done[key] = run(sizes, device)
        except Exception as error:  # noqa: BLE001 - recorded in the results file; the command still fails below
            done[key] = f"{type(error).__name__}: {error}"
            tracebacks[key] = traceback.format_exc().strip().splitlines()[-TAIL_LINES:]
            traceback.print_exc()
        if args.rows:
            args.rows.write_text(json.dumps({"done": done, "tracebacks": tracebacks}))
        print(f"[benchmarks.gpu] {title.split(':')[0]} done in {time.perf_counter() - began:.0f} s", file=sys.stderr,
              flush=True)
        path.write_text(report(name, command, done, time.perf_counter() - start, reruns))
        if isinstance(done[key], str) and device_error(done[key]) and not args.no_rerun:
            reruns[key] = rerun(key, args)
            path.write_text(report(name, command, done, time.perf_counter() - start, reruns))
    text = path.read_text()
    print(text)
    failed = [key for key, result in done.items() if isinstance(result, str)]
    if failed:
        raise RuntimeError(f"benchmarks.gpu: the {', '.join(failed)} part(s) failed; their errors are in {path}")
    return path


if __name__ == "__main__":
    main()
