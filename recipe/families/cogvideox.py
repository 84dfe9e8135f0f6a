"""CogVideoX text-to-video (CogVideoXPipeline): T5 at 226 tokens before the video tokens, v-prediction on a DDPM schedule.

What the pipeline does: ``encode_prompt`` pads T5's tokens of the prompt to the call's 226
(``max_sequence_length``, the transformer's ``max_text_seq_length``) with no mask, the transformer
attending the padding too, so the cache keeps all 226 states. The transformer takes latents in the
pipeline's own ``(B, F, C, H, W)`` layout, which are ``latent_dist.mode() * scaling_factor`` (what
``decode_latents`` undoes), the integer DDPM timestep, and, with ``use_rotary_positional_embeddings``
(CogVideoX-5B, 1.5), the pipeline's 3D rotary table of the latent grid, computed from the latents' size
with the pipeline's own method (``cogvideox_rotary_embeddings``): training needs no VAE. Frame counts are
``4k + 1`` (the VAE's temporal compression); height and width multiples of the VAE's spatial factor
times the transformer's 2x2 patch. CogVideoX 1.5 patches ``patch_size_t`` latent frames together: its
pipeline pads the latent frames to a multiple of it with noise it throws away, so training takes frame
counts whose latents need no padding and names the rule otherwise. The ``ofs`` embedding
(``ofs_embed_dim``) belongs to CogVideoX 1.5's image-to-video transformer, which CogVideoXPipeline
cannot run (it gives no ``ofs``): such a transformer is refused.

How training matches the model's own (CogVideoX's fine-tuning scripts: diffusers'
``train_cogvideox_lora.py``, finetrainers): the model predicts ``v`` on the pipeline scheduler's DDPM
schedule (``v_prediction``, zero terminal SNR, ``snr_shift_scale``; its ``alphas_cumprod`` is what the
validation call's DDIM or DPM steps use). Times are integer timesteps uniform in ``[0,
num_train_timesteps)``; ``x_t = scheduler.add_noise(x0, noise, t)``; the output becomes an estimate of
``x0`` with ``scheduler.get_velocity(output, x_t, t)`` (``sqrt(a) x_t - sqrt(1 - a) v``), and the loss is
its squared error to ``x0`` weighted by ``1 / (1 - alphas_cumprod[t])``, which makes it the squared
error of ``v`` itself.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel, DiffusionPipeline, ModelMixin

from cp_plugin.compat import cogvideox_rotary_embeddings
from recipe.families.family import Family, scaled_video_latents, video_tokens

# The demo model (no pretrained weights): CogVideoX-5B's layout (rotary positions), text joined before the video.
TINY_COGVIDEOX: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 8,
    "text_embed_dim": 32,
    "num_layers": 2,
    "sample_width": 8,
    "sample_height": 8,
    "sample_frames": 5,
    "patch_size": 2,
    "use_rotary_positional_embeddings": True,
}
TEXT_TOKENS = 226  # CogVideoXPipeline.__call__'s max_sequence_length
PATCH = 2  # every published CogVideoX transformer's patch_size (the pipeline folder's prepare.py loads no transformer)


class CogVideoX(Family):
    name, title, transformer_class, tiny_config = "cogvideox", "CogVideoX", CogVideoXTransformer3DModel, TINY_COGVIDEOX
    pipeline_class_name, lora_loader_name, video = "CogVideoXPipeline", "CogVideoXLoraLoaderMixin", True
    task, objective = "text-to-video", "v-prediction on a DDPM schedule"
    scheduler: CogVideoXDDIMScheduler  # the pipeline's noise schedule (trained_from)

    def trained_from(self, pretrained_path: str | None) -> CogVideoX:
        """A copy holding the pipeline folder's scheduler (its config: CogVideoXDPMScheduler, which some folders name,
        has the same schedule, ``add_noise`` and ``get_velocity``)."""
        if pretrained_path is None:
            raise ValueError(f"{self.title} trains on its pipeline's noise schedule (scheduler/): set "
                             "model.pretrained_path to a CogVideoXPipeline folder or Hub id")
        try:
            scheduler = CogVideoXDDIMScheduler.from_pretrained(pretrained_path, subfolder="scheduler")
        except OSError as missing:
            raise ValueError(f"model.pretrained_path={pretrained_path!r} has no scheduler/ ({missing}); {self.title} "
                             "trains on its pipeline's noise schedule: point it at the CogVideoXPipeline folder") from None
        if scheduler.config.prediction_type != "v_prediction":
            raise ValueError(f"model.pretrained_path={pretrained_path!r}: its scheduler's prediction_type is "
                             f"{scheduler.config.prediction_type!r}; {self.title} trains v_prediction models")
        bound = copy.copy(self)
        bound.scheduler = scheduler
        return bound

    def spatial_multiple(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_scale_factor_spatial * PATCH

    def temporal_compression(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_scale_factor_temporal

    def encode_pixels(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        return scaled_video_latents(pipeline, pixels)

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS,
                                           device=pipeline.device)
        return {"prompt_embeds": embeds}

    def tokens(self, transformer: ModelMixin, latent_shape: tuple[int, ...]) -> int:
        config = transformer.config
        return video_tokens(latent_shape, config.patch_size_t or 1, config.patch_size, config.patch_size)

    def draw_time(self, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """An integer timestep, uniform over the schedule's (the fine-tuning scripts' ``torch.randint``)."""
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (), generator=generator, device=device)

    def noisy_latents(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      text: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return self.scheduler.add_noise(x0, noise, t), 0

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        config, dtype = transformer.config, transformer.dtype
        frames, height, width = x_t.shape[1], x_t.shape[3], x_t.shape[4]
        if config.ofs_embed_dim:
            raise ValueError(f"this transformer has an ofs embedding (ofs_embed_dim={config.ofs_embed_dim}): it is "
                             f"CogVideoX 1.5's image-to-video one, which {self.pipeline_class_name} cannot run")
        if config.patch_size_t and frames % config.patch_size_t:
            raise ValueError(f"{frames} latent frames: this CogVideoX 1.5 transformer patches {config.patch_size_t} "
                             f"at a time, so cache frame counts 4k+1 whose k+1 latent frames are a multiple of it")
        rotary = cogvideox_rotary_embeddings(transformer, frames, height, width, x_t.device) \
            if config.use_rotary_positional_embeddings else None
        return transformer(hidden_states=x_t.to(dtype), encoder_hidden_states=text["prompt_embeds"].to(dtype),
                           timestep=t, image_rotary_emb=rotary).sample

    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor) -> torch.Tensor:
        """The squared error of the ``x0`` the v-prediction implies, weighted by ``1 / (1 - alphas_cumprod[t])``
        (computed in the schedule's float64, applied in float32)."""
        x0_prediction = self.scheduler.get_velocity(prediction.float(), x_t.float(), t)
        weights = (1 / (1 - self.scheduler.alphas_cumprod.to(t.device)[t])).to(torch.float32)
        return (weights.view(-1, 1, 1, 1, 1) * (x0_prediction - x0.float()) ** 2).mean()

    def text_dims(self, transformer: ModelMixin) -> dict[str, int]:
        return {"prompt_embeds": transformer.config.text_embed_dim}
