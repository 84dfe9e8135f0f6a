"""HunyuanVideo 1.5 image-to-video (HunyuanVideo15ImageToVideoPipeline): the clip's first frame as condition.

``prepare_cond_latents_and_mask`` gives the transformer, after the noisy latents, the image's latents
(``latent_dist.mode() * scaling_factor`` of the image as a one-frame video) on the first latent frame
and zeros after, then a mask channel that is one on the first latent frame; the image slot gets the
image's SigLIP tokens (``encode_image``: the image encoder's last hidden state), which the
transformer attends like text, unmasked. The cache holds the first frame's latents (``condition``)
and SigLIP tokens (``image_embeds``), so training loads neither the VAE nor the image encoder.
Context parallelism splits the video tokens, condition channels included; like the text, the image
tokens are never split. The pipeline takes no height or width: it sizes the video from the image
(the transformer's ``target_size`` buckets), so validation samples follow the reference image's shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ModelMixin
from PIL import Image

from recipe.families.hunyuanvideo15 import HunyuanVideo15


class HunyuanVideo15I2V(HunyuanVideo15):
    name, title, task = "hunyuanvideo15_i2v", "HunyuanVideo 1.5 image-to-video", "image-to-video"
    pipeline_class_name = "HunyuanVideo15ImageToVideoPipeline"

    def encode_conditioning(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        first = pixels[:1]  # (1, 3, H, W) in [-1, 1]
        frame = ((first[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        image = Image.fromarray(np.asarray(frame))
        return {"condition": self.encode_pixels(pipeline, first),  # (1, C, H', W'): the image as a one-frame video
                "image_embeds": pipeline.encode_image(image, 1, pipeline.device, pipeline.image_encoder.dtype)[0]}

    def condition_channels(self, latents: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        condition = torch.zeros_like(latents)  # (B, C, F, H, W): the image's latents on the first frame, zeros after
        condition[:, :, :1] = text["condition"].transpose(1, 2).to(latents.dtype)
        mask = latents.new_zeros(latents.shape[0], 1, *latents.shape[2:])
        mask[:, :, 0] = 1
        return torch.cat([condition, mask], 1)

    def image_slot(self, transformer: ModelMixin, latents: torch.Tensor,
                   text: dict[str, torch.Tensor]) -> torch.Tensor:
        return text["image_embeds"].to(latents.dtype)

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        return {**super().text_dims(transformer), "condition": None,
                "image_embeds": transformer.config.image_embed_dim}

    def image_inputs(self, pipeline: DiffusionPipeline, image: Any, height: int, width: int) -> dict[str, Any]:
        return {"image": image.resize((width, height))}
