"""The attention masks diffusers models build, in the forms context-parallel attention can carry.

Context-parallel attention holds a shard of the queries and sees the keys block by block, so a mask
must be expressible per key (a key-padding mask, O(S), travels with the keys) or be held whole by
every rank (a genuinely two-dimensional mask, O(S^2), sliced to our rows and each block's columns).
What models pass, and what it becomes:

- key-padding masks ``(B, S)``, ``(B, 1, S)``, ``(B, 1, 1, S)`` and ``(B, H, 1, S)`` (the same for
  every head, as LTX broadcasts), boolean or additive (0 / -inf or a bias <= ``MASKED_BIAS``);
- joint masks ``(B, 1, L, L)`` over this rank's tokens that are an outer product of a validity vector
  with itself (HunyuanVideo 1.5, Chroma): carried in O(S) as the key mask (which columns any query
  attends) and the query rows that attend anything. SDPA gives a row that attends nothing an output
  of zero, which a later block may read: diffusers' Chroma drops the mask of its single-stream blocks
  when gradient checkpointing is on, so there the masked text tokens are keys again. The output of
  those rows is zeroed after attention, which is what SDPA gives, forward and backward;
- masks over the whole sequence ``(B or 1, 1, S, S)`` that a model builds before the split and passes
  to every block (SkyReels-V2's block-causal diffusion forcing): kept whole, with a warning about
  their O(S^2) memory, unless they too are an outer product.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch

# An additive bias at or below this gives a key exactly zero softmax weight in every float dtype
# (exp underflows below -746 in float64), as LTX's ``(1 - mask) * -10000`` does.
MASKED_BIAS = -1e4


def as_bool(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = attend) from a boolean or additive one."""
    if mask.dtype == torch.bool:
        return mask
    masked = mask <= MASKED_BIAS
    if not bool(((mask == 0) | masked).all()):
        raise ValueError(
            "context-parallel attention takes boolean masks or additive masks of 0 (attend) and -inf or <= "
            f"{MASKED_BIAS:g} (masked); got other bias values. Pass a key-padding mask instead of a bias"
        )
    return ~masked


