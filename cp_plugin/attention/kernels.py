"""Attention with log-sum-exp, forward and backward, per device: what a blockwise ring needs.

A ring computes attention against one KV block at a time and merges the partial results, so it
needs each block's log-sum-exp (LSE) and a backward that takes the *global* output and LSE.
PyTorch exposes exactly that as ATen ops (the ones ``scaled_dot_product_attention`` dispatches
to): the CPU flash kernel, and on CUDA cuDNN's kernel or the flash kernel (fp16/bf16) or the
memory-efficient kernel (fp32, key masks where cuDNN does not serve, head dims flash does not
take). Layout ``(batch, heads, seq, head_dim)``; LSE ``(batch, heads, seq)`` in float32 (float64
for float64 inputs, which only the CPU kernel takes). Key masks arrive as an additive bias
(0 / -inf), the form every kernel accepts. ``merge_partial`` combines the per-block results;
``benchmarks.blockwise`` runs the same three pieces on one device.

On Hopper, fused SDPA runs cuDNN's kernel, twice as fast as flash (measured on an H200, bf16, 24
heads x 128: 608 vs 311 TFLOP/s forward + backward); its backward takes a merged output and LSE
(its LSE as ``(batch, heads, seq, 1)``) and gave the same gradients as fused SDPA there. It takes a
mask's bias too, and gives a batch entry whose keys are all masked zeros and an LSE of -inf, as the
merge needs (part 1 of ``benchmarks.gpu`` checks both on the device). Its backward with a bias is given
whole 128-key tiles (see :func:`whole_key_tiles`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cp_plugin.compat import (
    sdpa_cudnn,
    sdpa_cudnn_backward,
    sdpa_efficient,
    sdpa_efficient_backward,
    sdpa_flash,
    sdpa_flash_backward,
    sdpa_flash_cpu,
    sdpa_flash_cpu_backward,
)


def check_dtype(q: torch.Tensor) -> None:
    """Raise, naming the fix, for inputs no attention-with-LSE kernel of ``q``'s device takes.

    The CPU kernel takes every float dtype; CUDA's flash and memory-efficient kernels stop at float32.
    Called before a ring moves any block, so every rank (same model, same dtype) raises at one point.
    """
    if q.device.type != "cpu" and q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"ring attention on {q.device.type} takes float16, bfloat16 or float32 inputs (the kernels with "
            f"log-sum-exp stop there); got {q.dtype}. Train in float32 or bf16 (Trainer(precision='32-true' or "
            "'bf16-mixed')), or split the sequence with ulysses_degree alone (ring_degree=1)"
        )


# Query rows a CUDA kernel call keeps per streaming multiprocessor, at the least: four waves of 128-row tiles.
CUDA_ROWS_PER_SM = 4 * 128


def kernel_lanes(device_type: str) -> int:
    """How much work one kernel call needs to keep this process's device busy: on CUDA, query rows
    (``CUDA_ROWS_PER_SM`` per multiprocessor); elsewhere, (batch, head) pairs, one per thread, over which the CPU
    kernel's backward runs in parallel."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count * CUDA_ROWS_PER_SM
    return torch.get_num_threads()


