"""A run's memory options, applied to the models it trains and undone with them.

Context parallelism divides a step's activations by the CP size; what is left per rank is what
activation checkpointing and tiling bring down further, and users turn checkpointing on first:

- ``gradient_checkpointing``: each trained diffusers model's own ``enable_gradient_checkpointing()``
  (its blocks are recomputed in the backward; under context parallelism a recompute splits nothing
  again, only each block's attention exchanges run twice);
- ``checkpoint_policy``: what a recompute redoes. ``"full"`` redoes the whole block (diffusers'
  default). ``"save_attention"`` keeps every attention kernel's output and log-sum-exp (torch's
  selective activation checkpointing), so the recompute skips the attention kernels, the part of a
  block whose cost grows with the square of the tokens, for one more tensor of the block's width per
  attention call (per ring step under the ring). The exchanges that bring a kernel its queries and
  keys still run: the backward needs their results;
- ``tile_feed_forward``: every feed-forward network (found by structure, :mod:`cp_plugin.tiling`)
  over its tokens a chunk at a time, ``tile_tokens`` per chunk or chosen per call; an MLP a block
  writes inline is computed with the projection of it (concatenated after the attention's output)
  a chunk at a time too, forward and backward; normalization layers keep only their inputs for
  the backward, which recomputes them, and an attention's projections of a norm's output, norms
  of its projections and a block's products of either with its modulation or gate keep what those
  were made of, made again in the backward (:mod:`cp_plugin.norms`, :mod:`cp_plugin.products`).
  ``True`` takes every call from ``MIN_TILED_TOKENS`` tokens; ``"auto"`` (the default) only those of
  a sequence long enough that what tiling makes again is a small part of the step (:func:`auto_tiles`).

Both work with or without context parallelism, so a one-process run can use the same options.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import ModelMixin
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cp_plugin.compat import ATTENTION_FORWARD_KERNELS, supports_gradient_checkpointing
from cp_plugin.config import AUTO, check_checkpoint_policy
from cp_plugin.model import Conversion
from cp_plugin.norms import recompute_norms
from cp_plugin.products import keep_products_made
from cp_plugin.tiling import MIN_TILED_TOKENS, Tiles, tile_feed_forward, token_width


def trained_models(module: torch.nn.Module) -> list[tuple[str, ModelMixin]]:
    """The diffusers models in ``module`` that have trainable parameters (a frozen VAE or text encoder has none)."""
    return [(name or type(sub).__name__, sub) for name, sub in module.named_modules()
            if isinstance(sub, ModelMixin) and any(p.requires_grad for p in sub.parameters())]


def save_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing policy: keep what the attention kernels return, recompute everything else."""
    keep = op.overloadpacket in ATTENTION_FORWARD_KERNELS
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_block(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """diffusers' ``gradient_checkpointing_func`` (non-reentrant, as diffusers'), passing keyword arguments on: some
    models call their blocks with them (HunyuanImage's ``attention_mask=``), which diffusers' own function rejects."""
    return checkpoint(module.__call__, *args, use_reentrant=False, **kwargs)


def checkpoint_saving_attention(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """:func:`checkpoint_block` with the :func:`save_attention` policy."""
    return checkpoint(module.__call__, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, save_attention), **kwargs)


def enable_checkpointing(module: torch.nn.Module, conversion: Conversion, policy: str = "full") -> None:
    """Turn on every trained diffusers model's gradient checkpointing, recording how to turn it off again."""
    check_checkpoint_policy(policy)
    models = trained_models(module)
    unsupported = [name for name, model in models if not supports_gradient_checkpointing(model)]
    if unsupported:
        raise ValueError(
            f"gradient_checkpointing=True: {', '.join(unsupported)} ({type(dict(models)[unsupported[0]]).__name__}) "
            "does not support gradient checkpointing in diffusers; set gradient_checkpointing=False "
            "(Hydra: parallel.gradient_checkpointing=false) or freeze that model"
        )
    own = [name for name, model in models if model.is_gradient_checkpointing]
    if own and policy != "full":
        raise ValueError(
            f"checkpoint_policy={policy!r}: {own[0]} already has gradient checkpointing on (its own "
            "enable_gradient_checkpointing()), which recomputes whole blocks; leave it to gradient_checkpointing=True "
            "(remove that call) or use checkpoint_policy='full'"
        )
    function = checkpoint_saving_attention if policy == "save_attention" else checkpoint_block
    for _, model in models:
        if not model.is_gradient_checkpointing:
            model.enable_gradient_checkpointing(function)
            conversion.on_remove(model.disable_gradient_checkpointing)


# The tiling option's parts, in the order they are applied, each building on the ones before it.
TILING_PARTS = ("feed-forward networks in chunks", "normalizations made again", "products made again")

# The whole sequence, in widths of the model, from which ``tile_feed_forward="auto"`` tiles a call.
AUTO_TILING_WIDTHS = 64


def auto_tiles(module: torch.nn.Module, tile_tokens: int | None, shards: int) -> Tiles | None:
    """The calls ``tile_feed_forward="auto"`` takes: those of a rank's share (``shards`` ranks split the sequence) of
    a sequence of at least :data:`AUTO_TILING_WIDTHS` times the model's width (``cp_plugin.tiling.token_width``),
    a call's tokens counted over that width; none in a model without feed-forward networks.

    What tiling makes again (a chunk's hidden layer, a norm, a projection) grows with tokens x width x width per
    rank; the step grows with that and with attention's tokens x sequence x width (each rank's share of the
    sequence attends to all of it, under Ulysses and the ring alike). So what tiling adds to a step falls as the
    sequence grows against the width, whatever the model and the split: at 64 widths a step spends at most about 5%
    more (``benchmarks/results/tiling_auto.md``), while the share of the peak it saves changes little with the length
    (``benchmarks/results/tiling.md``)."""
    width = token_width(module)
    if not width:
        return None  # nothing to chunk
    sequence = AUTO_TILING_WIDTHS * width
    return Tiles(tile_tokens, max(MIN_TILED_TOKENS, -(-sequence // shards), tile_tokens or 0), width)


def apply_tiling(module: torch.nn.Module, tiles: Tiles, parts: int = len(TILING_PARTS)) -> Conversion:
    """The tiling option alone: feed-forward networks and inline MLPs in chunks, normalizations recomputed, and
    the products of what they make kept as what those were made of, for the calls ``tiles`` takes. ``parts``: only
    the first that many of :data:`TILING_PARTS`, which ``benchmarks.tiling_parts`` uses to show what each one costs
    and saves."""
    conversion = tile_feed_forward(module, tiles)
    if parts > 1:
        made, producers = recompute_norms(module, conversion, tiles)
        if parts > 2:
            keep_products_made(module, conversion, made, producers, tiles)
    return conversion


def tiles_for(module: torch.nn.Module, tiling: bool | str, tile_tokens: int | None, shards: int = 1) -> Tiles | None:
    """The calls the ``tile_feed_forward`` setting ``tiling`` takes in ``module`` (``None``: none)."""
    if tiling == AUTO:
        return auto_tiles(module, tile_tokens, shards)
    return Tiles.every(tile_tokens) if tiling else None


def apply_memory_options(
    module: torch.nn.Module, *, gradient_checkpointing: bool, tiling: bool | str, tile_tokens: int | None,
    checkpoint_policy: str = "full", shards: int = 1,
) -> Conversion:
    """Apply the options to ``module``, whose sequence ``shards`` ranks split; ``.remove()`` on the result puts it
    back."""
    tiles = tiles_for(module, tiling, tile_tokens, shards)
    conversion = apply_tiling(module, tiles) if tiles is not None else Conversion()
    if gradient_checkpointing:
        enable_checkpointing(module, conversion, checkpoint_policy)
    return conversion
