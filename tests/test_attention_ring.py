"""Ring attention (alone, and inside Ulysses) equals full-sequence SDPA: outputs and q/k/v grads.

The per-device kernels and the LSE merge are checked in-process first. The distributed checks
run real gloo processes, one launch per world size: every layout, dtype and mask of that world
size runs in sequence inside it (results cached per module), and the tests below only compare.
The reference is ``scaled_dot_product_attention`` over the whole sequence in float64, in the
parent process, on the same (dtype-rounded) inputs the ranks see.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from launcher import run_distributed
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from benchmarks.loopback import LoopbackRing
from benchmarks.measure import PeakMemory
from cp_plugin import ParallelConfig, ParallelMesh
from cp_plugin.attention import context_parallel_attention, kernels
from cp_plugin.attention.kernels import additive_mask, attention_backward, attention_forward, check_dtype, merge_partial
from cp_plugin.attention.masks import DenseTiles
from cp_plugin.attention.ring import _RingAttention, heads_per_pass, ring_attention
from cp_plugin.comm import COMM_STATS

B, S, H, D = 2, 64, 4, 16
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


# ---------------------------------------------------------------------------------------------
# data and reference


def full_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v, grad_out over the whole sequence ``(B, S, H, D)``, seeded, rounded to ``dtype``."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, S, H, D, generator=g).to(dtype) for _ in range(4))


def key_mask() -> torch.Tensor:
    """Sample 0 drops random keys; sample 1 drops the whole first half (fully masked ring blocks)."""
    mask = torch.rand(B, S, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[1, : S // 2] = False
    return mask


def frame_causal() -> torch.Tensor:
    """``(1, S, S)``: frames of 12 tokens (across the shards' edges), each attending itself and earlier frames."""
    frames = torch.arange(S) // 12
    return (frames[:, None] >= frames[None, :])[None]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA in the ``(B, S, H, D)`` layout, with an optional boolean key mask ``(B, S_k)`` or ``(B, S_q, S_k)``."""
    bias = None if mask is None else mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=bias).transpose(1, 2)


@functools.lru_cache
def reference(dtype: torch.dtype, masked: bool, tiled: bool = False) -> tuple[torch.Tensor, ...]:
    """Full-sequence output and q/k/v grads in float64, from the inputs as rounded to ``dtype``."""
    q, k, v, grad_out = (x.double().requires_grad_(i < 3) for i, x in enumerate(full_inputs(dtype)))
    mask = key_mask() if masked else None
    if tiled:
        mask = frame_causal() if mask is None else frame_causal() & mask[:, None, :]
    out = sdpa(q, k, v, mask)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


# ---------------------------------------------------------------------------------------------
# one launch per world size


class Case(NamedTuple):
    ring: int
    ulysses: int
    rotate: str = "p2p"
    dtype: torch.dtype = torch.float32
    fp32_merge: bool = True
    masked: bool = False
    tiled: bool = False  # a frame-causal mask over the whole sequence, read in tiles of a few keys
    batch: int = B  # the first samples only (batch 1: Ulysses receives straight into its result)
    heads: int | None = None  # ring_heads_per_pass; None chooses: one head a pass here (one thread per rank)


def _layouts(world: int) -> list[tuple[int, int, str]]:
    """Every ring layout of ``world`` ranks with both rotate methods, plus Ulysses alone."""
    ring_layouts = [(world, 1), (2, world // 2)] if world > 2 else [(world, 1)]
    return [(r, u, rotate) for r, u in ring_layouts for rotate in ("p2p", "allgather")] + [(1, world, "p2p")]


def cases(world: int) -> list[Case]:
    fp32 = [Case(r, u, rotate, masked=masked) for masked in (False, True) for r, u, rotate in _layouts(world)]
    fp32 += [Case(r, u, rotate, masked=True, tiled=True) for r, u, rotate in _layouts(world)]
    fp32 += [Case(r, u, masked=masked, batch=1) for r, u, _ in _layouts(world) if u > 1 for masked in (False, True)]
    fp32 += [Case(r, u, rotate, masked=masked, tiled=tiled, heads=H) for r, u, rotate in _layouts(world) if r > 1
             for masked, tiled in ((False, False), (True, False), (True, True))]  # every head in one pass
    low = [Case(world, 1, "p2p", dtype) for dtype in (torch.bfloat16, torch.float16)]
    low += [Case(2, world // 2, "allgather", torch.bfloat16), Case(world, 1, "p2p", torch.bfloat16, fp32_merge=False)]
    fp64 = [Case(r, u, rotate, torch.float64, heads=heads) for r, u, rotate in _layouts(world) if r > 1
            for heads in (None, H)]
    return fp32 + low + fp64


def run_cases(world_cases: list[Case]) -> list[dict[str, Any]]:
    """Rank body: each case's local output and q/k/v grads, bytes saved for backward, bytes sent."""
    from cp_plugin.attention import masks, ring

    ring.tile_keys = lambda q, per_head: 5  # tiles of 5 keys and 20 queries: tile edges inside every ring block
    masks.DENSE_BLOCK = 4  # the frames of 12 tokens are whole blocks: tiles that attend nothing or all are known
    kernel, computed = ring.attention_forward, [0]

    def counted(q: torch.Tensor, k: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        computed[0] += q.shape[1] * q.shape[2] * k.shape[2]  # query-key pairs of each head the forward kernels compute
        return kernel(q, k, *args)

    ring.attention_forward = counted
    results = []
    for case in world_cases:
        config = ParallelConfig(
            ring_degree=case.ring, ulysses_degree=case.ulysses, rotate_method=case.rotate,
            convert_to_fp32=case.fp32_merge, ring_heads_per_pass=case.heads,
        )
        mesh = ParallelMesh.build(config, "cpu")
        shard = slice(mesh.cp_rank * S // mesh.cp_size, (mesh.cp_rank + 1) * S // mesh.cp_size)
        q, k, v, grad_out = (x[: case.batch, shard].clone() for x in full_inputs(case.dtype))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        saved: dict[int, int] = {}  # storage -> bytes: a small view of a large buffer keeps all of it alive

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        COMM_STATS.reset()
        computed[0] = 0
        mask = key_mask()[: case.batch, shard] if case.masked else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), PeakMemory() as forward:
            tiles = DenseTiles(frame_causal()) if case.tiled else None
            out = context_parallel_attention(q, k, v, mesh, key_mask=mask, tiles=tiles)
        with PeakMemory() as backward:
            out.backward(grad_out)
        results.append({"case": case, "shard": shard, "tensors": (out.detach(), q.grad, k.grad, v.grad),
                        "saved": sum(saved.values()), "sent": dict(COMM_STATS.by_kind), "computed": computed[0],
                        "allocated": (forward.allocated, backward.allocated)})
    return results


@functools.lru_cache
def launch(world: int) -> dict[Case, list[dict[str, Any]]]:
    """All cases of ``world`` ranks in one launch, as ``{case: [rank 0 result, rank 1 result, ...]}``."""
    world_cases = cases(world)
    per_rank = run_distributed(run_cases, world, world_cases, timeout=100)
    return {case: [rank[i] for rank in per_rank] for i, case in enumerate(world_cases)}


def rel_errors(case: Case, ranks: list[dict[str, Any]]) -> list[float]:
    """Max error of out, dq, dk, dv against the reference, each relative to the reference's max."""
    expected = reference(case.dtype, case.masked, case.tiled)
    errors = [0.0] * 4
    for result in ranks:
        for i, (got, want) in enumerate(zip(result["tensors"], expected)):
            assert got.dtype == case.dtype
            want = want[: case.batch]
            part = want[:, result["shard"]]
            errors[i] = max(errors[i], float((got.double() - part).abs().max() / want.abs().max()))
    return errors


def local_only_error(world: int) -> float:
    """Error of attending to the local shard alone: what a ring that moved nothing would give."""
    q, k, v, _ = full_inputs(torch.float64)
    local = sdpa(*(x[:, : S // world] for x in (q, k, v)))
    expected = reference(torch.float64, False)[0]
    return float((local - expected[:, : S // world]).abs().max() / expected.abs().max())


WORLDS = pytest.mark.parametrize("world", [2, 4])


# ---------------------------------------------------------------------------------------------
# per-device kernels and the merge (one process)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("ring", "per_pass", "bound"), [(2, 2, 10), (3, 2, 12), (2, 1, 7.5), (3, 1, 8.5), (4, 1, 9.5)])
def test_ring_backward_lets_go_of_blocks_it_is_done_with(ring: int, per_pass: int, bound: float) -> None:
    """The ring's backward under a checkpoint (ring rank 0 over a loopback ring, so no gloo thread decides when a
    buffer is freed) peaks at 10 shards of one of q, k, v on a ring of 2: the recomputed q, k and v, the received
    block, the merged output, dq's accumulator and one kernel call's dq, dk and dv. Nothing else holds our own block
    once the ring has moved past it, nor the last block once it is done with: a name left bound to our own block makes
    the peak 12, to the last block 11. On a ring of 3 it peaks at 12: a block's dK/dV, once sent on, are not held
    beside the next block's (14). One head a pass (of two), the blocks in flight and the kernels' outputs are half
    the size, and each group's own block travels from where its dK/dV then go, in its place: 7.5 shards on a ring of
    2, 8.5 on a ring of 3, 9.5 on a ring of 4 (its dK/dV kept beside it: 8.5, 9.5 and 10.5)."""
    torch.manual_seed(0)
    batch, seq, heads, dim = 1, 512 * ring, 2, 16
    k, v = (torch.randn(batch, seq, heads, dim) for _ in range(2))
    q0, k0, v0 = (torch.randn(batch, seq // ring, heads, dim, requires_grad=True) for _ in range(3))
    loop = LoopbackRing(0, ring, k, v, record=False)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # made inside the checkpoint, so the recomputed q, k and v are held by the saved tensors alone
        return _RingAttention.apply(q * 1, k * 1, v * 1, None, None, loop, dim**-0.5, "p2p", True, per_pass)

    out = checkpoint(attend, q0, k0, v0, use_reentrant=False)
    grad = torch.randn_like(out)
    with PeakMemory() as backward:
        out.backward(grad)
    assert backward.peak / q0.nbytes < bound + 0.5, f"the backward peaks at {backward.peak / q0.nbytes:.2f} shards"
    assert q0.grad is not None and float(q0.grad.abs().max()) > 0


@pytest.mark.parametrize(("threads", "batch", "most", "want"),
                         [(1, 1, None, 1), (2, 1, None, 2), (4, 1, None, 6), (4, 2, None, 2), (8, 1, 4, 3),
                          (8, 1, 1, 1), (1, 1, 10, 6)])
def test_a_pass_takes_the_fewest_heads_that_keep_every_thread_busy(threads: int, batch: int, most: int | None,
                                                                   want: int) -> None:
    """Of 6 heads, a pass takes the fewest (a divisor of 6) with a (batch, head) pair per thread, which the CPU
    kernel's backward runs in parallel; ``ring_heads_per_pass`` caps it at the largest divisor not above it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert kernels.kernel_lanes("cpu") == threads
    finally:
        torch.set_num_threads(before)
    assert heads_per_pass(torch.empty(batch, 8, 6, 4), most, threads) == want


@pytest.mark.parametrize("most", [1, 2, 4, None])
def test_the_output_of_heads_taken_in_groups_merges_its_heads_without_a_copy(most: int | None) -> None:
    """A processor merges the heads of the ring's output (``out.flatten(2, 3)``) and projects it, and the projection
    saves what it takes: laid out as the queries are, that merge is a view of the output the ring saves for its own
    backward, so the output is held once (not the saved output and a copy beside it), in groups as in one pass."""
    q, k, v = (torch.randn(1, 64, 4, 8) for _ in range(3))
    out = ring_attention(q, k, v, group=None, most_heads=most)
    merged = out.flatten(2, 3)
    assert merged.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
                               .transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_kernels_give_sdpa_lse_and_grads(dtype: torch.dtype) -> None:
    q, k, v, grad_out = (x.transpose(1, 2) for x in full_inputs(dtype))
    scale = D**-0.5
    out, lse = attention_forward(q, k, v, scale)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, S)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    want = F.scaled_dot_product_attention(q64, k64, v64, scale=scale)
    want.backward(grad_out.double())
    want_lse = torch.logsumexp(q64.detach() @ k64.detach().transpose(-1, -2) * scale, dim=-1)
    tol = TOL[dtype]
    assert float((lse - want_lse).abs().max() / want_lse.abs().max()) < tol
    grads = attention_backward(grad_out, q, k, v, out, lse, scale)
    for got, ref in zip((out, *grads), (want.detach(), q64.grad, k64.grad, v64.grad)):
        assert got.dtype == dtype
        assert float((got.double() - ref).abs().max() / ref.abs().max()) < tol


@pytest.mark.timeout(30)
def test_lse_merge_of_blocks_is_full_attention() -> None:
    """Two KV blocks merged by LSE give the full output; per-block grads from the merged out/lse add up."""
    q, k, v, grad_out = (x.transpose(1, 2).double() for x in full_inputs(torch.float64))
    scale = D**-0.5
    blocks = [(k[:, :, i : i + S // 2], v[:, :, i : i + S // 2]) for i in (0, S // 2)]
    out = lse = None
    for kb, vb in blocks:
        out, lse = merge_partial(out, lse, *attention_forward(q, kb, vb, scale))
    lse = lse.squeeze(-1)
    full_out, full_lse = attention_forward(q, k, v, scale)
    assert torch.allclose(out, full_out, atol=1e-12) and torch.allclose(lse, full_lse, atol=1e-12)
    # teeth: a single block is far from the full answer
    assert float((attention_forward(q, *blocks[0], scale)[0] - full_out).abs().max()) > 1e-2
    per_block = [attention_backward(grad_out, q, kb, vb, out, lse, scale) for kb, vb in blocks]
    dq, dk, dv = attention_backward(grad_out, q, k, v, full_out, full_lse, scale)
    assert torch.allclose(sum(g[0] for g in per_block), dq, atol=1e-12)
    assert torch.allclose(torch.cat([g[1] for g in per_block], 2), dk, atol=1e-12)
    assert torch.allclose(torch.cat([g[2] for g in per_block], 2), dv, atol=1e-12)
    # convert_to_fp32=False: the merge keeps the accumulator in the inputs' dtype (LSE stays fp32)
    lse32 = full_lse.float()
    half_out, half_lse = merge_partial(full_out.bfloat16(), lse32[..., None], full_out.bfloat16(), lse32)
    assert half_out.dtype == torch.bfloat16 and half_lse.dtype == torch.float32


class _RecordCalls(TorchDispatchMode):
    """Record every ATen op called, with its arguments (to see what the CUDA branch passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("dtype", "head_dim", "masked", "kernel"),
    [
        (torch.bfloat16, 64, False, "_scaled_dot_product_flash_attention"),
        (torch.float32, 64, False, "_scaled_dot_product_efficient_attention"),
        (torch.float16, 74, False, "_scaled_dot_product_efficient_attention"),
        (torch.bfloat16, 64, True, "_scaled_dot_product_efficient_attention"),
        (torch.bfloat16, 64, False, "_scaled_dot_product_cudnn_attention"),
        (torch.bfloat16, 64, True, "_scaled_dot_product_cudnn_attention"),
    ],
)
def test_non_cpu_branch_follows_the_aten_schemas(
    dtype: torch.dtype, head_dim: int, masked: bool, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA branch on meta tensors: kernel choice, schema-valid calls, shapes, dense (not varlen) backward.

    This checks the plumbing only; the CUDA kernels' numbers come from ``benchmarks.blockwise`` on a GPU
    (``benchmarks/results/blockwise_cuda.md``). cuDNN stands in for a GPU that has it (Hopper).
    """
    monkeypatch.setattr(kernels, "_cudnn_serves", lambda device: "cudnn" in kernel)
    q, k, v, grad_out = (torch.empty(B, H, S, head_dim, dtype=dtype, device="meta") for _ in range(4))
    bias = additive_mask(torch.ones(B, S, dtype=torch.bool, device="meta"), q, k) if masked else None
    with _RecordCalls() as recorded:
        out, lse = attention_forward(q, k, v, 0.1, bias)
        grads = attention_backward(grad_out, q, k, v, out, lse, 0.1, bias)
    names = [func.__name__.split(".")[0] for func, _ in recorded.calls]
    assert kernel in names and f"{kernel}_backward" in names, names
    assert out.shape == q.shape and lse.shape == (B, H, S) and lse.dtype == torch.float32
    assert all(g.shape == q.shape and g.dtype == dtype for g in grads)
    backward_args = next(args for func, args in recorded.calls if func.__name__.startswith(f"{kernel}_backward"))
    if kernel.endswith("flash_attention"):
        assert backward_args[6] is None and backward_args[7] is None  # cum_seq_q/k undefined: dense kernel
    elif kernel.endswith("cudnn_attention"):
        assert (backward_args[8] is None) == (not masked)  # the key mask's bias, the forward's own
        assert backward_args[9:11] == (None, None)  # cum_seq_q/k undefined: dense kernel
        assert backward_args[5].shape == (B, H, S, 1)  # the merged LSE in cuDNN's own layout
        # S % 128 == 64: with a bias its backward gets whole 128-key tiles (pytorch/pytorch#196678), without one S
        tiled = -(-S // 128) * 128 if masked else S
        assert backward_args[2].shape[2] == backward_args[3].shape[2] == backward_args[12] == tiled
        assert not masked or backward_args[8].shape == (B, H, S, tiled)
    else:
        assert (backward_args[4] is None) == (not masked)  # attn_bias undefined unless there is a mask


@pytest.mark.parametrize("shape", [(2, 2007), (2, 333, 777)])
def test_a_cuda_bias_rows_start_aligned_at_any_key_count(shape: tuple[int, ...]) -> None:
    """CUDA's memory-efficient kernel refuses a bias whose rows are not aligned (seen on an H100 at 2007 keys):
    the rows are laid out at a multiple of 16 whatever the key count (meta stands in for CUDA without cuDNN)."""
    keys, queries = shape[-1], shape[1] if len(shape) == 3 else 5
    q = torch.empty(2, 3, queries, 16, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 3, keys, 16, dtype=torch.bfloat16, device="meta")
    bias = kernels._full_size(additive_mask(torch.ones(shape, dtype=torch.bool, device="meta"), q, k), q, k)
    assert bias.shape == (2, 3, queries, keys)
    assert bias.stride(0) % 16 == 0 and bias.stride(2) % 16 == 0 and bias.stride(3) == 1


@pytest.mark.parametrize("per_query", [False, True])
def test_whole_key_tiles_add_keys_that_change_nothing(per_query: bool) -> None:
    """The keys cuDNN's backward with a bias is padded with (to whole 128-key tiles, pytorch/pytorch#196678) are
    masked zeros: over them the CPU kernel gives the same output, LSE and gradients, and zero dk, dv for them."""
    g = torch.Generator().manual_seed(0)
    keys = 192  # 64 past a whole tile
    q, grad = (torch.randn(B, H, S, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H, keys, D, generator=g) for _ in range(2))
    mask = torch.rand((B, S, keys) if per_query else (B, keys), generator=g) > 0.4
    mask[..., 0] = True
    bias = additive_mask(mask, q, k)
    out, lse = attention_forward(q, k, v, 0.25, bias)
    grads = attention_backward(grad, q, k, v, out, lse, 0.25, bias)
    k_tiled, v_tiled, bias_tiled = kernels.whole_key_tiles(k, v, bias)
    assert k_tiled.shape[2] == v_tiled.shape[2] == bias_tiled.shape[-1] == 256
    tiled_out, tiled_lse = attention_forward(q, k_tiled, v_tiled, 0.25, bias_tiled)
    dq, dk, dv = attention_backward(grad, q, k_tiled, v_tiled, out, lse, 0.25, bias_tiled)
    torch.testing.assert_close((tiled_out, tiled_lse, dq, dk[:, :, :keys], dv[:, :, :keys]), (out, lse, *grads))
    assert not dk[:, :, keys:].any() and not dv[:, :, keys:].any()


def test_dtypes_no_kernel_takes_are_named_with_a_fix() -> None:
    """float64 rings run on CPU; on an accelerator (meta stands in) the error names the precision to use."""
    check_dtype(torch.empty(1, dtype=torch.float64))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_dtype(torch.empty(1, dtype=dtype, device="meta"))
    with pytest.raises(ValueError, match=r"ring attention on meta takes .*got torch.float64.*precision='32-true'"):
        check_dtype(torch.empty(1, dtype=torch.float64, device="meta"))


# ---------------------------------------------------------------------------------------------
# distributed: ring, ring x Ulysses, Ulysses; both rotate methods


@pytest.mark.timeout(150)
@WORLDS
def test_fp32_layouts_match_full_sequence_sdpa(world: int) -> None:
    """Ring, ring x Ulysses and Ulysses, p2p and allgather, with and without key masks: within 1e-5."""
    results = launch(world)
    fp32 = [case for case in results if case.dtype == torch.float32]
    assert {(c.ring, c.ulysses, c.rotate) for c in fp32} == set(_layouts(world))
    for case in fp32:
        assert max(rel_errors(case, results[case])) < TOL[torch.float32], case
    assert local_only_error(world) > 1000 * TOL[torch.float32]  # teeth: moving no KV is far off


@pytest.mark.timeout(150)
@WORLDS
def test_tiles_a_mask_leaves_out_are_not_computed(world: int) -> None:
    """Over the frame-causal mask (which attends 59% of the query-key pairs), the ranks' forward kernels compute
    fewer pairs than every query against every key: the tiles that attend nothing are skipped, yet the results
    match (the test above)."""
    results = launch(world)
    tiled = [case for case in results if case.tiled]
    assert tiled
    for case in tiled:
        computed = sum(rank["computed"] for rank in results[case])
        whole = H * S * S  # every pair of every head
        assert computed < 0.85 * whole, (case, computed, whole)


@pytest.mark.timeout(150)
@WORLDS
def test_fp64_ring_is_exact(world: int) -> None:
    """In float64 the only error left is rounding: the blockwise algorithm itself is exact."""
    results = launch(world)
    for case in (c for c in results if c.dtype == torch.float64):
        assert max(rel_errors(case, results[case])) < TOL[torch.float64], case


@pytest.mark.timeout(150)
@WORLDS
def test_half_precision_inputs_merge_in_fp32(world: int) -> None:
    """bf16/fp16 shards (rounding of ~4e-3 / 5e-4 per value) stay within a few roundings of float64."""
    results = launch(world)
    low = [c for c in results if c.dtype in (torch.bfloat16, torch.float16) and c.fp32_merge]
    assert {c.dtype for c in low} == {torch.bfloat16, torch.float16}
    for case in low:
        assert max(rel_errors(case, results[case])) < TOL[case.dtype], case
    assert local_only_error(world) > 10 * TOL[torch.bfloat16]  # teeth: moving no KV is far off
    # convert_to_fp32 matters: merging the partial outputs in bf16 rounds once per ring step.
    fp32_merge, bf16_merge = (Case(world, 1, "p2p", torch.bfloat16, fp32_merge=f) for f in (True, False))
    assert rel_errors(bf16_merge, results[bf16_merge])[0] > 1.5 * rel_errors(fp32_merge, results[fp32_merge])[0]


@pytest.mark.timeout(150)
@WORLDS
def test_ring_saves_only_the_local_shard(world: int) -> None:
    """Storage kept for backward is exactly local q, k, v, out (4 shards) and the fp32 LSE: O(S/cp)."""
    results = launch(world)
    for case, ranks in results.items():
        if case.ring == 1:
            continue
        shard = case.batch * (S // world) * H * D * case.dtype.itemsize
        lse = case.batch * H * (S // world) * torch.promote_types(case.dtype, torch.float32).itemsize
        mask = case.batch * S if case.masked else 0  # the ring's gathered boolean key mask: one byte per token
        for rank in ranks:
            assert rank["saved"] == 4 * shard + lse + mask, (case, rank["saved"])


@pytest.mark.timeout(150)
@WORLDS
def test_ring_bytes_sent_match_theory(world: int) -> None:
    """p2p sends (ring - 1) local KV blocks forward, the same KV plus fp32 dK/dV backward; allgather as much KV."""
    results = launch(world)
    for ring, ulysses in {(r, u) for r, u, _ in _layouts(world) if r > 1}:
        kv = 2 * B * (S // world) * H * D * 4  # the stacked fp32 (k, v) block after Ulysses: S/ring x H/ulysses
        for rank in results[Case(ring, ulysses, "p2p")]:
            assert rank["sent"]["ring_p2p"] == (ring - 1) * kv
            assert rank["sent"]["ring_p2p_backward"] == 2 * (ring - 1) * kv
        for rank in results[Case(ring, ulysses, "allgather")]:
            assert rank["sent"]["ring_allgather"] == (ring - 1) * kv
            assert rank["sent"]["ring_allgather_backward"] == 2 * (ring - 1) * kv


@pytest.mark.timeout(150)
@WORLDS
def test_exchanges_make_no_extra_copies(world: int) -> None:
    """What attention allocates in all (freed or not), in local shards of one of q, k, v (float32, unmasked).

    Ulysses writes q, k and v straight into its all-to-all's send buffer instead of stacking them and reordering the
    stack: its forward allocates 13 shards (16 with the stack at 2 ranks, 15 at 4). The p2p ring, every head in one
    pass, sends k and v as they are, side by side, and merges partial outputs with one temporary: its forward
    allocates 5 shards at ring 2 (the received block, two partial outputs and their merge; 9 with a stacked block and
    the merge's three temporaries), 17 at ring 2 x ulysses 2 (21). Its backward sends each block's dK/dV as the kernel
    gives them: 11 shards at ring 2 (19 stacked), 23 at ring 2 x ulysses 2 (29). Totals, not peaks: a peak depends on
    when gloo's thread lets go of a buffer it sent."""
    bounds = {(1, world, 0): 13, (2, world // 2, 0): 5 if world == 2 else 17,
              (2, world // 2, 1): 11 if world == 2 else 23}
    results = launch(world)
    for (ring, ulysses, when), bound in bounds.items():
        case = Case(ring, ulysses, "p2p", heads=H if ring > 1 else None)  # the ring's heads in one pass
        shard = B * (S // world) * H * D * case.dtype.itemsize
        for rank in results[case]:
            allocated = rank["allocated"][when] / shard
            assert allocated < bound + 0.5, \
                f"{case}: the {('forward', 'backward')[when]} allocates {allocated:.2f} shards, more than {bound}"
