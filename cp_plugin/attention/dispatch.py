"""Route the attention calls of a context-parallel model to cp_plugin's attention, and nothing else.

Processors reach attention in two ways: ``dispatch_attention_fn`` (diffusers looks the backend up in
``_AttentionBackendRegistry``, passing ``parallel_config`` on, or ``None`` where a processor omits or
withholds it) or ``torch.nn.functional.scaled_dot_product_attention`` directly (SD3's joint
processor, CogVideoX's, ``AttnProcessor2_0``, ...). Both are wrapped once; which calls are routed
depends on the model's plan:

- a model with its own ``_cp_plan`` keeps diffusers' convention: its processors carry a
  :class:`RoutedParallelConfig` (diffusers' ``ParallelConfig`` plus our mesh), and exactly the
  calls that pass it on are routed (Wan withholds it for cross-attention to its unsplit text);
- a model with a derived plan splits every token stream where it enters the blocks, so every
  attention call made inside a block has sharded tokens and is routed, whatever the processor
  passes; calls outside the blocks (HunyuanVideo's text refiner, before the split) run unchanged.
  An attention module's scope (``model.py``) announces such a call with :func:`enter_attention`.

Everything else goes to the backend or to SDPA unchanged, so models outside cp_plugin and diffusers'
own CP keep working. This is the one place that touches diffusers' dispatch; models stay untouched.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import torch

from cp_plugin.attention import context_parallel_attention
from cp_plugin.attention.masks import key_padding_mask, whole_sequence_mask
from cp_plugin.compat import attention_backends
from cp_plugin.mesh import ParallelMesh
from cp_plugin.padding import SequencePadding


@dataclass
class RoutedParallelConfig(diffusers.ParallelConfig):
    """diffusers' ``ParallelConfig`` plus the cp_plugin mesh whose attention replaces the backend's."""

    cp_mesh: ParallelMesh | None = None
    padding: SequencePadding | None = None


@dataclass
class AttentionCall:
    """An attention module running inside a block of a model with a derived plan (its inputs, for the joint order)."""

    config: RoutedParallelConfig
    module: torch.nn.Module
    hidden_states: torch.Tensor | None
    encoder_hidden_states: torch.Tensor | None


# The attention module running now, innermost last; ``None`` while its calls must not be routed
# (outside the blocks, or inside cp_plugin's own attention, which calls SDPA itself).
_CALLS: list[AttentionCall | None] = []


def enter_attention(call: AttentionCall | None) -> None:
    _CALLS.append(call)


def exit_attention() -> None:
    _CALLS.pop()


def reset_attention_calls() -> None:
    """Forget calls a failed forward left announced (its modules' exits never ran), at a model's next entry."""
    _CALLS.clear()


def _joint_order(call: AttentionCall | None, value: torch.Tensor, padding: SequencePadding) -> str:
    """Whether a joint call's keys hold this rank's text tokens first or its image tokens first.

    Processors concatenate in either order (Flux, CogVideoX: text first; SD3, HunyuanVideo: image
    first), which matters for the padding mask. The module's own value projection of its image
    input finds where those rows sit in ``value``; the answer is kept on the module.
    """
    if call is None:  # a model with its own plan: diffusers plans split text-first models (Flux, QwenImage)
        return padding.joint_order or "text_first"
    module = call.module
    known = getattr(module, "_cp_plugin_joint_order", None) or padding.joint_order
    if known is not None:
        return known
    to_v = getattr(module, "to_v", None)
    if call.hidden_states is None or call.encoder_hidden_states is None or to_v is None:
        raise ValueError(
            f"context-parallel attention got {value.shape[1]} keys per rank, this rank's text and image tokens "
            f"together, in {type(module).__name__} and cannot tell which "
            "come first to mask their padding; use text and image lengths the CP size divides, or pass cp_plan"
        )
    with torch.no_grad():
        image = to_v(call.hidden_states).flatten(2).to(value.dtype)
    rows, text = value.flatten(2), padding.local_length(padding.text_length)
    found = [order for order, start in (("image_first", 0), ("text_first", text))
             if torch.allclose(rows[:, start : start + image.shape[1]], image, rtol=1e-3, atol=1e-5)]
    if len(found) != 1:
        raise ValueError(
            f"cannot tell whether {type(module).__name__} puts text or image tokens first in its joint attention "
            "(its value projection of the image tokens matches neither or both places); use text and image "
            "lengths the CP size divides, or pass cp_plan"
        )
    module._cp_plugin_joint_order = padding.joint_order = found[0]
    return found[0]


def _masks(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
    padding: SequencePadding | None, call: AttentionCall | None, mesh: ParallelMesh,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(key_mask (B, keys), full_mask)`` of a routed call: the model's mask and our padding's, combined."""
    batch, queries, keys = key.shape[0], query.shape[1], key.shape[1]
    key_mask = full_mask = None
    if attn_mask is not None and attn_mask.shape[-1] == keys:
        key_mask = key_padding_mask(attn_mask, batch, queries, keys)
    elif attn_mask is not None:  # over the whole sequence: only self-attention of the image tokens has one
        length = None if padding is None else padding.image_length
        if length is None or keys != padding.local_length(length):
            raise ValueError(
                f"context-parallel attention got attn_mask of shape {tuple(attn_mask.shape)} for {keys} keys per "
                "rank; masks must cover this rank's keys, or the whole image sequence in self-attention"
            )
        whole_keys, full_mask = whole_sequence_mask(attn_mask, length, keys * mesh.cp_size)
        if whole_keys is not None:
            key_mask = whole_keys.expand(batch, -1).chunk(mesh.cp_size, 1)[mesh.cp_rank]
    if padding is not None:
        pad_mask = padding.key_mask(keys, batch, key.device, lambda: _joint_order(call, value, padding))
        if pad_mask is not None:
            key_mask = pad_mask if key_mask is None else key_mask & pad_mask
    return key_mask, full_mask


def _check_split(query: torch.Tensor, key: torch.Tensor, call: AttentionCall, padding: SequencePadding) -> None:
    """A routed call inside a block must attend over this rank's split tokens, not over tokens it holds whole."""
    image, text = padding.image_length, padding.text_length
    local = padding.local_lengths()
    if query.shape[1] not in local or key.shape[1] not in local:
        raise ValueError(
            f"{type(call.module).__name__} inside a block attends {query.shape[1]} queries to {key.shape[1]} keys, "
            f"which are not this rank's split tokens (image {image}, text {text} tokens split over the CP group): "
            "the block runs on a sequence the derived plan does not split (e.g. per-sample packing or extra tokens "
            "made inside the blocks); pass cp_plan naming where that sequence enters the blocks"
        )


@torch.compiler.disable(recursive=True)
def _routed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config: RoutedParallelConfig,
    call: AttentionCall | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    **_: Any,
) -> torch.Tensor:
    """Check what context-parallel attention supports, then run it on ``(B, S_local, H, D)`` shards.

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
    mesh = config.cp_mesh
    if call is not None:
        _check_split(query, key, call, config.padding)
    key_mask, full_mask = _masks(query, key, value, attn_mask, config.padding, call, mesh)
    enter_attention(None)  # our own attention calls SDPA: it must not be routed again
    try:
        return context_parallel_attention(query, key, value, mesh, scale=scale, key_mask=key_mask, full_mask=full_mask)
    finally:
        exit_attention()


def _route(backend_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(backend_fn)
    def routed(*args: Any, **kwargs: Any) -> torch.Tensor:
        config = kwargs.get("_parallel_config")
        call = _CALLS[-1] if _CALLS else None
        if call is not None:
            return _routed_attention(*args, config=call.config, call=call, **{**kwargs, "_parallel_config": None})
        if isinstance(config, RoutedParallelConfig) and not _CALLS:
            return _routed_attention(*args, config=config, **kwargs)
        return backend_fn(*args, **kwargs)

    routed.cp_plugin_routed = True
    return routed


_sdpa = torch.nn.functional.scaled_dot_product_attention


def _routed_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (``(B, H, S, D)`` layout), routed inside a block of a derived-plan model."""
    call = _CALLS[-1] if _CALLS else None
    if call is None:
        return _sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    out = _routed_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), call.config, call, attn_mask=attn_mask,
        dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
    )
    return out.transpose(1, 2)


def install_attention_routing() -> None:
    """Wrap every registered diffusers attention backend, and SDPA, once (idempotent)."""
    backends = attention_backends()
    for name, fn in list(backends.items()):
        if not getattr(fn, "cp_plugin_routed", False):
            backends[name] = _route(fn)
    torch.nn.functional.scaled_dot_product_attention = _routed_sdpa


def calls_attention(processor: object) -> bool:
    """Whether a processor reaches attention through one of the two routed paths (dispatch or SDPA)."""
    try:
        source = inspect.getsource(type(processor).__call__)
    except (OSError, TypeError):
        return False
    return "dispatch_attention_fn" in source or "scaled_dot_product_attention" in source
