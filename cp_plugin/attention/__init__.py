"""Context-parallel attention: Ulysses all-to-all inside, ring across, any factorisation of cp.

Every function here takes and returns the diffusers dispatch layout ``(batch, seq, heads, head_dim)``
with the sequence sharded over the CP group in ``cp_rank`` order.
"""

from __future__ import annotations

import torch

from cp_plugin.attention.masks import MaskTiles
from cp_plugin.attention.ulysses import gather_key_mask, heads_to_seq, seq_to_heads
from cp_plugin.compat import SDPA  # the builtin: a converted model's routing (dispatch.py) must not see it
from cp_plugin.mesh import ParallelMesh


def context_parallel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mesh: ParallelMesh,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    tiles: MaskTiles | None = None,
) -> torch.Tensor:
    """Full-sequence softmax attention of local shards ``(B, S/cp, H, D)``, returned as local shards.

    Ulysses turns the ``S/cp`` tokens of all heads into ``S/ring`` tokens of ``H/ulysses`` heads;
    the ring then covers the remaining ``ring`` blocks of the sequence. ``key_mask`` (boolean
    ``(B, S/cp)``, True = attend) is sharded like the keys and follows them. Keys may be a sequence
    of another length than the queries (cross-attention to split text): then queries and key/values
    travel in two all-to-alls instead of one. ``tiles`` (a mask over the whole sequence) masks each
    query row on its own, e.g. block-causally: attention then runs a tile of it at a time, through
    the ring's blockwise kernels even on a ring of one, so no rank holds it whole.
    """
    if mesh.ulysses_size > 1:
        if query.shape == key.shape:
            query, key, value = seq_to_heads(mesh.ulysses_group, query, key, value)
        else:
            (query,) = seq_to_heads(mesh.ulysses_group, query)
            key, value = seq_to_heads(mesh.ulysses_group, key, value)
        if key_mask is not None:
            key_mask = gather_key_mask(key_mask, mesh.ulysses_group)
        if tiles is not None:  # rank j of the exchange holds head group j
            heads = query.shape[2]
            tiles = tiles.for_heads(mesh.ulysses_rank * heads, (mesh.ulysses_rank + 1) * heads)
    if mesh.ring_size > 1 or tiles is not None:
        from cp_plugin.attention.ring import ring_attention

        out = ring_attention(
            query,
            key,
            value,
            group=mesh.ring_group if mesh.ring_size > 1 else None,
            scale=scale,
            rotate_method=mesh.config.rotate_method,
            convert_to_fp32=mesh.config.convert_to_fp32,
            key_mask=key_mask,
            tiles=tiles,
            most_heads=mesh.config.ring_heads_per_pass,
            lanes=mesh.kernel_lanes,
        )
    else:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = SDPA(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, scale=scale
        ).transpose(1, 2)
    if mesh.ulysses_size > 1:
        (out,) = heads_to_seq(mesh.ulysses_group, out)
    return out
