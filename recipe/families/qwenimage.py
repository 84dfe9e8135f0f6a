"""QwenImage (QwenImagePipeline): Wan-style latents packed as Flux's, Qwen2.5-VL prompts of their own lengths.

The VAE (``AutoencoderKLQwenImage``) is Wan's kind: one-frame videos, latents normalised per channel
by ``latents_mean`` and ``latents_std``. The transformer takes 2x2 latent patches packed exactly as
Flux's, with ``img_shapes`` (frames, rows, columns) for its rotary table. Prompts go through the
pipeline's system template and Qwen2.5-VL's last hidden layer, with the template's first tokens
dropped; each prompt keeps its own tokens, cached padded to 512 with the mask, which the transformer
takes as ``encoder_hidden_states_mask``. Time as Flux's: ``timestep / 1000`` is the flow time.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin, QwenImageTransformer2DModel

from recipe.families.family import MAX_SEQUENCE_LENGTH, padded_prompts, unmasked
from recipe.families.flux import Flux
from recipe.families.wan import Wan

# The demo model (no pretrained weights): dual-stream joint attention over text and image tokens.
TINY_QWENIMAGE: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,  # 2x2 patches of 4 latent channels
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}


class QwenImage(Flux):
    name, title, transformer_class, tiny_config = "qwenimage", "QwenImage", QwenImageTransformer2DModel, TINY_QWENIMAGE
    pipeline_class_name, lora_loader_name, video = "QwenImagePipeline", "QwenImageLoraLoaderMixin", False

    encode_pixels = Wan.encode_pixels  # the same kind of VAE and normalisation, on one frame

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask = pipeline.encode_prompt(prompts, device=pipeline.device, max_sequence_length=MAX_SEQUENCE_LENGTH)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        return padded_prompts([tokens[real] for tokens, real in zip(embeds, mask)])

    def call(self, transformer: ModelMixin, tokens: torch.Tensor, grid: tuple[int, int], t: torch.Tensor,
             text: dict[str, torch.Tensor], guidance: float) -> torch.Tensor:
        return self.images_call(transformer, tokens, [(1, *grid)], t, text)

    def images_call(self, transformer: ModelMixin, tokens: torch.Tensor, shapes: list[tuple[int, int, int]],
                    t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer on the tokens ``(B, S, C)`` of images of ``shapes`` (frames, rows, columns) one after
        the other, each sample's ``img_shapes`` as the pipelines pass them (one image, or the edit's two)."""
        return transformer(
            hidden_states=tokens,
            encoder_hidden_states=text["prompt_embeds"].to(transformer.dtype),
            encoder_hidden_states_mask=text["prompt_attention_mask"],
            timestep=t,
            img_shapes=[shapes] * len(tokens),
        ).sample

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        return {"prompt_embeds": transformer.config.joint_attention_dim, "prompt_attention_mask": None}

    def demo_text(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return unmasked(embeds)
