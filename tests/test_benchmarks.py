"""The benchmark instruments measure what they claim: a benchmark that computes the wrong thing is worse than none.

Only correctness here (tiny sizes); timings and ratios live in ``benchmarks/``. Covered: the
loopback ring (the library's ``_RingAttention`` on one device) against fused SDPA, the peak-memory
tracker and the saved-activation counter against known allocations, the p2p/all-gather peak
difference in KV blocks, and the bytes cp_plugin's collectives count against the tensors actually
handed to gloo and against ``benchmarks.run``'s separate theory formula.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel, WanTransformer3DModel
from launcher import run_distributed

from benchmarks import blockwise, gpu, overlap, run, worker
from benchmarks.measure import PeakMemory, count_saved_activations, phase

MIB = 2**20


def _attention_inputs(ring: int, dtype: torch.dtype, seq: int = 256) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 2, seq, 32, generator=g).to(dtype) for _ in range(2))
    q, grad_out = (torch.randn(1, 2, seq // ring, 32, generator=g).to(dtype) for _ in range(2))
    return q, k, v, grad_out


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("ring", [2, 4])
@pytest.mark.parametrize("rotate", ["p2p", "allgather"])
@pytest.mark.parametrize("masked", [0.0, 0.3])
def test_loopback_ring_equals_fused_sdpa(dtype: torch.dtype, tol: float, ring: int, rotate: str, masked: float) -> None:
    """The library's ring on a loopback transport gives the fused SDPA's output and q/k/v gradients."""
    q, k, v, grad_out = _attention_inputs(ring, dtype)
    mask = blockwise.key_mask(1, k.shape[2], masked, k.device)
    got = blockwise.ring_step(q, k, v, grad_out, ring, rotate, mask)
    want = blockwise.fused_step(q, k, v, grad_out, mask)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert blockwise.max_rel_error(got, want) < tol
    # teeth: the error measure sees a wrong gradient (dk zeroed)
    truncated = (got[0], got[1], torch.zeros_like(got[2]), got[3])
    assert blockwise.max_rel_error(truncated, want) > 0.5


@pytest.mark.timeout(60)
def test_blockwise_benchmark_writes_its_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["blockwise", "--device", "cpu", "--dtype", "fp32", "--seq", "256", "--ring", "2", "--rotate", "p2p",
            "allgather", "--heads", "2", "--head-dim", "32", "--repeats", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    blockwise.main()
    table = (tmp_path / "blockwise_cpu.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 256 | 2 |")]
    assert len(rows) == 2 and all(float(row.split("|")[-2]) < 1e-5 for row in rows)  # the error column


@pytest.mark.timeout(120)
def test_the_gpu_check_runs_end_to_end_in_its_tiny_mode(tmp_path: Path) -> None:
    """``python -m benchmarks.gpu --tiny``: every part runs here, so the one-command GPU check cannot rot."""
    report = gpu.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]).read_text()
    kernels = [line for line in report.split("## 2.")[0].splitlines() if line.startswith(("| bf16", "| fp32"))]
    assert len(kernels) == 8 and all(line.endswith("| ok |") for line in kernels), kernels  # 2 x 2 ring, 2 x 2 masks
    assert {int(line.split("|")[3]) % 128 for line in kernels[4:]} == {64 + 3, 64}  # odd; 64 past a whole tile
    ring = [line for line in report.split("## 2.")[1].split("## 3.")[0].splitlines() if line.startswith("| 256")]
    assert len(ring) == 2 and all(float(row.split("|")[-2]) < 1e-5 for row in ring)  # unmasked, masked: errors
    steps = [line.split("|") for line in report.split("## 3.")[1].splitlines() if line.startswith(("| 256", "| 512"))]
    assert [row[2].strip() for row in steps] == list(gpu.FEATURES) * 2
    assert all(int(row[-2]) > 0 for row in steps if "tiling" in row[2])  # tiling ran (networks tiled)
    assert all(float(row[3]) > 0 and float(row[5]) > 0 for row in steps)  # a peak and a throughput were measured


@pytest.mark.timeout(240)
def test_a_failing_gpu_check_part_is_recorded_rerun_and_the_rest_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part that raises leaves its error in the results file, the later parts' figures, and a failed command. A
    device error leaves the process's CUDA context unusable, so that part is rerun in fresh processes: a passing
    rerun's figures and a failing one's last frames land in the file too."""
    def broken(sizes: gpu.Sizes, device: torch.device) -> list[dict]:
        raise RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`")

    title, _, rows_of = gpu.PARTS["ring"]
    monkeypatch.setitem(gpu.PARTS, "ring", (title, broken, rows_of))
    monkeypatch.setattr(gpu, "RERUNS", (("nothing changed", {}, []), ("an argument it does not take", {}, ["--bad"])))
    with pytest.raises(RuntimeError, match=r"the ring part\(s\) failed"):
        gpu.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    report = next(tmp_path.glob("gpu_*.md")).read_text()
    ring = report.split("## 2.")[1].split("## 3.")[0]
    assert "**Failed:** RuntimeError: CUDA error: CUBLAS_STATUS_EXECUTION_FAILED" in ring
    passed, failed = ring.split("Rerun in a fresh process with ")[1:]
    assert passed.startswith("nothing changed: **passed**:") and passed.count("| 256 |") == 2  # the rerun's figures
    assert failed.startswith("an argument it does not take: **failed:** exit 2") and "--bad" in failed  # its stderr
    assert "| 512 | checkpointing + tiling |" in report.split("## 3.")[1]  # the step part ran after it
    only = gpu.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--parts", "kernels"]).read_text()
    assert "| fp32 | none |" in only and only.count("Not run") == 2  # --parts: that part alone


def test_only_device_errors_are_rerun() -> None:
    """An error of the device's (its context is then unusable) is rerun in a fresh process; any other is not."""
    assert gpu.device_error("RuntimeError: CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`")
    assert gpu.device_error("RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")
    assert gpu.device_error("AcceleratorError: CUDA error: an illegal memory access was encountered")
    assert not gpu.device_error("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not gpu.device_error("ValueError: tile_tokens=0 must be a number of tokens >= 1")


@pytest.mark.timeout(120)
def test_a_step_that_runs_out_of_memory_is_a_row_of_the_gpu_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    """An option that does not fit at a length is that row's result; the other rows keep their figures (model
    TFLOP/s unknown where the plain step, which they are counted from, did not fit)."""
    plain_steps = iter(range(100))

    class OutOfMemoryAt512(gpu.FlopCounterMode):
        def __enter__(self):  # type: ignore[no-untyped-def]
            if next(plain_steps) == 1:  # the plain step at 512 tokens
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().__enter__()

    monkeypatch.setattr(gpu, "FlopCounterMode", OutOfMemoryAt512)
    steps = gpu.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--parts", "steps"]).read_text()
    rows = [line.split("|") for line in steps.splitlines() if line.startswith(("| 256", "| 512"))]
    assert [row[3].strip() for row in rows if row[1] == " 512 "][0] == "out of memory"
    assert [row[6].strip() == "n/a" for row in rows] == [False] * 3 + [False, True, True]
    assert all(float(row[3]) > 0 for row in rows if "memory" not in row[3])


def test_a_resumed_longest_search_says_which_rows_came_from_which_start() -> None:
    """``benchmarks.longest --resume`` keeps the rows measured before; the report says where each start ran."""
    from benchmarks.longest import in_order, layouts, provenance

    row = {"world": 1, "name": "single", "fits_seq": 1}
    assert provenance([{"provenance": "`a` on here.", "resumed": 0}, row]) == "`a` on here."
    later = {"world": 2, "name": "ring_p2p/sharded", "fits_seq": 2}
    stopped_then_resumed = [{"provenance": "`a` on here.", "resumed": 0}, row, {"provenance": "`a` later.", "resumed": 1},
                            later]
    assert provenance(stopped_then_resumed) == \
        "`a` on here. The rows of ring_p2p/sharded (2 ranks) come from a resumed start: `a` later."
    assert layouts(stopped_then_resumed) == [row, later]
    assert in_order([later, row]) == [row, later]  # by ranks, whatever order the starts measured them in
    older = provenance([row, row, {"provenance": "`a` later.", "resumed": 2}])  # a file from before starts were noted
    assert older.startswith("`a` later. The first 2 rows come from an earlier start")


def overlap_rows(seqs: list[int]) -> list[dict[str, float]]:
    """Rank body: ``benchmarks.overlap``'s measures at toy sizes."""
    import argparse

    args = argparse.Namespace(dtype="fp32", heads=2, head_dim=16, repeats=1)
    return [overlap.run_length(seq, args) for seq in seqs]


@pytest.mark.timeout(120)
def test_the_overlap_measures_are_consistent() -> None:
    """What the overlap benchmark reports holds together: a wait is part of its step, a serial step waits for
    every transfer, and the hidden share is one minus the exposed share of the transfer time."""
    for rows in run_distributed(overlap_rows, 2, [64, 256], timeout=90):
        for r in rows:
            assert 0 <= r["exposed_s"] <= r["step_s"] and r["serial_s"] > 0 and r["transfer_s"] > 0, r
            assert r["hidden"] == pytest.approx(1 - r["exposed_s"] / r["transfer_s"]), r
            assert r["kv_mib"] == pytest.approx(2 * r["seq"] // 2 * 2 * 16 * 4 / 2**20), r  # (2, 1, H, S/2, D) fp32
    with overlap.serial_transfers():  # restores the ring's own methods on exit
        pass
    assert overlap.RingComm.send_recv.__name__ == "send_recv"


@pytest.mark.timeout(30)
def test_peak_memory_tracks_allocations_and_frees() -> None:
    """Peak and live bytes of known allocations; views, in-place ops and earlier tensors add nothing."""
    before = torch.ones(MIB // 4)  # 1 MiB that exists before the block: not counted
    with PeakMemory() as peak:
        a = torch.empty(MIB // 4)  # 1 MiB
        a.add_(1)
        view = a.view(-1)[:10]
        before.mul_(2)
        b = torch.empty(MIB // 2)  # 2 MiB -> 3 MiB live
        del a, view
        assert peak.live == 2 * MIB
        c = torch.empty(MIB)  # 4 MiB -> 6 MiB live, the peak
        del b, c
        assert peak.live == 0
        x = torch.randn(MIB // 4, requires_grad=True)  # 1 MiB
        (x * 3).sum().backward()  # backward ops are seen: x.grad (1 MiB) stays
    assert peak.peak == 6 * MIB
    assert peak.live == 2 * MIB  # x and x.grad (the loss was freed)


@pytest.mark.timeout(30)
def test_peak_memory_names_what_was_live_at_the_peak_by_kind() -> None:
    """``at_peak`` splits the high-water mark by when each buffer was allocated: forward, a named phase, backward."""
    weight = torch.randn(MIB // 4, requires_grad=True)
    with PeakMemory() as peak:
        kept = weight * 2  # 1 MiB in the forward, saved by the product below
        loss = (kept * kept).sum()  # the product (1 MiB) is freed at once; the loss is 4 bytes
        with phase("communication"):
            received = torch.empty(2 * MIB)  # 8 MiB: the peak, 9 MiB and 4 bytes
        del received
        loss.backward()  # at most 3 MiB more: gradients
        with_backward = peak.live
    assert peak.at_peak == {"forward": MIB + 4, "communication": 8 * MIB}
    assert sum(peak.at_peak.values()) == peak.peak
    assert with_backward > MIB + 4  # the gradients were counted, as backward, after the peak


@pytest.mark.timeout(30)
def test_peak_memory_labels_the_tensors_live_at_the_peak() -> None:
    """``labelled``: what was live at the high-water mark, by kind, op and shape, adds up to the peak; a tensor freed
    before it is not there."""
    with PeakMemory(labelled=True) as peak:
        kept = torch.ones(MIB // 4) * 2  # 1 MiB, live at the peak
        freed = torch.zeros(MIB // 2)  # 2 MiB, freed before it
        del freed
        with phase("communication"):
            received = torch.empty(2, MIB // 2)  # 4 MiB: the peak, 5 MiB
        del received
    assert peak.labels_at_peak == {f"forward: aten.mul.Tensor {(MIB // 4,)}": MIB,
                                   f"communication: aten.empty.memory_format {(2, MIB // 2)}": 4 * MIB}
    assert sum(peak.labels_at_peak.values()) == peak.peak == 5 * MIB
    assert kept.numel()


@pytest.mark.timeout(30)
def test_saved_activations_count_forward_storages_once() -> None:
    """A storage saved by several ops counts once, parameters never, backward-time saves not at all."""
    layer = torch.nn.Linear(256, 256, bias=False)
    x = torch.randn(64, 256, requires_grad=True)
    with count_saved_activations(layer) as saved:
        h = layer(x)  # saves x (64 KiB) and the weight (excluded)
        y = (h * h).sum()  # saves h twice: one 64 KiB storage
        y.backward()
    assert saved.total == 2 * x.nbytes
    # teeth: a backward that recomputes (and saves) under grad does not count as held between passes

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):  # type: ignore[override]
            ctx.save_for_backward(t)
            return t * 2

        @staticmethod
        def backward(ctx, grad):  # type: ignore[override]
            (t,) = ctx.saved_tensors
            with torch.enable_grad():
                u = t.detach().requires_grad_()
                (again,) = torch.autograd.grad((u.exp() * u).sum(), u)
            return grad * 2 + 0 * again

    with count_saved_activations(layer) as saved:
        Recompute.apply(x).sum().backward()
    assert saved.total == x.nbytes


@pytest.mark.timeout(60)
def test_p2p_ring_peak_stays_flat_while_allgather_grows() -> None:
    """Theory: p2p holds two KV blocks (and a few dK/dV blocks) whatever the ring; all-gather holds
    every KV block and every dK/dV block, 2r blocks. Measured in KV-block units on the loopback ring: p2p
    peaks at 8.0 on rings of 8 and 16 (7.5 on a ring of 4), all-gather grows by 2 a rank."""
    seq = 512

    def blocks(ring: int, rotate: str) -> float:
        q, k, v, grad_out = _attention_inputs(ring, torch.float32, seq)
        with PeakMemory() as peak:
            blockwise.ring_step(q, k, v, grad_out, ring, rotate, record=False)
        return peak.peak / (2 * k.nbytes / ring)

    p2p, allgather = {r: blocks(r, "p2p") for r in (8, 16)}, {r: blocks(r, "allgather") for r in (4, 8)}
    assert abs(p2p[16] - p2p[8]) < 0.25
    assert allgather[8] - allgather[4] > 2 * (8 - 4) - 0.25
    assert allgather[8] - p2p[8] > 2 * 8 - 8


def _count_handed_bytes(layouts: list[str], seq: int) -> list[dict[str, Any]]:
    """Rank body: each layout's counted bytes, the bytes of the tensors gloo was handed, and theory."""
    handed: list[int] = []
    rank, world = dist.get_rank(), dist.get_world_size()
    import cp_plugin.comm as comm

    # where cp_plugin.comm finds each collective: torch.distributed, or its compat names for the renamed ones
    homes = {"all_to_all_single": dist, "batch_isend_irecv": dist, "all_gather_single": comm,
             "reduce_scatter_single": comm}
    originals = {name: getattr(home, name) for name, home in homes.items()}

    def recorder(name: str):  # type: ignore[no-untyped-def]
        def call(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            size, me = dist.get_world_size(group), dist.get_rank(group)
            if name == "batch_isend_irecv":  # bytes this rank sends: its isend ops' tensors
                handed.append(sum(op.tensor.nbytes for op in args[0] if op.op is dist.isend))
            elif name == "all_gather_single":  # our tensor, to every peer
                handed.append(args[1].nbytes * (size - 1))
            else:  # dim-0 chunks addressed to the other ranks
                handed.append(args[1].nbytes - args[1].chunk(size)[me].nbytes)
            return originals[name](*args, **kwargs)

        return call

    for name, home in homes.items():
        setattr(home, name, recorder(name))
    results = []
    for name in layouts:
        layout = worker.layouts_for(world)[name]
        model, mesh = worker.build(layout)
        handed.clear()
        worker.COMM_STATS.reset()
        worker.step_fn(model, worker.inputs_for(layout, seq, mesh))()
        record = {**worker.asdict(layout), "seq": seq}
        results.append({"name": name, "counted": worker.COMM_STATS.bytes_sent, "handed": sum(handed),
                        "theory": run.theoretical_bytes(record), "rank": rank})
    return results


@pytest.mark.timeout(60)
def test_counted_bytes_are_the_tensors_handed_to_gloo_and_match_theory() -> None:
    """Forward and backward: COMM_STATS equals the bytes of the tensors handed to each collective,
    and both equal run.theoretical_bytes (a separate formula), on both paths."""
    layouts = ["ulysses/module", "ulysses/sharded", "ring_p2p/module", "ring_allgather/sharded"]
    for rank_results in run_distributed(_count_handed_bytes, 2, layouts, 64, timeout=50):
        for result in rank_results:
            assert result["counted"] > 0 and result["counted"] == result["handed"], result
            assert result["counted"] == pytest.approx(result["theory"], rel=1e-9), result


def test_layout_names_turn_memory_options_on() -> None:
    """``+ckpt``, ``+sac`` (checkpointing that keeps attention outputs) and ``+tile`` in a benchmark layout's name."""
    layouts = worker.layouts_for(2)
    sac = worker.layout_named(layouts, "ulysses/sharded+sac+tile", blocks=2)
    assert (sac.checkpointing, sac.checkpoint_policy, sac.tiling, sac.blocks) == (True, "save_attention", True, 2)
    full = worker.layout_named(layouts, "ring_p2p/sharded+ckpt")
    assert (full.checkpointing, full.checkpoint_policy, full.tiling) == (True, "full", False)
    with pytest.raises(ValueError, match=r"optionally with \+ckpt or \+sac"):
        worker.layout_named(layouts, "ulysses/sharded+selective")
    assert worker.layout_named(layouts, "single+tile+lora").lora and not full.lora


def _lora_cases(out_dir: str) -> list[dict[str, Any]]:
    layouts = worker.layouts_for(1)
    cases = [worker.run_case(worker.layout_named(layouts, name), 2304, 1, Path(out_dir))
             for name in ("single+lora", "single+lora+tile")]
    layout = worker.layout_named(layouts, "single+lora+tile")
    model, mesh = worker.build(layout)
    step = worker.step_fn(model, worker.inputs_for(layout, 2304, mesh))
    with PeakMemory() as peak:
        step()
    return [*cases, {"plain_peak": peak.peak, "measured_peak": worker.measured_step(model, step)[1]["peak_bytes"]}]


@pytest.mark.timeout(120)
def test_a_lora_layout_trains_adapters_on_a_frozen_base_and_tiles_them(tmp_path: Path) -> None:
    """``+lora``: the base is frozen and only adapters train; the plain one-process step is the reference of the tiled
    one (written by ``single+lora``), which matches it and, its MLPs' hidden layers never whole, holds less."""
    model, _ = worker.build(worker.layout_named(worker.layouts_for(1), "single+lora"))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert any("proj_mlp.lora_A" in name for name in trained)  # the MLPs' layers too
    reference, tiled, peaks = run_distributed(_lora_cases, 1, str(tmp_path), timeout=100)[0]
    assert tiled["grad_rel_err"] <= 1e-5 and tiled["out_rel_err"] <= 1e-5, tiled
    # the instrument's step peaks as an uninstrumented one: counting saved activations takes a step of its own
    assert peaks["measured_peak"] == peaks["plain_peak"], peaks
    assert tiled["peak_bytes"] < 0.8 * reference["peak_bytes"], (tiled["peak_bytes"], reference["peak_bytes"])


def test_the_flop_count_of_tiling_sees_its_recompute_on_the_meta_device() -> None:
    """``benchmarks.tiling_flops`` counts a tiled step on the meta device: more operations than untiled by at least
    one more forward of each chunk's first layer, for a feed-forward network (Wan's) and for an MLP a block writes
    inline (Flux's single-stream block, which the option leaves alone under a global forward hook: a counter that
    tracks modules with one would count it untiled); with tiling acting on nothing (a call below 2048 tokens), the
    same count."""
    from benchmarks.tiling_flops import FRAME, counted, flux_step, wan_step

    with torch.device("meta"):
        wan = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                    text_dim=32, freq_dim=16, ffn_dim=128, num_layers=1)
        flux = FluxTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=0,
                                      num_single_layers=1, joint_attention_dim=32, pooled_projection_dim=32,
                                      axes_dims_rope=(4, 6, 6))
    flux_forward = flux_step(dict(flux.config), 8)
    for model, forward, tokens, up_projection in (
            (wan, wan_step, 4 * FRAME, 2 * 4 * FRAME * 32 * 128),
            (flux, flux_forward, 4096, 2 * (4096 + 8) * 32 * 128)):  # Flux's MLP runs over text and image tokens
        untiled, tiled = (counted(model, forward, tokens, False, tiling) for tiling in (False, True))
        assert tiled - untiled >= up_projection, (type(model).__name__, tiled, untiled)
        assert tiled / untiled < 1.5
    assert counted(wan, wan_step, FRAME, False, True) == counted(wan, wan_step, FRAME, False, False)
    # with adapters (their rows of the table), checkpointed or not: each chunk runs the adapted layers again
    from benchmarks.tiling_flops import LORA_RANK, LORA_TARGETS
    from recipe.lora import LoraSettings, add_lora

    add_lora(flux, LoraSettings(rank=LORA_RANK, target_modules=LORA_TARGETS))
    for checkpointing in (False, True):
        untiled, tiled = (counted(flux, flux_forward, 4096, checkpointing, tiling) for tiling in (False, True))
        assert untiled < tiled < 1.5 * untiled, (checkpointing, tiled, untiled)


@pytest.mark.parametrize("start", [4, 40, 120, 400])
@pytest.mark.parametrize("boundary", [0, 4, 116, 120, 1000])
def test_the_search_brackets_the_longest_length_that_fits_from_any_start(start: int, boundary: int) -> None:
    """``worker.bracket`` returns the longest side within the budget and the next side step over it, both measured,
    from an estimate below, at or far above the boundary (0: not even the shortest fits), in few probes."""
    measured: list[int] = []

    def peak(side: int) -> int:  # grows with the side: within the budget (100) up to ``boundary``
        measured.append(side)
        return 100 if side <= boundary else 101

    fits, over = worker.bracket(peak, start, budget=100)
    assert (fits, over) == (boundary, boundary + worker.SIDE_STEP)
    assert over in measured and (fits in measured or fits == 0)
    ratio = max(start, boundary, 1) // max(min(start, boundary), 1)
    assert len(measured) <= ratio.bit_length() + (max(start, boundary) // worker.SIDE_STEP).bit_length() + 2, measured


@pytest.mark.parametrize(("start", "first_tiled", "expected"), [
    (40, None, (100, 104)),  # no tiling: the boundary as bracket finds it
    (40, 120, (148, 152)),  # tiled from 120, a step peaks 50 lower: it fits again there, up to 148
    (200, 120, (148, 152)),  # from an estimate in the tiled lengths, the same
    (40, 200, (100, 104)),  # tiled from 200, 50 lower is still over the budget: nothing longer fits
    (40, 100, (148, 152)),  # the boundary found lies beyond the first tiled side already
])
def test_the_search_finds_the_longest_fit_beyond_where_tiling_turns_on(
        start: int, first_tiled: int | None, expected: tuple[int, int]) -> None:
    """With tiling, a step's peak falls where every call starts being tiled (chunks chosen per call: from 2048 tokens a
    rank), so a length just below that side can be over the budget while longer ones fit: ``worker.longest_fitting``
    searches the tiled lengths too (budget 100, peak = side, 50 less from ``first_tiled`` on)."""
    def peak(side: int) -> int:
        return side - (50 if first_tiled is not None and side >= first_tiled else 0)

    assert worker.longest_fitting(peak, start, 100, first_tiled) == expected


def test_the_first_tiled_side_gives_each_rank_the_tokens_tiling_starts_at() -> None:
    """4 ranks reach 2048 image tokens each from 8192: side 92 (8464 tokens), the next multiple of the side step; a
    layout without tiling has no such side."""
    assert worker.first_tiled_side(worker.layout_named(worker.layouts_for(4), "ring_p2p/sharded+ckpt+tile")) == 92
    assert worker.first_tiled_side(worker.layout_named(worker.layouts_for(1), "single+ckpt+tile")) == 48
    assert worker.first_tiled_side(worker.layout_named(worker.layouts_for(2), "ulysses/sharded+ckpt")) is None


def test_the_tiling_options_parts_add_up_to_the_option_and_each_saves_memory() -> None:
    """``benchmarks.tiling_parts`` applies the tiling option a part at a time: all of its parts count the same
    operations as the option itself (``benchmarks.tiling_flops``), each part adds operations, and on a real step each
    lowers the peak (2304 tokens: tiled from 2048)."""
    from benchmarks.tiling_flops import counted, flux_step
    from benchmarks.tiling_parts import operations, peak
    from cp_plugin.memory import TILING_PARTS

    with torch.device("meta"):
        flux = FluxTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=1,
                                      num_single_layers=1, joint_attention_dim=32, pooled_projection_dim=32,
                                      axes_dims_rope=(4, 6, 6))
    forward = flux_step(dict(flux.config), 8)
    parts = range(len(TILING_PARTS) + 1)
    for checkpointing in (False, True):
        counts = [operations(flux, forward, 4096, checkpointing, part) for part in parts]
        assert counts[0] == counted(flux, forward, 4096, checkpointing, tiling=False)
        assert counts[-1] == counted(flux, forward, 4096, checkpointing, tiling=True), (checkpointing, counts)
        assert counts == sorted(counts) and counts[1] > counts[0], (checkpointing, counts)
    peaks = [peak(2304, False, part, blocks=1) for part in parts]
    assert all(later < earlier for earlier, later in zip(peaks, peaks[1:])), peaks
