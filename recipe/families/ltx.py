"""LTX-Video text-to-video (LTXPipeline): latents normalised per channel and scaled, one token per latent voxel.

Latents are ``(z - latents_mean) * scaling_factor / latents_std`` per channel of
``latent_dist.mode()`` (``LTXPipeline._normalize_latents``), packed as the pipeline packs them
(``_pack_latents``: ``(B, C, F, H, W)`` to ``(B, F H W, C)`` at the transformer's patch size). Prompts
are T5 at the call's 128 tokens with their mask. The transformer is told the latent grid and the
rotary scale ``(temporal compression / frame_rate, spatial compression, spatial compression)`` at the
call's default 25 frames per second; the cache stores that scale with each sample, so training needs
no VAE. Time as Flux's: ``timestep = 1000 t``, the output is the velocity ``noise - x0``. Frame counts
are ``k x (temporal compression) + 1``; height and width multiples of the spatial compression.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, LTXVideoTransformer3DModel, ModelMixin

from cp_plugin.compat import ltx_normalize_latents, ltx_pack_latents, ltx_unpack_latents
from recipe.families.family import Family, unmasked, video_latents, video_tokens

# The demo model (no pretrained weights): LTX-Video's blocks, cross-attention to a masked text.
TINY_LTX: dict[str, Any] = {
    "in_channels": 8,
    "out_channels": 8,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 4,
    "attention_head_dim": 12,
    "cross_attention_dim": 48,
    "num_layers": 2,
    "caption_channels": 32,
    "qk_norm": "rms_norm_across_heads",
}
TEXT_TOKENS = 128  # LTXPipeline.__call__'s max_sequence_length
FRAME_RATE = 25  # LTXPipeline.__call__'s default frame_rate, which sets the rotary scale of time


class LTX(Family):
    name, title, transformer_class, tiny_config = "ltx", "LTX-Video", LTXVideoTransformer3DModel, TINY_LTX
    pipeline_class_name, lora_loader_name, video = "LTXPipeline", "LTXVideoLoraLoaderMixin", True
    task = "text-to-video"

    def spatial_multiple(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_spatial_compression_ratio

    def temporal_compression(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_temporal_compression_ratio

    def encode_pixels(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        latents = ltx_normalize_latents(video_latents(pipeline, pixels), pipeline.vae)
        return latents[0].transpose(0, 1)  # (F', C, H', W')

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask, _, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=pipeline.device,
                                                    max_sequence_length=TEXT_TOKENS)
        scale = [pipeline.vae_temporal_compression_ratio / FRAME_RATE, *[pipeline.vae_spatial_compression_ratio] * 2]
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask,
                "rope_interpolation_scale": torch.tensor([scale] * len(prompts))}

    def tokens(self, transformer: ModelMixin, latent_shape: tuple[int, ...]) -> int:
        config = transformer.config
        return video_tokens(latent_shape, config.patch_size_t, config.patch_size, config.patch_size)

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        config, dtype = transformer.config, transformer.dtype
        frames, height, width = x_t.shape[1], x_t.shape[3], x_t.shape[4]
        tokens = ltx_pack_latents(x_t.transpose(1, 2), config.patch_size, config.patch_size_t)
        out = transformer(
            hidden_states=tokens.to(dtype), encoder_hidden_states=text["prompt_embeds"].to(dtype),
            timestep=self.timesteps(transformer, x_t, t, text),
            encoder_attention_mask=text["prompt_attention_mask"], num_frames=frames // config.patch_size_t,
            height=height // config.patch_size, width=width // config.patch_size,
            rope_interpolation_scale=text["rope_interpolation_scale"][0],  # the same for every sample of a cache
        ).sample
        video = ltx_unpack_latents(out, frames // config.patch_size_t, height // config.patch_size,
                                   width // config.patch_size, config.patch_size, config.patch_size_t)
        return video.transpose(1, 2)  # (B, F, C, H, W)

    def timesteps(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor,
                  text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's timestep for flow times ``t`` ``(B,)``: one per sample."""
        return t * 1000

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        return {"prompt_embeds": transformer.config.caption_channels, "prompt_attention_mask": None,
                "rope_interpolation_scale": None}

    def demo_text(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**unmasked(embeds), "rope_interpolation_scale": embeds.new_ones(len(embeds), 3)}
