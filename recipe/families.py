"""The model families the recipe trains, and what differs between them: one class per family.

Every trainer of pretrained DiTs (diffusers' scripts, finetrainers, musubi-tuner) encodes the data
once with the pipeline's own VAE and text encoders and trains the transformer on the result. What
the families do differently is written here, once, and nowhere else:

- latent normalisation: Flux ``(z - shift_factor) * scaling_factor``; Wan ``(z - latents_mean) /
  latents_std`` per channel, both from ``vae.config``. Latents are ``latent_dist.mode()``, so a cache
  is a deterministic function of the data;
- the prompt encoding the pipeline's own call uses, without classifier-free guidance: Flux's T5
  at 512 tokens plus pooled CLIP; Wan's UMT5 at 512 tokens (its ``encode_prompt`` defaults to 226,
  its ``__call__`` uses 512);
- the transformer's inputs: Flux packs 2x2 latent patches into one token (``in_channels`` is 4x
  the VAE's channels) as ``FluxPipeline`` does; the tiny demo Flux (patch 1) takes one token per
  latent pixel. Wan takes the 5-D latents;
- size rules: Flux wants height and width divisible by twice the VAE factor; Wan also by 16 and
  4k+1 frames;
- the diffusers LoRA loader whose ``save_lora_weights`` writes the format the pipeline loads.

Latents move through the recipe as ``(B, F, C, H, W)`` (``F = 1`` for images) with the text
conditioning as a dict of tensors named like the pipeline's (``prompt_embeds``, ...).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, FluxTransformer2DModel, ModelMixin, WanTransformer3DModel

from cp_plugin.compat import flux_pack_latents
from fixtures.models import TINY_FLUX, TINY_WAN

MAX_SEQUENCE_LENGTH = 512  # the prompt length both pipelines' __call__ encode to


def flux_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Flux position ids ``(0, row, col)`` of a ``height x width`` token grid."""
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


class Family:
    """How one diffusers family is loaded, encodes data, is called in training and saves LoRA."""

    name: ClassVar[str]
    transformer_class: ClassVar[type[ModelMixin]]
    tiny_config: ClassVar[dict[str, Any]]  # the demo model's config (no pretrained weights)
    pipeline_class_name: ClassVar[str]
    lora_loader_name: ClassVar[str]
    video: ClassVar[bool]

    def pipeline_class(self) -> type[DiffusionPipeline]:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def lora_loader(self) -> Any:
        import diffusers.loaders

        return getattr(diffusers.loaders, self.lora_loader_name)

    def check_size(self, pipeline: DiffusionPipeline, frames: int, height: int, width: int) -> str | None:
        """Why the pipeline cannot take media of this size, or ``None``."""
        multiple = self.spatial_multiple(pipeline)
        if height % multiple or width % multiple:
            return f"height and width must be multiples of {multiple}"
        return None

    def spatial_multiple(self, pipeline: DiffusionPipeline) -> int:
        raise NotImplementedError

    def encode_pixels(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(F', C, H', W')`` of pixels ``(F, 3, H, W)`` in ``[-1, 1]``."""
        raise NotImplementedError

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning tensors (batch first) the pipeline's own call would compute for ``prompts``."""
        raise NotImplementedError

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        """The transformer's velocity for latents ``(B, F, C, H, W)`` at flow times ``t`` ``(B,)`` in ``[0, 1]``."""
        raise NotImplementedError

    def text_dims(self, transformer: ModelMixin) -> dict[str, int]:
        """Width of each conditioning tensor the transformer takes."""
        raise NotImplementedError


class Flux(Family):
    name, transformer_class, tiny_config = "flux", FluxTransformer2DModel, TINY_FLUX
    pipeline_class_name, lora_loader_name, video = "FluxPipeline", "FluxLoraLoaderMixin", False

    def spatial_multiple(self, pipeline: DiffusionPipeline) -> int:
        return pipeline.vae_scale_factor * 2  # the VAE's factor, then 2x2 packing

    def check_size(self, pipeline: DiffusionPipeline, frames: int, height: int, width: int) -> str | None:
        return "Flux takes images: frames must be 1" if frames != 1 else super().check_size(pipeline, frames, height, width)

    def encode_pixels(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipeline.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor  # (1, C, H', W') = (F, C, H, W)

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = pipeline.encode_prompt(prompts, device=pipeline.device, max_sequence_length=MAX_SEQUENCE_LENGTH)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        batch, _, channels, height, width = x_t.shape
        dtype, device = transformer.dtype, x_t.device
        packed = transformer.config.in_channels == 4 * channels  # pretrained: 2x2 latent patches per token
        if packed:
            tokens, grid = flux_pack_latents(x_t[:, 0], batch, channels, height, width), (height // 2, width // 2)
        else:  # the demo's patch-1 model: one token per latent pixel
            tokens, grid = x_t[:, 0].flatten(2).transpose(1, 2), (height, width)
        embeds = text["prompt_embeds"].to(dtype)
        out = transformer(
            hidden_states=tokens.to(dtype),
            encoder_hidden_states=embeds,
            pooled_projections=text["pooled_prompt_embeds"].to(dtype),
            timestep=t,
            img_ids=flux_ids(*grid, device),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device),
            guidance=torch.full_like(t, guidance) if transformer.config.guidance_embeds else None,
        ).sample
        if packed:  # back to (B, C, H, W): the inverse of the packing
            out = out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        else:
            out = out.transpose(1, 2)
        return out.reshape(batch, 1, channels, height, width)

    def text_dims(self, transformer: ModelMixin) -> dict[str, int]:
        config = transformer.config
        return {"prompt_embeds": config.joint_attention_dim, "pooled_prompt_embeds": config.pooled_projection_dim}


class Wan(Family):
    name, transformer_class, tiny_config = "wan", WanTransformer3DModel, TINY_WAN
    pipeline_class_name, lora_loader_name, video = "WanPipeline", "WanLoraLoaderMixin", True

    def spatial_multiple(self, pipeline: DiffusionPipeline) -> int:
        return 16  # WanPipeline's own rule (VAE factor 8 x patch 2)

    def check_size(self, pipeline: DiffusionPipeline, frames: int, height: int, width: int) -> str | None:
        temporal = pipeline.vae_scale_factor_temporal
        if (frames - 1) % temporal:
            return f"frames must be {temporal}k+1 (1, {temporal + 1}, {2 * temporal + 1}, ...)"
        return super().check_size(pipeline, frames, height, width)

    def encode_pixels(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipeline.vae
        video = pixels.transpose(0, 1).unsqueeze(0).to(vae.device, vae.dtype)  # (1, 3, F, H, W)
        latents = vae.encode(video).latent_dist.mode()[0]  # (C, F', H', W')
        shape = (-1, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return ((latents - mean) / std).transpose(0, 1)  # (F', C, H', W')

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False,
                                           max_sequence_length=MAX_SEQUENCE_LENGTH, device=pipeline.device)
        return {"prompt_embeds": embeds}

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        dtype = transformer.dtype  # video: (B, C, F, H, W), timesteps in [0, 1000]
        out = transformer(x_t.transpose(1, 2).to(dtype), t * 1000, text["prompt_embeds"].to(dtype)).sample
        return out.transpose(1, 2)

    def text_dims(self, transformer: ModelMixin) -> dict[str, int]:
        return {"prompt_embeds": transformer.config.text_dim}


FAMILIES: dict[str, Family] = {family.name: family for family in (Flux(), Wan())}


def family(name: str) -> Family:
    """The family called ``name`` (``model.family``), or an error naming the choices."""
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]
