"""Flux.2 (Flux2Pipeline): 2x2-patchified latents normalised by the VAE's BatchNorm, stacked Mistral3 layers, 4-axis ids.

The VAE (``AutoencoderKLFlux2``) latents are ``latent_dist.mode()``, each 2x2 patch folded into the
channels, then normalised per (patchified) channel by the VAE's BatchNorm running statistics: the
pipeline's ``_encode_vae_image``, the inverse of what ``__call__`` does before decoding. The cache
holds those ``(1, 4C, H / 2, W / 2)`` latents, the space of the pipeline's denoising loop (its noise is
drawn there), and the transformer takes one token per cached latent pixel (``in_channels`` is the
cached channels). The prompt is the pipeline's ``encode_prompt``: its system message and the user's
prompt through the tokenizer's chat template, padded to 512 tokens, and Mistral3's hidden states at
layers 10, 20 and 30 side by side per token; the transformer attends to all 512 (no mask), so all are
cached. Position ids have four axes ``(t, h, w, l)``: ``(0, row, col, 0)`` for image tokens and
``(0, 0, 0, index)`` for text, batched ``(B, S, 4)`` as the pipeline passes them (diffusers' context
parallel plan splits them with the tokens). The transformer runs on the flow time itself
(``timestep / 1000``) with the embedded guidance ``model.guidance_scale`` (the pipeline always passes
it; a transformer without ``guidance_embeds`` ignores it) and predicts the velocity ``noise - x0``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, Flux2Transformer2DModel, ModelMixin

from cp_plugin.compat import flux2_image_latents
from recipe.families.family import MAX_SEQUENCE_LENGTH, Family

# The demo model (no pretrained weights): dual-stream then single-stream blocks, RoPE over the four id axes.
TINY_FLUX2: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,  # 2x2 patches of 4 latent channels
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 48,  # three text-encoder layers of 16
    "timestep_guidance_channels": 32,
    "axes_dims_rope": (4, 4, 4, 4),
}


def image_ids(batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """Flux.2 position ids ``(0, row, col, 0)`` of a ``height x width`` token grid, ``(batch, H W, 4)``
    (``Flux2Pipeline.prepare_latents``' ``latent_ids``)."""
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], -1).reshape(1, -1, 4).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Flux.2 position ids ``(0, 0, 0, index)`` of ``length`` text tokens, ``(batch, length, 4)``
    (``Flux2Pipeline.encode_prompt``'s ``text_ids``)."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids.expand(batch, -1, -1)


class Flux2(Family):
    name, title, transformer_class, tiny_config = "flux2", "Flux.2", Flux2Transformer2DModel, TINY_FLUX2
    pipeline_class_name, lora_loader_name, video = "Flux2Pipeline", "Flux2LoraLoaderMixin", False
    task = "text-to-image"

    def spatial_multiple(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_scale_factor * 2  # the VAE's factor, then 2x2 patches

    def input_channels(self, channels: int) -> tuple[int, ...]:
        return (channels,)  # the cached latents are patchified already: one token per latent pixel

    def encode_pixels(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipeline.vae
        return flux2_image_latents(pipeline, pixels.to(vae.device, vae.dtype))  # (1, 4C, H'/2, W'/2) = (F, C, H, W)

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = pipeline.encode_prompt(prompts, device=pipeline.device, max_sequence_length=MAX_SEQUENCE_LENGTH)
        return {"prompt_embeds": embeds}

    def tokens(self, transformer: ModelMixin, latent_shape: tuple[int, ...]) -> int:
        _, _, height, width = latent_shape
        return height * width

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        batch, _, channels, height, width = x_t.shape
        tokens = x_t[:, 0].flatten(2).transpose(1, 2)  # (B, H W, C): Flux2Pipeline._pack_latents
        embeds, device = text["prompt_embeds"].to(transformer.dtype), x_t.device
        out = transformer(
            hidden_states=tokens.to(transformer.dtype),
            encoder_hidden_states=embeds,
            timestep=t,
            guidance=self.guidance(t, guidance),
            img_ids=image_ids(batch, height, width, device),
            txt_ids=text_ids(batch, embeds.shape[1], device),
        ).sample
        return out.transpose(1, 2).reshape(batch, 1, channels, height, width)

    def guidance(self, t: torch.Tensor, scale: float) -> torch.Tensor | None:
        """The ``guidance`` the pipeline's loop passes the transformer: the scale, per sample."""
        return torch.full_like(t, scale)

    def text_dims(self, transformer: ModelMixin) -> dict[str, int]:
        return {"prompt_embeds": transformer.config.joint_attention_dim}
