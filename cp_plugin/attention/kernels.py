"""Attention with log-sum-exp, forward and backward, per device: what a blockwise ring needs.

A ring computes attention against one KV block at a time and merges the partial results, so it
needs each block's log-sum-exp (LSE) and a backward that takes the *global* output and LSE.
PyTorch exposes exactly that as ATen ops (the ones ``scaled_dot_product_attention`` dispatches
to): the CPU flash kernel, and on CUDA the flash kernel (fp16/bf16) or the memory-efficient kernel
(any dtype, and key masks). Layout ``(batch, heads, seq, head_dim)``; LSE ``(batch, heads, seq)``
in float32. Key masks arrive as an additive bias (0 / -inf), the form every kernel accepts.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _use_cuda_flash(q: torch.Tensor) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


def additive_mask(key_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """Boolean key mask ``(B, S_k)`` (True = attend) -> additive bias the kernels take, or ``None``."""
    if key_mask is None:
        return None
    bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float("-inf"))
    bias = bias[:, None, None, :]
    # CUDA's memory-efficient kernel wants the bias at full size; the CPU kernel broadcasts.
    return bias if q.device.type == "cpu" else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over one KV block: ``(out, lse)``; ``bias`` from :func:`additive_mask`."""
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    elif bias is None and _use_cuda_flash(q):
        out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    else:
        out, lse, *_ = aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=scale)
        lse = lse[..., : q.shape[2]]  # some versions pad the LSE's sequence dim to a multiple of 32
    return out, lse.float()


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
    grad_out = grad_out.contiguous()
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
        )
    # No dropout, no variable lengths: the kernels ignore the RNG state and cumulative lengths.
    none = q.new_empty(0, dtype=torch.int64)
    if bias is None and _use_cuda_flash(q):
        return aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, none, none, q.shape[2], k.shape[2], 0.0, False, none, none, scale=scale
        )
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        grad_out, q, k, v, q.new_empty(0) if bias is None else bias, out, lse.contiguous(), none, none, 0.0,
        [True, True, True, False], False,
        scale=scale,
    )
    return dq, dk, dv
