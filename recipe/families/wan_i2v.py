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

Wan 2.2 TI2V-5B's pipeline (``expand_timesteps``) conditions otherwise: the first frame's normalised
latents, encoded alone, are the first latent frame of the transformer's input, clean, with a timestep
per token that is zero on that frame's; the transformer takes the latents alone (``in_channels``
equals ``out_channels``) and sampling updates only the later frames. The cache then holds that frame
as ``first_frame``; training gives it clean, its tokens time zero, and reads the loss on the later
frames. Context parallelism splits the per-token timesteps with the tokens (Wan's plan does).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ModelMixin
from PIL import Image

from recipe.families.family import first_frame_given
from recipe.families.wan import TINY_WAN, Wan

# The demo model (no pretrained weights): Wan's, taking the condition's channels and a CLIP image embedding.
TINY_WAN_I2V: dict[str, Any] = {**TINY_WAN, "in_channels": 2 * TINY_WAN["in_channels"] + 4, "image_dim": 16,
                                "added_kv_proj_dim": TINY_WAN["num_attention_heads"] * TINY_WAN["attention_head_dim"]}


class WanI2V(Wan):
    name, title, tiny_config, task = "wan_i2v", "Wan image-to-video", TINY_WAN_I2V, "image-to-video"
    pipeline_class_name = "WanImageToVideoPipeline"

    def input_channels(self, channels: int) -> tuple[int, ...]:
        # the noisy latents, the mask's 4 channels, the condition's latents; or (TI2V) the latents alone
        return (2 * channels + 4, channels)

    @staticmethod
    def stacks_condition(transformer: ModelMixin) -> bool:
        """Whether the transformer takes the condition stacked on channels (Wan 2.1 / 2.2 A14B I2V), not as the
        clean first latent frame (TI2V-5B, whose input is the latents alone)."""
        return transformer.config.in_channels != transformer.config.out_channels

    def encode_conditioning(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        first = pixels[:1]  # (1, 3, H, W) in [-1, 1]
        if pipeline.config.expand_timesteps:  # TI2V: the first frame alone, normalised as the target
            return {"first_frame": self.encode_pixels(pipeline, first)}
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

    def noisy_latents(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      text: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        x_t, given = super().noisy_latents(x0, noise, t, text)
        return first_frame_given(x_t, text["first_frame"]) if "first_frame" in text else (x_t, given)

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        dtype = transformer.dtype  # video: (B, C, F, H, W), timesteps in [0, 1000]
        image = text["image_embeds"].to(dtype) if "image_embeds" in text else None
        if "first_frame" in text:  # TI2V: a timestep per 2x2 patch, zero on the given frame's (the pipeline's loop)
            patch = transformer.config.patch_size
            frames, height, width = x_t.shape[1] // patch[0], x_t.shape[3] // patch[1], x_t.shape[4] // patch[2]
            noised = (torch.arange(frames, device=x_t.device) >= text["first_frame"].shape[1]).to(t.dtype)
            timestep = (t[:, None, None] * 1000 * noised[None, :, None]).expand(-1, -1, height * width).flatten(1)
            inputs = x_t
        else:
            timestep, inputs = t * 1000, torch.cat([x_t, text["condition"].to(x_t.dtype)], 2)
        out = transformer(inputs.transpose(1, 2).to(dtype), timestep, text["prompt_embeds"].to(dtype),
                          encoder_hidden_states_image=image).sample
        return out.transpose(1, 2)

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        given = "condition" if self.stacks_condition(transformer) else "first_frame"
        dims: dict[str, int | None] = {**super().text_dims(transformer), given: None}
        if transformer.config.image_dim is not None:
            dims["image_embeds"] = transformer.config.image_dim
        return dims

    def image_inputs(self, pipeline: DiffusionPipeline, image: Any, height: int, width: int) -> dict[str, Any]:
        return {"image": image.resize((width, height))}
