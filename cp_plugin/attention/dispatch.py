"""Route diffusers' attention calls to cp_plugin inside a context-parallel model.

diffusers' attention processors call ``dispatch_attention_fn(..., parallel_config=processor._parallel_config)``,
which looks the active backend up in ``_AttentionBackendRegistry`` and passes the config on. We
give CP models a :class:`RoutedParallelConfig` (a diffusers ``ParallelConfig`` that also carries our
mesh) and wrap each registered backend once: a call carrying a routed config runs
:func:`cp_plugin.attention.context_parallel_attention` (true ring, any device); every other call
goes to the backend unchanged, so models outside cp_plugin and diffusers' own CP keep working.
This is the one place that touches diffusers' dispatch; models stay untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from cp_plugin.attention import context_parallel_attention
from cp_plugin.mesh import ParallelMesh
from cp_plugin.padding import SequencePadding


@dataclass
class RoutedParallelConfig(diffusers.ParallelConfig):
    """diffusers' ``ParallelConfig`` plus the cp_plugin mesh whose attention replaces the backend's."""

    cp_mesh: ParallelMesh | None = None
    padding: SequencePadding | None = None


# An additive bias at or below this gives a key exactly zero softmax weight in every float dtype
# (exp underflows below -746 in float64), as LTX's ``(1 - mask) * -10000`` does.
MASKED_BIAS = -1e4


def key_padding_mask(attn_mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor:
    """diffusers' key masks -> bool ``(B, S_k)`` (True = attend).

    Accepted: ``(B, S_k)``, ``(B, 1, S_k)``, ``(B, 1, 1, S_k)`` and ``(B, H, 1, S_k)`` with the same
    mask for every head (LTX broadcasts its text mask over heads), boolean or additive with 0 where a
    key is attended and ``-inf`` or a bias <= ``MASKED_BIAS`` where it is not.
    """
    mask = attn_mask
    if mask.dim() == 4 and mask.shape[2] == 1:
        if mask.shape[1] > 1 and not bool((mask == mask[:, :1]).all()):
            raise ValueError(
                f"context-parallel attention got an attn_mask of shape {tuple(attn_mask.shape)} that differs between "
                "heads; cp_plugin supports one key-padding mask for all heads. Use the same mask for every head"
            )
        mask = mask[:, 0, 0]
    elif mask.dim() == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 2 or mask.shape != (batch, keys):
        raise ValueError(
            f"context-parallel attention supports key-padding masks of shape (batch, keys), (batch, 1, keys), "
            f"(batch, 1, 1, keys) or (batch, heads, 1, keys); got attn_mask of shape {tuple(attn_mask.shape)} for "
            f"{batch} x {keys} keys. Use a key-padding mask (per-query masks cannot be sharded along the sequence)"
        )
    if mask.dtype == torch.bool:
        return mask
    masked = mask <= MASKED_BIAS
    if not bool(((mask == 0) | masked).all()):
        raise ValueError(
            "context-parallel attention takes boolean masks or additive masks of 0 (attend) and -inf or <= "
            f"{MASKED_BIAS:g} (masked); got other bias values. Pass a key-padding mask instead of a bias"
        )
    return ~masked


@torch.compiler.disable(recursive=True)
def _routed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mesh: ParallelMesh,
    padding: SequencePadding | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    **_: Any,
) -> torch.Tensor:
    """Check what context-parallel attention supports, then run it.

    Excluded from ``torch.compile``: the ring's point-to-point exchange and the traffic counters
    are not traceable, so a compiled block graph-breaks here and runs attention eagerly, while its
    projections, norms and MLP stay compiled.
    """
    unsupported = {
        "dropout_p": dropout_p != 0.0,
        "is_causal": is_causal,
        "enable_gqa": enable_gqa or key.shape[2] != query.shape[2],
        "return_lse": return_lse,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(
            f"context-parallel attention got {', '.join(bad)} set; cp_plugin's attention supports full "
            "non-causal attention (with optional key-padding masks) without dropout or grouped KV heads. Call the "
            "model without them or train this model without context parallelism (ring_degree=1, ulysses_degree=1)"
        )
    batch, keys = key.shape[:2]
    key_mask = None if attn_mask is None else key_padding_mask(attn_mask, batch, keys)
    pad_mask = None if padding is None else padding.key_mask(keys, batch, key.device)
    if pad_mask is not None:
        key_mask = pad_mask if key_mask is None else key_mask & pad_mask
    return context_parallel_attention(query, key, value, mesh, scale=scale, key_mask=key_mask)


def _route(backend_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(backend_fn)
    def routed(*args: Any, **kwargs: Any) -> torch.Tensor:
        config = kwargs.get("_parallel_config")
        if isinstance(config, RoutedParallelConfig):
            return _routed_attention(*args, mesh=config.cp_mesh, padding=config.padding, **kwargs)
        return backend_fn(*args, **kwargs)

    routed.cp_plugin_routed = True
    return routed


def install_attention_routing() -> None:
    """Wrap every registered diffusers attention backend once (idempotent)."""
    backends = _AttentionBackendRegistry._backends
    for name, fn in list(backends.items()):
        if not getattr(fn, "cp_plugin_routed", False):
            backends[name] = _route(fn)
