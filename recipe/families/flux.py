"""Flux (FluxPipeline): packed 2x2 latent patches, T5 at 512 tokens plus pooled CLIP, guidance-distilled.

Latents are ``(z - shift_factor) * scaling_factor`` of ``latent_dist.mode()`` (``vae.config``). The
transformer takes 2x2 latent patches as one token (``in_channels`` is 4x the VAE's channels) as
``FluxPipeline`` packs them; the tiny demo Flux (patch 1) takes one token per latent pixel. Height
and width must be divisible by twice the VAE factor.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, FluxTransformer2DModel, ModelMixin

from cp_plugin.compat import flux_pack_latents
from recipe.families.family import MAX_SEQUENCE_LENGTH, Family

# The demo model (no pretrained weights): joint attention over text and image tokens, one token per latent pixel.
TINY_FLUX: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}


def flux_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Flux position ids ``(0, row, col)`` of a ``height x width`` token grid."""
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


class Flux(Family):
    name, title, transformer_class, tiny_config = "flux", "Flux", FluxTransformer2DModel, TINY_FLUX
    pipeline_class_name, lora_loader_name, video = "FluxPipeline", "FluxLoraLoaderMixin", False
    task = "text-to-image"

    def spatial_multiple(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_scale_factor * 2  # the VAE's factor, then 2x2 packing

    def encode_pixels(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipeline.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor  # (1, C, H', W') = (F, C, H, W)

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipeline.encode_prompt(prompts, device=pipeline.device, max_sequence_length=MAX_SEQUENCE_LENGTH)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def tokens(self, transformer: ModelMixin, latent_shape: tuple[int, ...]) -> int:
        _, channels, height, width = latent_shape
        if transformer.config.in_channels == 4 * channels:  # packed 2x2, as FluxPipeline does
            return (height // 2) * (width // 2)
        return height * width // transformer.config.patch_size**2

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        batch, _, channels, height, width = x_t.shape
        tokens, grid = self.image_tokens(transformer, x_t[:, 0])
        out = self.call(transformer, tokens.to(transformer.dtype), grid, t, text, guidance)
        if transformer.config.in_channels == 4 * channels:  # back to (B, C, H, W): the inverse of the packing
            out = out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        else:
            out = out.transpose(1, 2)
        return out.reshape(batch, 1, channels, height, width)

    def image_tokens(self, transformer: ModelMixin, latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The tokens ``(B, S, C')`` of latents ``(B, C, H, W)`` and their grid: 2x2 patches, as FluxPipeline packs
        them for a pretrained model, or one token per latent pixel for the demo's patch-1 model."""
        batch, channels, height, width = latents.shape
        if transformer.config.in_channels == 4 * channels:
            return flux_pack_latents(latents, batch, channels, height, width), (height // 2, width // 2)
        return latents.flatten(2).transpose(1, 2), (height, width)

    def call(self, transformer: ModelMixin, tokens: torch.Tensor, grid: tuple[int, int], t: torch.Tensor,
             text: dict[str, torch.Tensor], guidance: float) -> torch.Tensor:
        """The transformer on image tokens ``(B, S, C)`` of a ``grid`` (rows, columns), as the pipeline calls it."""
        return self.run(transformer, tokens, flux_ids(*grid, tokens.device), t, text, guidance)

    def run(self, transformer: ModelMixin, tokens: torch.Tensor, ids: torch.Tensor, t: torch.Tensor,
            text: dict[str, torch.Tensor], guidance: float) -> torch.Tensor:
        """The transformer on image tokens ``(B, S, C)`` with position ids ``(S, 3)``."""
        embeds, device = text["prompt_embeds"].to(transformer.dtype), tokens.device
        return transformer(
            hidden_states=tokens,
            encoder_hidden_states=embeds,
            pooled_projections=text["pooled_prompt_embeds"].to(transformer.dtype),
            timestep=t,
            img_ids=ids,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device),
            guidance=torch.full_like(t, guidance) if transformer.config.guidance_embeds else None,
        ).sample

    def text_dims(self, transformer: ModelMixin) -> dict[str, int]:
        config = transformer.config
        return {"prompt_embeds": config.joint_attention_dim, "pooled_prompt_embeds": config.pooled_projection_dim}

    def demo_text(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": embeds.mean(1)}
