"""What a model family is to the recipe: how it is loaded, encodes data, is called in training, saves LoRA.

Every trainer of pretrained DiTs (diffusers' scripts, finetrainers, musubi-tuner) encodes the data
once with the pipeline's own VAE and text encoders and trains the transformer on the result. What
the families do differently is what a :class:`Family` declares, one file per family in this
package: latent normalisation, the prompt encoding the pipeline's own call uses (without
classifier-free guidance), the transformer's inputs, size rules, the diffusers LoRA loader
whose ``save_lora_weights`` writes the format the pipeline loads, and the objective the model was
trained with: rectified flow by default (logit-normal times, the velocity ``noise - x0``), which
a family trained otherwise (CogVideoX: v-prediction on a DDPM schedule) replaces with its own time
sampling, noising and loss.

Latents move through the recipe as ``(B, F, C, H, W)`` (``F = 1`` for images) with the text
conditioning as a dict of tensors named like the pipeline's (``prompt_embeds``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ModelMixin
from PIL import Image

from recipe.media import Bucket, to_pixels

MAX_SEQUENCE_LENGTH = 512  # the prompt length the pipelines' __call__ encode to


def padded_prompts(prompts: list[torch.Tensor], length: int = MAX_SEQUENCE_LENGTH) -> dict[str, torch.Tensor]:
    """Prompts of their own lengths (each ``(L_i, D)``: the real tokens only) as the cache stores them: padded with
    zeros to ``length`` (``prompt_embeds``), with the boolean mask of the real ones (``prompt_attention_mask``). One
    length for every sample of a bucket is what lets a batch stack them."""
    longest = max(len(tokens) for tokens in prompts)
    if longest > length:
        raise ValueError(f"a prompt encodes to {longest} tokens, more than the {length} the cache stores; shorten its "
                         "caption")
    padded = prompts[0].new_zeros(len(prompts), length, prompts[0].shape[-1])
    mask = torch.zeros(len(prompts), length, dtype=torch.bool, device=padded.device)
    for i, tokens in enumerate(prompts):
        padded[i, : len(tokens)], mask[i, : len(tokens)] = tokens, True
    return {"prompt_embeds": padded, "prompt_attention_mask": mask}


def unmasked(embeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prompt embeddings ``(B, L, D)`` whose every token is real, with their (all-true) mask."""
    return {"prompt_embeds": embeds,
            "prompt_attention_mask": torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)}


