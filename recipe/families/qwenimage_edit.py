"""QwenImage Edit (QwenImageEditPipeline): QwenImage with the image to edit in the prompt and after the target.

Everything but the reference is QwenImage's (the VAE and its normalisation, 2x2 packing, time, LoRA
format). What the pipeline does with the image it edits, and training does the same way:

- **Its size.** ``__call__`` resizes the image to about 1024 x 1024 pixels at its aspect ratio, sides
  multiples of 32 (``calculate_dimensions(1024 * 1024, ...)``), whatever size it generates, and gives
  the text encoder and the VAE that image. ``prepare.py`` fits each reference to its sample's bucket's
  aspect ratio at that size: for a reference of its bucket's aspect ratio (an edit pair of one size)
  this is the size the pipeline gives it, so training sees the reference's tokens, rotary grid and
  vision tokens sampling sees, and every reference of a bucket has one size, so batches stack. (Flux
  Kontext's pipeline can keep the sample's size, and its family fits references to the bucket; this
  pipeline has no such setting.)
- **The prompt reads it.** The pipeline's template puts ``<|vision_start|><|image_pad|><|vision_end|>``
  before the prompt; its processor expands the pad to the image's vision tokens, the Qwen2.5-VL text
  encoder reads the image's features there, and the template's first tokens are dropped (``drop_idx``).
  The cache holds what ``encode_prompt(caption, image=<the reference>)`` returns (``encode_caption``),
  its tokens padded to the image's vision tokens plus 512, one length per bucket, with the mask.
- **Its tokens follow the target's.** The reference's latents are ``latent_dist.mode()`` normalised by
  ``latents_mean`` / ``latents_std`` like the target's (``_encode_vae_image``), packed 2x2 like them and
  appended after them (``prepare_latents``); each sample's ``img_shapes`` is ``[(1, h, w), (1, h_ref,
  w_ref)]``, so the reference's rotary positions are the second frame's, and the loss reads the target's
  tokens of the output (``noise_pred[:, : latents.size(1)]``). Context parallelism splits the whole
  joint sequence, reference tokens included, like any image tokens.

Validation passes the reference image as it is: the pipeline sizes it as above.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, ModelMixin

from cp_plugin.compat import qwenimage_edit_size
from recipe.families.family import MAX_SEQUENCE_LENGTH, padded_prompts
from recipe.families.qwenimage import QwenImage

REFERENCE_AREA = 1024 * 1024  # the pixels QwenImageEditPipeline.__call__ resizes the image it edits to
PIXELS_PER_TOKEN = 16  # per side: the VAE's 8x, then 2x2 packing (the pipeline's vae_scale_factor * 2)


class QwenImageEdit(QwenImage):
    name, title = "qwenimage_edit", "QwenImage Edit"
    pipeline_class_name, task = "QwenImageEditPipeline", "edit"

    def reference_size(self, height: int, width: int) -> tuple[int, int]:
        sized_width, sized_height = qwenimage_edit_size(REFERENCE_AREA, width, height)
        return sized_height, sized_width

    def encode_caption(self, pipeline: DiffusionPipeline, caption: str,
                       reference: torch.Tensor | None) -> dict[str, torch.Tensor]:
        # the processor reads a PIL image, as __call__ gives it: the reference's 8-bit pixels, recovered exactly
        images = None if reference is None else pipeline.image_processor.postprocess(reference, output_type="pil")
        return {name: tensor[0] for name, tensor in self.encode_prompts(pipeline, [caption], images).items()}

    def encode_prompts(self, pipeline: DiffusionPipeline, prompts: list[str],
                       images: list[Any] | None = None) -> dict[str, torch.Tensor]:
        """The pipeline's ``encode_prompt`` of ``prompts``, each with its image (PIL, at the size the pipeline
        resizes it to) in the template, padded to 512 tokens after the images' vision tokens."""
        if not images:  # the template holds the image's place: the processor refuses a prompt without its image
            raise ValueError(f"{self.title} encodes each prompt with the image it edits: pass the images")
        embeds, mask = pipeline.encode_prompt(prompts, image=images, device=pipeline.device)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        vision = max(self.vision_tokens(pipeline, image) for image in images)
        return padded_prompts([tokens[real] for tokens, real in zip(embeds, mask)], MAX_SEQUENCE_LENGTH + vision)

    def vision_tokens(self, pipeline: DiffusionPipeline, image: Any) -> int:
        """The tokens the processor expands an image's ``<|image_pad|>`` to: its patch grid over the merged patches."""
        image_processor = pipeline.processor.image_processor
        grid = image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        return int(grid.prod()) // image_processor.merge_size**2

    def tokens(self, transformer: ModelMixin, latent_shape: tuple[int, ...]) -> int:
        _, _, height, width = latent_shape  # the latents' aspect ratio is the bucket's
        reference_height, reference_width = self.reference_size(height, width)
        reference = (reference_height // PIXELS_PER_TOKEN) * (reference_width // PIXELS_PER_TOKEN)
        return super().tokens(transformer, latent_shape) + reference  # the target's and the reference's

    def call(self, transformer: ModelMixin, tokens: torch.Tensor, grid: tuple[int, int], t: torch.Tensor,
             text: dict[str, torch.Tensor], guidance: float) -> torch.Tensor:
        if "reference_latents" not in text:  # the demo's learned prompts: no image to edit, QwenImage's call
            return super().call(transformer, tokens, grid, t, text, guidance)
        # each reference's packed tokens after the target's, in order (one here; QwenImage Edit Plus: several)
        references = [self.image_tokens(transformer, latents.to(tokens.dtype))
                      for latents in text["reference_latents"].unbind(1)]
        joint = torch.cat([tokens, *(reference for reference, _ in references)], 1)
        shapes = [(1, *grid), *((1, *reference_grid) for _, reference_grid in references)]
        return self.images_call(transformer, joint, shapes, t, text)[:, : tokens.shape[1]]

    def text_dims(self, transformer: ModelMixin) -> dict[str, int | None]:
        return {**super().text_dims(transformer), "reference_latents": None}

    def image_inputs(self, pipeline: DiffusionPipeline, image: Any, height: int, width: int) -> dict[str, Any]:
        return {"image": image}  # the pipeline sizes the image it edits itself (about 1024 x 1024), as for its users
