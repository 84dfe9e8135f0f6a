"""Wan image-to-video (WanImageToVideoPipeline): Wan's latents and prompts, conditioned on the clip's first frame.

As ``WanImageToVideoPipeline.prepare_latents`` builds it, the condition is the VAE's normalised
latents of a video whose first frame is the clip's and whose other frames are zeros, after a mask of
``vae_scale_factor_temporal`` channels (ones on the first latent frame's four source frames, zeros
after); the transformer takes the noisy latents and the condition stacked on channels
(``in_channels = 2 C + 4``). Wan 2.1's I2V models also take the first frame's CLIP image embedding
(the second-to-last hidden layer of the pipeline's ``image_encoder``) as extra cross-attention keys;
models without an image encoder (Wan 2.2 A14B I2V) take none. The cache stores both, so training
loads neither the VAE nor the image encoder. Context parallelism splits the video tokens, condition
channels included; the image embedding, like the text, is never split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ModelMixin
from PIL import Image

from recipe.families.wan import TINY_WAN, Wan

# The demo model (no pretrained weights): Wan's, taking the condition's channels and a CLIP image embedding.
TINY_WAN_I2V: dict[str, Any] = {**TINY_WAN, "in_channels": 2 * TINY_WAN["in_channels"] + 4, "image_dim": 16,
                                "added_kv_proj_dim": TINY_WAN["num_attention_heads"] * TINY_WAN["attention_head_dim"]}


class WanI2V(Wan):
    name, title, tiny_config, task = "wan_i2v", "Wan image-to-video", TINY_WAN_I2V, "image-to-video"
    pipeline_class_name = "WanImageToVideoPipeline"

    def input_channels(self, channels: int) -> tuple[int, ...]:
        return (2 * channels + 4,)  # the noisy latents, the mask's 4 channels, the condition's latents

    def encode_conditioning(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        first = pixels[:1]  # (1, 3, H, W) in [-1, 1]
        video = torch.cat([first, first.new_zeros(len(pixels) - 1, *first.shape[1:])])
        condition = self.encode_pixels(pipeline, video)  # (F', C, H', W'), normalised as the target
        temporal = pipeline.vae_scale_factor_temporal
        mask = condition.new_zeros(condition.shape[0], temporal, *condition.shape[2:])
        mask[0] = 1  # the first latent frame holds the given frame (its `temporal` source frames)
        tensors = {"condition": torch.cat([mask, condition], 1)}
        if getattr(pipeline, "image_encoder", None) is not None:
            frame = ((first[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
            tensors["image_embeds"] = pipeline.encode_image(Image.fromarray(np.asarray(frame)), pipeline.device)[0]
        return tensors

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        dtype = transformer.dtype  # video: (B, C, F, H, W), timesteps in [0, 1000]
        inputs = torch.cat([x_t, text["condition"].to(x_t.dtype)], 2).transpose(1, 2).to(dtype)
        image = text["image_embeds"].to(dtype) if "image_embeds" in text else None
        out = transformer(inputs, t * 1000, text["prompt_embeds"].to(dtype), encoder_hidden_states_image=image).sample
        return out.transpose(1, 2)

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        dims: dict[str, int | None] = {**super().text_dims(transformer), "condition": None}
        if transformer.config.image_dim is not None:
            dims["image_embeds"] = transformer.config.image_dim
        return dims

    def image_inputs(self, pipeline: DiffusionPipeline, image: Any, height: int, width: int) -> dict[str, Any]:
        return {"image": image.resize((width, height))}
