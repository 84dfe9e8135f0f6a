"""Chroma (ChromaPipeline): Flux's latents and packing, T5 alone with its mask, no guidance embedding.

Latents are Flux's: ``(z - shift_factor) * scaling_factor``, 2x2 patches packed into one token.
Unlike Flux, Chroma encodes the prompt with T5's attention mask and keeps a mask for the
transformer: every text token up to and including the first padding token attends, the rest are
masked out (``ChromaPipeline._get_t5_prompt_embeds``); the image tokens all attend
(``_prepare_attention_mask``). Its timestep is the flow time in ``[0, 1]``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ChromaTransformer2DModel, DiffusionPipeline, ModelMixin

from recipe.families.family import MAX_SEQUENCE_LENGTH
from recipe.families.flux import TINY_FLUX, Flux

# The demo model (no pretrained weights): Flux's tiny sizes and Chroma's distilled modulation (the approximator).
TINY_CHROMA: dict[str, Any] = {
    **{key: value for key, value in TINY_FLUX.items() if key != "pooled_projection_dim"},  # no pooled CLIP text
    "approximator_num_channels": 8,
    "approximator_hidden_dim": 16,
    "approximator_layers": 1,
}


class Chroma(Flux):
    name, title, transformer_class, tiny_config = "chroma", "Chroma", ChromaTransformer2DModel, TINY_CHROMA
    pipeline_class_name, lora_loader_name, video = "ChromaPipeline", "FluxLoraLoaderMixin", False

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, mask, *_ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=pipeline.device,
                                                      max_sequence_length=MAX_SEQUENCE_LENGTH)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def run(self, transformer: ModelMixin, tokens: torch.Tensor, ids: torch.Tensor, t: torch.Tensor,
            text: dict[str, torch.Tensor], guidance: float) -> torch.Tensor:
        embeds, device = text["prompt_embeds"].to(transformer.dtype), tokens.device
        image = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
        return transformer(
            hidden_states=tokens,
            encoder_hidden_states=embeds,
            timestep=t,
            img_ids=ids,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device),
            attention_mask=torch.cat([text["prompt_attention_mask"].bool(), image], 1),
        ).sample

    def prompt_inputs(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, Any]:
        """Prompts encoded here, with boolean masks: the pipeline's own masks are 0/1 floats, which its attention
        adds as a bias (every pair of real tokens +1) rather than masking the padding. Context-parallel attention
        takes masks, not biases, so the sample is generated with the masking Chroma was trained with."""
        positive, negative = self.encode_prompts(pipeline, prompts), self.encode_prompts(pipeline, [""] * len(prompts))
        return {"prompt_embeds": positive["prompt_embeds"], "prompt_attention_mask": positive["prompt_attention_mask"].bool(),
                "negative_prompt_embeds": negative["prompt_embeds"],
                "negative_prompt_attention_mask": negative["prompt_attention_mask"].bool()}

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        return {"prompt_embeds": transformer.config.joint_attention_dim, "prompt_attention_mask": None}

    def demo_text(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": embeds, "prompt_attention_mask": embeds.new_ones(embeds.shape[:2])}
