"""HunyuanVideo 1.5 text-to-video (HunyuanVideo15Pipeline): two text encoders, a zero condition and image slot.

Latents are ``latent_dist.mode() * scaling_factor`` (no shift), as the pipeline's decode undoes. The
transformer takes ``in_channels = 2 C + 1``: the noisy latents, then what
``prepare_cond_latents_and_mask`` gives text-to-video (zero condition latents and a zero mask
channel). Prompts are what ``encode_prompt`` returns, cached whole: Qwen2.5-VL's hidden states at
the pipeline's 1000 tokens after its system template, with their mask, and ByT5's 256 tokens of the
quoted glyph text (zeros and an empty mask when the prompt quotes none). The image slot gets what
the pipeline's text-to-video call gives it: zeros of ``(729, image_embed_dim)``, which the
transformer masks out. Time as Wan's: ``t * 1000``; the output is the velocity.

The pipeline has no LoRA loader of its own: adapters are written in diffusers' format (the
HunyuanVideo loader's ``save_lora_weights``) and load with
``pipeline.transformer.load_lora_adapter(directory, weight_name="pytorch_lora_weights.safetensors",
prefix="transformer")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, HunyuanVideo15Transformer3DModel, ModelMixin

from recipe.families.family import Family, scaled_video_latents, unmasked, video_tokens

# The demo model (no pretrained weights): 4 latent channels, condition and mask channels, both text encoders.
TINY_HUNYUANVIDEO15: dict[str, Any] = {
    "in_channels": 9,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_refiner_layers": 1,
    "mlp_ratio": 2.0,
    "text_embed_dim": 32,
    "text_embed_2_dim": 16,
    "image_embed_dim": 16,
    "rope_axes_dim": (4, 6, 6),
    "target_size": 32,
    "task_type": "t2v",
}
IMAGE_TOKENS = 729  # the SigLIP tokens of the image slot, zeros in text-to-video (HunyuanVideo15Pipeline)


class HunyuanVideo15(Family):
    name, title, transformer_class = "hunyuanvideo15", "HunyuanVideo 1.5", HunyuanVideo15Transformer3DModel
    tiny_config, pipeline_class_name, video = TINY_HUNYUANVIDEO15, "HunyuanVideo15Pipeline", True
    lora_loader_name, task = "HunyuanVideoLoraLoaderMixin", "text-to-video"

    def spatial_multiple(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_scale_factor_spatial  # the pipeline's own rule (the published transformers' patch is 1)

    def temporal_compression(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_scale_factor_temporal

    def input_channels(self, channels: int) -> tuple[int, ...]:
        return (2 * channels + 1,)  # the noisy latents, the (zero) condition latents, the (zero) mask channel

    def encode_pixels(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        return scaled_video_latents(pipeline, pixels)

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask, embeds_2, mask_2 = pipeline.encode_prompt(prompts, device=pipeline.device,
                                                                batch_size=len(prompts))
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask.bool(),
                "prompt_embeds_2": embeds_2, "prompt_attention_mask_2": mask_2.bool()}

    def tokens(self, transformer: ModelMixin, latent_shape: tuple[int, ...]) -> int:
        config = transformer.config
        return video_tokens(latent_shape, config.patch_size_t, config.patch_size, config.patch_size)

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        dtype = transformer.dtype
        latents = x_t.transpose(1, 2).to(dtype)  # (B, C, F, H, W)
        condition, image = self.condition_channels(latents, text), self.image_slot(transformer, latents, text)
        if "prompt_embeds_2" in text:
            glyph, glyph_mask = text["prompt_embeds_2"].to(dtype), text["prompt_attention_mask_2"].to(dtype)
        else:  # no glyph text (the demo's learned prompts): one masked token, which attends and is attended by nothing
            glyph = latents.new_zeros(len(latents), 1, transformer.config.text_embed_2_dim)
            glyph_mask = latents.new_zeros(len(latents), 1)
        out = transformer(
            hidden_states=torch.cat([latents, condition], 1),
            timestep=(t * 1000).to(dtype),
            encoder_hidden_states=text["prompt_embeds"].to(dtype),
            encoder_attention_mask=text["prompt_attention_mask"].to(dtype),
            encoder_hidden_states_2=glyph,
            encoder_attention_mask_2=glyph_mask,
            image_embeds=image,
        ).sample
        return out.transpose(1, 2)

    def condition_channels(self, latents: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The channels after the noisy latents ``(B, C, F, H, W)``: text-to-video's zero condition and mask."""
        return latents.new_zeros(latents.shape[0], latents.shape[1] + 1, *latents.shape[2:])

    def image_slot(self, transformer: ModelMixin, latents: torch.Tensor,
                   text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The image tokens the transformer takes: text-to-video's zeros, which it masks out."""
        return latents.new_zeros(len(latents), IMAGE_TOKENS, transformer.config.image_embed_dim)

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        config = transformer.config
        return {"prompt_embeds": config.text_embed_dim, "prompt_attention_mask": None,
                "prompt_embeds_2": config.text_embed_2_dim, "prompt_attention_mask_2": None}

    def demo_text(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return unmasked(embeds)

    def load_lora(self, pipeline: DiffusionPipeline, directory: Path) -> None:
        pipeline.transformer.load_lora_adapter(directory, weight_name="pytorch_lora_weights.safetensors",
                                               prefix="transformer")
