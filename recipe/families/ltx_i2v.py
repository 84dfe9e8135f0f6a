"""LTX-Video image-to-video (LTXImageToVideoPipeline): LTX's latents, the first latent frame given clean.

``LTXImageToVideoPipeline.prepare_latents`` encodes the image as a one-frame video, normalises it as
the target and puts it in the first latent frame of the noisy latents, with a conditioning mask that
is one on that frame's tokens; the transformer takes a timestep per token, ``t (1 - mask)``, so the
given frame is at time zero, and each sampling step updates only the later frames. Training does
the same: the clip's first frame, encoded alone (what the pipeline encodes from the image), is cached
as ``condition`` and replaces the first latent frame of the noisy input; its tokens get time zero;
the loss reads the later frames only. Context parallelism splits the per-token timesteps with the
tokens, like the rest of the sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin

from cp_plugin.compat import ltx_pack_latents
from recipe.families.family import first_frame_given
from recipe.families.ltx import LTX


class LTXI2V(LTX):
    name, title, task = "ltx_i2v", "LTX-Video image-to-video", "image-to-video"
    pipeline_class_name = "LTXImageToVideoPipeline"

    def check_size(self, pipeline: DiffusionPipeline, frames: int, height: int, width: int) -> str | None:
        if frames == 1:  # the one latent frame would be the given one, leaving nothing to learn
            return f"{self.title} generates the frames after the first: frames must be more than 1"
        return super().check_size(pipeline, frames, height, width)

    def encode_conditioning(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"condition": self.encode_pixels(pipeline, pixels[:1])}  # (1, C, H', W'): the first frame alone

    def noisy_latents(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      text: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return first_frame_given(super().noisy_latents(x0, noise, t, text)[0], text["condition"])

    def timesteps(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor,
                  text: dict[str, torch.Tensor]) -> torch.Tensor:
        """A timestep per token, zero on the given frame's (``t (1 - conditioning mask)``, packed as the latents)."""
        config = transformer.config
        mask = x_t.new_zeros(x_t.shape[0], 1, *x_t.shape[1:2], *x_t.shape[3:])  # (B, 1, F, H, W)
        mask[:, :, : text["condition"].shape[1]] = 1
        per_token = ltx_pack_latents(mask, config.patch_size, config.patch_size_t).squeeze(-1)
        return t[:, None] * 1000 * (1 - per_token)

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        return {**super().text_dims(transformer), "condition": None}

    def image_inputs(self, pipeline: DiffusionPipeline, image: Any, height: int, width: int) -> dict[str, Any]:
        return {"image": image.resize((width, height))}