def _one_for_all_heads(mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``mask`` without its head dim (dim 1), which must be 1 or hold the same mask for every head."""
    if mask.shape[1] > 1 and not bool((mask == mask[:, :1]).all()):
        raise ValueError(
            f"context-parallel attention got an attn_mask of shape {shape} that differs between heads; cp_plugin "
            "supports one mask for all heads. Use the same mask for every head"
        )
    return mask[:, 0]


def outer_product(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(queries (B, L_q), keys (B, L_k))`` of a ``(B, L_q, L_k)`` mask that is ``valid_q x valid_k``, else ``None``."""
    keys, queries = mask.any(-2), mask.any(-1)
    return (queries, keys) if bool((mask == (queries[:, :, None] & keys[:, None, :])).all()) else None


def key_padding_mask(
    attn_mask: torch.Tensor, batch: int, queries: int, keys: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A mask over this rank's keys -> ``(keys (B, keys), query rows (B, queries) or None)``, bool, True = attend.

    The query rows are those of an outer product that attend some key (``None``: every row attends);
    see the module docstring.
    """
    shape = tuple(attn_mask.shape)
    mask = as_bool(attn_mask)
    if mask.dim() == 4:
        mask = _one_for_all_heads(mask, shape)
    rows = None
    if mask.dim() == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    elif mask.dim() == 3 and mask.shape[1] == queries == keys:
        reduced = outer_product(mask)
        if reduced is None:
            raise ValueError(
                f"context-parallel attention got an attn_mask of shape {shape} over this rank's {keys} tokens that "
                "is not a key-padding mask (nor an outer product of one); a per-query mask must be built over the "
                "whole sequence before the split, so that every rank can take its rows"
            )
        rows, mask = reduced
    if mask.dim() != 2 or mask.shape[-1] != keys or mask.shape[0] not in (1, batch):
        raise ValueError(
            f"context-parallel attention supports key-padding masks of shape (batch, keys), (batch, 1, keys), "
            f"(batch, 1, 1, keys) or (batch, heads, 1, keys), joint (batch, 1, L, L) outer products, and masks "
            f"over the whole sequence; got attn_mask of shape {shape} for {batch} x {keys} keys per rank"
        )
    return mask.expand(batch, keys), None if rows is None else rows.expand(batch, queries)


def whole_sequence_mask(
    attn_mask: torch.Tensor, length: int, padded: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """A mask over all ``length`` tokens -> ``(key_mask (B, padded), None, query rows (B, padded))`` for an outer
    product, else ``(None, full_mask (B, padded, padded), None)``.

    The sequence is padded to ``padded`` tokens: padded keys are masked; padded query rows attend the
    real keys (their outputs are trimmed off, but must not be NaN in the backward).
    """
    shape = tuple(attn_mask.shape)
    mask = as_bool(attn_mask)
    if mask.dim() == 4:
        mask = _one_for_all_heads(mask, shape)
    if mask.dim() != 3 or mask.shape[-2:] != (length, length):
        raise ValueError(
            f"context-parallel attention got attn_mask of shape {shape}, which covers neither this rank's keys nor "
            f"the whole sequence of {length} tokens ((batch, 1, {length}, {length}))"
        )
    extra = padded - length
    reduced = outer_product(mask)
    if reduced is not None:
        rows, keys = reduced
        pad = torch.nn.functional.pad
        return pad(keys, (0, extra), value=False), None, pad(rows, (0, extra), value=True)
    warnings.warn(
        f"context-parallel attention holds a {length} x {length} attention mask on every rank (O(S^2) memory): "
        "a key-padding mask costs O(S)",
        stacklevel=3,
    )
    full = torch.nn.functional.pad(mask, (0, extra, 0, extra), value=False)
    if extra:
        full[:, length:, :length] = True
    return None, full, None


def is_block_mask(mask: object) -> bool:
    """Whether ``mask`` is flex attention's ``BlockMask`` (checked by name: flex attention may be absent)."""
    return type(mask).__name__ == "BlockMask"


# Each BlockMask's dense form, per length: a model passes one mask to every block, and a recompute passes it again.
_DENSE: weakref.WeakKeyDictionary[Any, dict[int, torch.Tensor]] = weakref.WeakKeyDictionary()


def block_mask_dense(block_mask: Any, length: int) -> torch.Tensor:
    """:func:`_dense_block_mask`, computed once per ``BlockMask`` (and length) for as long as the mask lives."""
    found = _DENSE.setdefault(block_mask, {})
    if length not in found:
        found[length] = _dense_block_mask(block_mask, length)
    return found[length]


def _dense_block_mask(block_mask: Any, length: int) -> torch.Tensor:
    """``(B, H, length, length)`` bool: what flex attention's ``BlockMask`` lets each of the first ``length`` queries
    attend among the first ``length`` keys.

    A model builds the ``BlockMask`` over its whole sequence before the split (AnyFlow-FAR's frame-causal
    mask), padded to a multiple of its block size; ``length`` is the real sequence. flex attention applies
    ``mask_mod`` inside the partial blocks and attends every key of the full blocks, so the same is done
    here, as a tensor mask that the context-parallel attention slices like any mask over the whole sequence.
    """
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    rows, cols = block_mask.BLOCK_SIZE

    def tokens(num_blocks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        blocks = BlockMask.from_kv_blocks(num_blocks, indices, BLOCK_SIZE=(rows, cols)).to_dense().bool()
        return blocks.repeat_interleave(rows, -2).repeat_interleave(cols, -1)[..., :length, :length]

    batch, heads = block_mask.kv_num_blocks.shape[:2]
    allowed = tokens(block_mask.kv_num_blocks, block_mask.kv_indices)
    if block_mask.mask_mod is not None:
        allowed = allowed & create_mask(block_mask.mask_mod, batch, heads, length, length, allowed.device)
    if block_mask.full_kv_num_blocks is not None:
        allowed = allowed | tokens(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return allowed
