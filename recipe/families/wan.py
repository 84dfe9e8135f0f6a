"""Wan 2.1 text-to-video (WanPipeline): 5-D latents normalised per channel, UMT5 at 512 tokens.

Latents are ``(z - latents_mean) / latents_std`` per channel of ``latent_dist.mode()``
(``vae.config``). Its ``encode_prompt`` defaults to 226 tokens, its ``__call__`` uses 512. Height
and width must be multiples of the VAE's factor times the transformer's 2x2 patch (16 for Wan 2.1
and Wan 2.2 A14B, 32 for Wan 2.2 TI2V-5B's 16x VAE), frame counts be ``4k + 1``.

Wan 2.2 TI2V-5B (a ``WanPipeline`` with ``expand_timesteps``) gives the transformer a timestep per
token, from a mask that is all ones in text-to-video: every token gets the sample's timestep, which
is what the one timestep per sample computes, so it trains as this family.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin, WanTransformer3DModel

from recipe.families.family import MAX_SEQUENCE_LENGTH, Family, video_latents, video_tokens

# The demo model (no pretrained weights): 3D video patches, cross-attention to the text.
TINY_WAN: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}


class Wan(Family):
    name, title, transformer_class, tiny_config = "wan", "Wan", WanTransformer3DModel, TINY_WAN
    pipeline_class_name, lora_loader_name, video = "WanPipeline", "WanLoraLoaderMixin", True
    task = "text-to-video"

    def spatial_multiple(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_scale_factor_spatial * 2  # WanPipeline's own rule: VAE factor x the transformers' patch 2

    def temporal_compression(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_scale_factor_temporal

    def encode_pixels(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipeline.vae
        latents = video_latents(pipeline, pixels)[0]  # (C, F', H', W')
        shape = (-1, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return ((latents - mean) / std).transpose(0, 1)  # (F', C, H', W')

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False,
                                           max_sequence_length=MAX_SEQUENCE_LENGTH, device=pipeline.device)
        return {"prompt_embeds": embeds}

    def tokens(self, transformer: ModelMixin, latent_shape: tuple[int, ...]) -> int:
        return video_tokens(latent_shape, *transformer.config.patch_size)

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        dtype = transformer.dtype  # video: (B, C, F, H, W), timesteps in [0, 1000]
        out = transformer(x_t.transpose(1, 2).to(dtype), t * 1000, text["prompt_embeds"].to(dtype)).sample
        return out.transpose(1, 2)

    def text_dims(self, transformer: ModelMixin) -> dict[str, int]:
        return {"prompt_embeds": transformer.config.text_dim}