def kernel_for(q: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The one place a kernel is chosen, so forward and backward always agree.

    Flash and cuDNN need half precision and a head dim that is a multiple of 8 up to 256; cuDNN where
    PyTorch's SDPA would pick it (enabled, compute capability 9.0 or newer), with or without a key mask's
    bias; flash takes no bias, so a masked block without cuDNN goes to the memory-efficient kernel.
    """
    if q.device.type == "cpu":
        return "cpu"
    head_dim = q.shape[-1]
    if q.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 and head_dim % 8 == 0:
        if _cudnn_serves(q.device):
            return "cudnn"
        if bias is None:
            return "flash"
    return "efficient"


def _cudnn_serves(device: torch.device) -> bool:
    """Whether PyTorch's SDPA would run cuDNN's kernel here: enabled, on a GPU of compute capability 9.0+."""
    return (device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled()
            and torch.cuda.get_device_capability(device) >= (9, 0))


def _no_rng(q: torch.Tensor) -> torch.Tensor:
    """Placeholder philox seed/offset: the CUDA backwards read them only when dropout is on."""
    return torch.empty(0, dtype=torch.int64, device=q.device)


def additive_mask(key_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """Boolean mask (True = attend) -> additive bias the kernels take, or ``None``.

    ``(B, S_k)`` is a key-padding mask (the same for every query); ``(B, S_q, S_k)`` masks each
    query row on its own (a block of a two-dimensional mask, e.g. block-causal); ``(B, H, S_q, S_k)``
    each head's rows on their own.
    """
    if key_mask is None:
        return None
    keys = key_mask.shape[-1]
    # CUDA's memory-efficient kernel wants each bias row to start aligned ("attn_bias is not correctly aligned"
    # at 2007 keys on an H100): its rows are laid out at a multiple of 16 and sliced, as fused SDPA pads a mask.
    padded = -(-keys // 16) * 16 if kernel_for(q, key_mask) == "efficient" else keys
    bias = torch.zeros(*key_mask.shape[:-1], padded, dtype=q.dtype, device=q.device)[..., :keys]
    bias = bias.masked_fill_(~key_mask, float("-inf"))
    return bias[:, None, None, :] if key_mask.dim() == 2 else bias[:, None] if key_mask.dim() == 3 else bias


def _full_size(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """CUDA's kernels want the bias at full size: a stride-0 expand of ``(B, 1, 1 or S_q, S_k)``, no copy."""
    return None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


# cuDNN's backward with a bias scores the missing keys of a last, partial 128-key tile 0 instead of -inf. A query
# row whose LSE is below ln(FLT_MAX), -88.7 (-inf for a row with no valid key, which masked ring blocks make), then
# gets exp(0 - lse) = inf times a zero key: NaN in dq (pytorch/pytorch#196678: torch 2.11 to 2.13 on H100/H200,
# bf16 and fp16, at keys % 128 == 64; clean at whole tiles).
CUDNN_KEY_TILE = 128


def whole_key_tiles(
    k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k, v`` and the bias (``(B, 1, 1 or S_q, S_k)``) over whole ``CUDNN_KEY_TILE``-key tiles: zero keys the
    bias masks (-inf), which add nothing to any output or gradient, so that no tile of cuDNN's has missing keys."""
    pad = -k.shape[2] % CUDNN_KEY_TILE
    if pad == 0:
        return k, v, bias
    return (F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)),
            F.pad(bias, (0, pad), value=float("-inf")))


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over one KV block: ``(out, lse)``; ``bias`` from :func:`additive_mask`."""
    backend = kernel_for(q, bias)
    if backend == "cpu":
        out, lse = sdpa_flash_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    elif backend == "cudnn":
        out, lse, *_ = sdpa_cudnn(q.contiguous(), k.contiguous(), v.contiguous(), _full_size(bias, q, k), True, 0.0,
                                  False, False, scale=scale)
        lse = lse.squeeze(-1)
    elif backend == "flash":
        out, lse, *_ = sdpa_flash(q, k, v, 0.0, False, False, scale=scale)
    else:
        out, lse, *_ = sdpa_efficient(q, k, v, _full_size(bias, q, k), True, 0.0, False, scale=scale)
        lse = lse[..., : q.shape[2]]  # the kernel pads the LSE's sequence dim to a multiple of 32
    return out, lse.to(torch.promote_types(lse.dtype, torch.float32))


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``q, k, v`` for one KV block, given the *merged* ``out`` and ``lse`` of all blocks.

    With the global normaliser, each block's softmax probabilities are the true ones, so the
    per-block gradients simply add up (dq over blocks; dk, dv per block).
    """
    backend = kernel_for(q, bias)
    if backend == "cpu":  # reads ``grad_out`` by its strides: the ring's, a transposed view, is not copied
        return sdpa_flash_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
        )
    grad_out = grad_out.contiguous()
    # ``None`` is an undefined tensor to ATen: dense (not variable-length) flash, no bias. An empty
    # tensor would be *defined* and switch the kernels to their varlen / bias paths.
    if backend == "cudnn":
        keys = k.shape[2]
        if bias is not None:
            k, v, bias = whole_key_tiles(k, v, bias)
        dq, dk, dv = sdpa_cudnn_backward(
            grad_out, q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.unsqueeze(-1).contiguous(),
            _no_rng(q), _no_rng(q), _full_size(bias, q, k), None, None, q.shape[2], k.shape[2], 0.0, False,
            scale=scale,
        )
        return dq, dk[:, :, :keys], dv[:, :, :keys]
    if backend == "flash":
        return sdpa_flash_backward(
            grad_out, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, False, _no_rng(q), _no_rng(q),
            scale=scale,
        )
    dq, dk, dv, _ = sdpa_efficient_backward(
        grad_out, q, k, v, _full_size(bias, q, k), out, lse.contiguous(), _no_rng(q), _no_rng(q), 0.0,
        [True, True, True, False], False, scale=scale,
    )
    return dq, dk, dv


def merge_partial(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial softmax attentions by their LSEs, in the numerically stable form.

    ``out - sigmoid(lse_i - lse) * (out - out_i)`` never exponentiates a large number; the LSE uses
    ``logaddexp`` (the same quantity as ``lse - logsigmoid(lse - lse_i)``) because it stays finite
    when a block, or everything so far, was fully masked (LSE ``-inf``). It is formed as
    ``weight * (out_i - out) + out`` in one temporary of ``out``'s size, not three (negating a
    difference and a product is exact, so this is bit for bit the form). ``in_place`` adds it into
    ``out``, which the caller must own: a kernel's output may be kept by a selective activation
    checkpoint, so only a merge's result is ever written. ``block_out`` is never written. Returns
    the merged output (``block_out`` where there is none yet) and LSE.
    """
    block_lse = block_lse.unsqueeze(-1)
    if out is None:
        return block_out, block_lse
    # The weight is computed from float32 LSEs and cast to ``out``'s dtype, so ``out`` stays in the
    # accumulation dtype the caller chose. NaN only when both LSEs are -inf: nothing to add.
    weight = torch.sigmoid(block_lse - lse).nan_to_num(0.0).to(out.dtype)
    step = torch.sub(block_out, out).mul_(weight)
    return out.add_(step) if in_place else step.add_(out), torch.logaddexp(lse, block_lse)
