"""Stable Diffusion 3 and 3.5 (StableDiffusion3Pipeline): joint attention over CLIP-L + CLIP-G + T5 text and latent patches.

Latents are Flux's kind of normalisation, ``(z - shift_factor) * scaling_factor``, not packed: the
transformer makes 2x2 patches of ``(B, C, H, W)`` itself. Prompts as the pipeline's own call encodes
them: both CLIPs' second-to-last layers side by side (zero-padded to T5's width), followed by T5's
256 tokens (the call's ``max_sequence_length``), and the two CLIPs' pooled projections together. The
transformer runs on ``timestep = 1000 t`` and predicts the velocity ``noise - x0``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin, SD3Transformer2DModel

from recipe.families.family import Family
from recipe.families.flux import Flux

# The demo model (no pretrained weights): MM-DiT blocks, joint attention over text and image patches.
TINY_SD3: dict[str, Any] = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 32,
}
T5_TOKENS = 256  # StableDiffusion3Pipeline.__call__'s max_sequence_length


class SD3(Family):
    name, title, transformer_class, tiny_config = "sd3", "SD3", SD3Transformer2DModel, TINY_SD3
    pipeline_class_name, lora_loader_name, video = "StableDiffusion3Pipeline", "SD3LoraLoaderMixin", False
    task = "text-to-image"

    encode_pixels = Flux.encode_pixels  # shift and scale of latent_dist.mode()
    demo_text = Flux.demo_text

    def spatial_multiple(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_scale_factor * pipeline.patch_size

    def input_channels(self, channels: int) -> tuple[int, ...]:
        return (channels,)  # the transformer patchifies the latents itself

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipeline.encode_prompt(prompts, prompts, prompts, device=pipeline.device,
                                                      do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def tokens(self, transformer: ModelMixin, latent_shape: tuple[int, ...]) -> int:
        _, _, height, width = latent_shape
        return (height // transformer.config.patch_size) * (width // transformer.config.patch_size)

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        dtype = transformer.dtype
        out = transformer(hidden_states=x_t[:, 0].to(dtype), encoder_hidden_states=text["prompt_embeds"].to(dtype),
                          pooled_projections=text["pooled_prompt_embeds"].to(dtype), timestep=t * 1000).sample
        return out.unsqueeze(1)

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        config = transformer.config
        return {"prompt_embeds": config.joint_attention_dim, "pooled_prompt_embeds": config.pooled_projection_dim}
