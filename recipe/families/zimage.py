"""Z-Image (ZImagePipeline): Flux's VAE latents, patchified by the transformer; Qwen3 prompts, each its own length.

Latents are ``(z - shift_factor) * scaling_factor`` like Flux's, but not packed: the transformer
takes a list of ``(C, 1, H, W)`` latents and makes 2x2 patches itself. The prompt goes through the
tokenizer's chat template and Qwen3's second-to-last hidden layer, and each prompt keeps only its
real tokens (``prompt_embeds[i][mask[i]]``); the cache stores them padded to 512 with the mask.
The transformer runs on reversed time ``1 - t`` and predicts the negative velocity
(``ZImagePipeline.__call__``: ``timestep = (1000 - t) / 1000``, ``noise_pred = -model_out``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin, ZImageTransformer2DModel

from recipe.families.family import MAX_SEQUENCE_LENGTH, padded_prompts, unmasked
from recipe.families.flux import Flux

# The demo model (no pretrained weights): image and caption refiners, then the joint blocks.
TINY_ZIMAGE: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 4,
    "dim": 32,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 32,
    "axes_dims": [4, 6, 6],
    "axes_lens": [576, 64, 64],  # the first covers a 512-token caption (and the image positions after it)
}


class ZImage(Flux):
    name, title, transformer_class, tiny_config = "zimage", "Z-Image", ZImageTransformer2DModel, TINY_ZIMAGE
    pipeline_class_name, lora_loader_name, video = "ZImagePipeline", "ZImageLoraLoaderMixin", False

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds = pipeline.encode_prompt(prompts, device=pipeline.device, do_classifier_free_guidance=False,
                                        max_sequence_length=MAX_SEQUENCE_LENGTH)[0]
        return padded_prompts(embeds)

    def tokens(self, transformer: ModelMixin, latent_shape: tuple[int, ...]) -> int:
        _, _, height, width = latent_shape
        patch = transformer.config.all_patch_size[0]
        return (height // patch) * (width // patch)

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        dtype = transformer.dtype
        captions = [e[m.bool()].to(dtype) for e, m in zip(text["prompt_embeds"], text["prompt_attention_mask"])]
        out = transformer(list(x_t.transpose(1, 2).to(dtype).unbind(0)), 1 - t, captions, return_dict=False)[0]
        return -torch.stack(out).transpose(1, 2)  # (B, C, 1, H, W) -> (B, 1, C, H, W)

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        return {"prompt_embeds": transformer.config.cap_feat_dim, "prompt_attention_mask": None}

    def demo_text(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return unmasked(embeds)