def video_latents(pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
    """The pipeline's video VAE's latents ``(1, C, F', H', W')`` (``latent_dist.mode()``) of pixels ``(F, 3, H, W)``."""
    vae = pipeline.vae
    video = pixels.transpose(0, 1).unsqueeze(0).to(vae.device, vae.dtype)  # (1, 3, F, H, W)
    return vae.encode(video).latent_dist.mode()


def scaled_video_latents(pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
    """``latent_dist.mode() * scaling_factor`` of pixels ``(F, 3, H, W)``, as ``(F', C, H', W')``: the latents of the
    pipelines whose decode only divides by the scaling factor (HunyuanVideo, HunyuanVideo 1.5, CogVideoX)."""
    return (video_latents(pipeline, pixels)[0] * pipeline.vae.config.scaling_factor).transpose(0, 1)


def video_tokens(latent_shape: tuple[int, ...], patch_t: int, patch_h: int, patch_w: int) -> int:
    """The tokens a video transformer makes of latents ``(F, C, H, W)`` in patches of ``patch_t x patch_h x patch_w``."""
    frames, _, height, width = latent_shape
    return (frames // patch_t) * (height // patch_h) * (width // patch_w)


def first_frame_given(x_t: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Noisy latents ``(B, F, C, H, W)`` whose leading latent frames are the clean ``condition`` ``(B, F0, C, H, W)``,
    and ``F0``: image-to-video pipelines that give the image as the first latent frame (timestep zero on its
    tokens) and update only the frames after it."""
    given = condition.shape[1]
    return torch.cat([condition.to(x_t.dtype), x_t[:, given:]], 1), given


class Family:
    """How one diffusers family is loaded, encodes data, is called in training and saves LoRA."""

    name: ClassVar[str]
    title: ClassVar[str]  # the family's name in messages
    transformer_class: ClassVar[type[ModelMixin]]
    tiny_config: ClassVar[dict[str, Any]]  # the demo model's config (no pretrained weights)
    pipeline_class_name: ClassVar[str]
    lora_loader_name: ClassVar[str]
    video: ClassVar[bool]
    # "text-to-image", "text-to-video", "edit" (each sample has a reference image, <name>.ref.<ext>, cached as
    # ``reference_latents``) or "image-to-video" (conditioned on the clip's own first frame).
    task: ClassVar[str]
    # edit tasks: how many reference images a sample may have (<name>.ref2.<ext>, ...; None: any number)
    max_references: ClassVar[int | None] = 1
    # What the transformer was trained to predict: only flow-matching velocities integrate with Euler steps in time
    # (the demo's sampler, FlowMatching.sample); other objectives generate through their pipeline's scheduler.
    objective: ClassVar[str] = "flow matching"

    @property
    def reference(self) -> bool:
        """Whether each sample needs its reference image (edit tasks)."""
        return self.task == "edit"

    @property
    def starts_from_image(self) -> bool:
        """Whether generation takes an image besides the prompt (edit, image-to-video): validation needs one."""
        return self.task in ("edit", "image-to-video")

    def pipeline_class(self) -> type[DiffusionPipeline]:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def lora_loader(self) -> Any:
        import diffusers.loaders

        return getattr(diffusers.loaders, self.lora_loader_name)

    def check_size(self, pipeline: DiffusionPipeline, frames: int, height: int, width: int) -> str | None:
        """Why the pipeline cannot take media of this size, or ``None``."""
        if not self.video and frames != 1:
            return f"{self.title} takes images: frames must be 1"
        temporal = self.temporal_compression(pipeline)
        if (frames - 1) % temporal:
            return f"frames must be {temporal}k+1 (1, {temporal + 1}, {2 * temporal + 1}, ...)"
        multiple = self.spatial_multiple(pipeline)
        if height % multiple or width % multiple:
            return f"height and width must be multiples of {multiple}"
        return None

    def temporal_compression(self, pipeline: DiffusionPipeline) -> int:
        """Source frames per latent frame after the first (video VAEs keep the first frame on its own)."""
        return 1

    def spatial_multiple(self, pipeline: DiffusionPipeline) -> int:
        raise NotImplementedError

    def input_channels(self, channels: int) -> tuple[int, ...]:
        """The transformer ``in_channels`` that fit latents of ``channels``: as they are, or (images) 2x2 packed."""
        return (channels,) if self.video else (channels, 4 * channels)

    def encode_pixels(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(F', C, H', W')`` of pixels ``(F, 3, H, W)`` in ``[-1, 1]``."""
        raise NotImplementedError

    def encode_conditioning(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cached tensors the transformer takes that come from the sample itself (pixels ``(F, 3, H, W)``)."""
        return {}

    def reference_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(height, width)`` a sample's reference image is fitted to (edit tasks) for a sample of this size: the
        sample's own, so the reference has as many tokens as the target."""
        return height, width

    def fit_references(self, pipeline: DiffusionPipeline, images: list[Image.Image], height: int,
                       width: int) -> Any:
        """A sample's reference images (edit tasks: PIL, as read) as ``encode_caption`` and ``encode_reference`` take
        them, for a sample of this size: the first, fitted to ``reference_size`` as the sample is to its bucket
        (``(1, 3, H, W)`` in ``[-1, 1]``)."""
        return to_pixels(images[:1], Bucket(1, *self.reference_size(height, width)))

    def encode_reference(self, pipeline: DiffusionPipeline, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cached tensors of a sample's references as ``fit_references`` gives them (edit tasks; here its
        reference image ``(1, 3, H, W)`` in ``[-1, 1]``)."""
        return {"reference_latents": self.encode_pixels(pipeline, pixels)}

    def encode_caption(self, pipeline: DiffusionPipeline, caption: str,
                       reference: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One sample's cached prompt tensors (no batch axis): what the pipeline's call computes for its caption.
        ``reference`` (edit tasks: the sample's references as ``fit_references`` gives them) is for pipelines whose
        text encoder reads the image it edits with the prompt; the others encode the caption alone."""
        return {name: tensor[0] for name, tensor in self.encode_prompts(pipeline, [caption]).items()}

    def image_inputs(self, pipeline: DiffusionPipeline, image: Any, height: int, width: int) -> dict[str, Any]:
        """The arguments of a validation call (one prompt) for the PIL ``image`` it starts from, at this size."""
        raise NotImplementedError

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning tensors (batch first) the pipeline's own call would compute for ``prompts``."""
        raise NotImplementedError

    def tokens(self, transformer: ModelMixin, latent_shape: tuple[int, ...]) -> int:
        """Image/video tokens the transformer makes of one sample's latents ``(F, C, H, W)``."""
        raise NotImplementedError

    def trained_from(self, pretrained_path: str | None) -> Family:
        """The family as it trains the model of ``model.pretrained_path``: itself, since flow matching needs nothing
        from the pipeline; a family whose objective is the pipeline's noise schedule returns a copy holding it."""
        return self

    def draw_time(self, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """One sample's training time (a scalar) from its own generator: the flow time ``sigmoid(N(0, 1))``."""
        return torch.sigmoid(torch.randn((), generator=generator, device=device))

    def noisy_latents(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      text: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The transformer's input latents at times ``t`` ``(B,)`` for clean ``x0`` ``(B, F, C, H, W)``, and how
        many leading latent frames are given clean (the loss skips them): every frame noised, none given."""
        t_ = t.view(-1, 1, 1, 1, 1)
        return (1 - t_) * x0 + t_ * noise, 0

    def velocity(self, transformer: ModelMixin, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                 guidance: float) -> torch.Tensor:
        """The transformer's output for latents ``(B, F, C, H, W)`` at times ``t`` ``(B,)`` (``draw_time``'s: flow
        times in ``[0, 1]``, unless the family draws others): the velocity its objective predicts."""
        raise NotImplementedError

    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor) -> torch.Tensor:
        """The training loss of the transformer's ``prediction`` for the noised frames (``(B, F, C, H, W)`` each, the
        given ones left out) at times ``t``: the mean squared error to the flow velocity ``noise - x0``."""
        return F.mse_loss(prediction.float(), (noise - x0).float())

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        """Each conditioning tensor the transformer takes, with its width (``None``: not a width: a mask, latents)."""
        raise NotImplementedError

    def prompt_inputs(self, pipeline: DiffusionPipeline, prompts: list[str]) -> dict[str, Any]:
        """The prompt arguments of a validation call of the pipeline (``__call__``)."""
        return {"prompt": prompts}

    def load_lora(self, pipeline: DiffusionPipeline, directory: Path) -> None:
        """Load adapters this recipe saved (``directory``) into ``pipeline``, as its users do."""
        pipeline.load_lora_weights(directory)

    def demo_text(self, embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The conditioning tensors for the demo's learned class embeddings ``(B, tokens, width)``."""
        return {"prompt_embeds": embeds}
