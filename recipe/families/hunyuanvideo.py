"""HunyuanVideo text-to-video (HunyuanVideoPipeline): LLaMA hidden states with their mask, pooled CLIP, distilled guidance.

Latents are ``latent_dist.mode() * scaling_factor`` (no shift), as the pipeline's decode undoes, with
frame counts ``4k + 1`` (the VAE's temporal compression) and height and width multiples of 16 (the
pipeline's own rule: the VAE's 8x and the transformer's 2x2 patches). Prompts are what
``encode_prompt`` returns at the call's 256 tokens: each prompt formatted into the pipeline's
template, LLaMA's hidden states two layers before its last, the template's first ``crop_start``
tokens dropped; the tokenizer pads on the right, so the mask (cached, as the token refiner and the
joint attention read it) marks the prompt's leading tokens. CLIP's pooled embedding is
``pooled_projections``. The transformer is guidance-distilled: it takes the call's
``guidance_scale`` times 1000 as ``guidance`` (``model.guidance_scale``, 6.0 in ``conf/model/hunyuanvideo.yaml``:
the call's default). Time as Wan's: the scheduler's timestep is ``t * 1000``; the output is the
velocity ``noise - x0`` its Euler step integrates. The scheduler's shift (7) only places the call's
sampling steps; training draws the recipe's logit-normal times, as HunyuanVideo's report describes
its own training. Adapters load with ``pipeline.load_lora_weights`` (``HunyuanVideoLoraLoaderMixin``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, HunyuanVideoTransformer3DModel, ModelMixin

from recipe.families.family import Family, scaled_video_latents, unmasked, video_tokens

# The demo model (no pretrained weights): dual- then single-stream blocks over video and refined text tokens.
TINY_HUNYUANVIDEO: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "num_refiner_layers": 1,
    "mlp_ratio": 2.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "text_embed_dim": 32,
    "pooled_projection_dim": 32,
    "rope_axes_dim": (4, 6, 6),
}
TEXT_TOKENS = 256  # HunyuanVideoPipeline.__call__'s max_sequence_length (after the template's crop_start)


class HunyuanVideo(Family):
    name, title, transformer_class = "hunyuanvideo", "HunyuanVideo", HunyuanVideoTransformer3DModel
    tiny_config, pipeline_class_name, video = TINY_HUNYUANVIDEO, "HunyuanVideoPipeline", True
    lora_loader_name, task = "HunyuanVideoLoraLoaderMixin", "text-to-video"

    def spatial_multiple(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_scale_factor_spatial * 2  # the pipeline's own rule (16): VAE factor x the 2x2 patches

    def temporal_compression(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_scale_factor_temporal

    def encode_pixels(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        return scaled_video_latents(pipeline, pixels)

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, mask = pipeline.encode_prompt(prompts, device=pipeline.device, max_sequence_length=TEXT_TOKENS)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask.bool(), "pooled_prompt_embeds": pooled}

    def tokens(self, transformer: ModelMixin, latent_shape: tuple[int, ...]) -> int:
        config = transformer.config
        return video_tokens(latent_shape, config.patch_size_t, config.patch_size, config.patch_size)

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        dtype = transformer.dtype  # as the pipeline's loop: the mask in the transformer's dtype, guidance x 1000
        out = transformer(
            hidden_states=x_t.transpose(1, 2).to(dtype),  # (B, C, F, H, W)
            timestep=t * 1000,
            encoder_hidden_states=text["prompt_embeds"].to(dtype),
            encoder_attention_mask=text["prompt_attention_mask"].to(dtype),
            pooled_projections=text["pooled_prompt_embeds"].to(dtype),
            guidance=torch.full_like(t, guidance * 1000.0).to(dtype),
        ).sample
        return out.transpose(1, 2)

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        config = transformer.config
        return {"prompt_embeds": config.text_embed_dim, "prompt_attention_mask": None,
                "pooled_prompt_embeds": config.pooled_projection_dim}

    def demo_text(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**unmasked(embeds), "pooled_prompt_embeds": embeds.mean(1)}
