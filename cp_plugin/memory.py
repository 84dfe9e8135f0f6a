"""A run's memory options, applied to the models it trains and undone with them.

Context parallelism divides a step's activations by the CP size; what is left per rank is what
activation checkpointing and tiling bring down further, and users turn checkpointing on first:

- ``gradient_checkpointing``: each trained diffusers model's own ``enable_gradient_checkpointing()``
  (its blocks are recomputed in the backward; under context parallelism a recompute splits nothing
  again, only each block's attention exchanges run twice);
- ``tile_feed_forward``: every feed-forward network (found by structure, :mod:`cp_plugin.tiling`)
  over its tokens a chunk at a time, ``tile_tokens`` per chunk or chosen per call.

Both work with or without context parallelism, so a one-process run can use the same options.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin

from cp_plugin.compat import supports_gradient_checkpointing
from cp_plugin.model import Conversion
from cp_plugin.tiling import tile_feed_forward


def trained_models(module: torch.nn.Module) -> list[tuple[str, ModelMixin]]:
    """The diffusers models in ``module`` that have trainable parameters (a frozen VAE or text encoder has none)."""
    return [(name or type(sub).__name__, sub) for name, sub in module.named_modules()
            if isinstance(sub, ModelMixin) and any(p.requires_grad for p in sub.parameters())]


def enable_checkpointing(module: torch.nn.Module, conversion: Conversion) -> None:
    """Turn on every trained diffusers model's gradient checkpointing, recording how to turn it off again."""
    models = trained_models(module)
    unsupported = [name for name, model in models if not supports_gradient_checkpointing(model)]
    if unsupported:
        raise ValueError(
            f"gradient_checkpointing=True: {', '.join(unsupported)} ({type(dict(models)[unsupported[0]]).__name__}) "
            "does not support gradient checkpointing in diffusers; set gradient_checkpointing=False "
            "(Hydra: parallel.gradient_checkpointing=false) or freeze that model"
        )
    for _, model in models:
        if not model.is_gradient_checkpointing:
            model.enable_gradient_checkpointing()
            conversion.on_remove(model.disable_gradient_checkpointing)


def apply_memory_options(
    module: torch.nn.Module, *, gradient_checkpointing: bool, tiling: bool, tile_tokens: int | None
) -> Conversion:
    """Apply the options to ``module``; ``.remove()`` on the result puts it back."""
    conversion = tile_feed_forward(module, tile_tokens) if tiling else Conversion()
    if gradient_checkpointing:
        enable_checkpointing(module, conversion)
    return conversion
