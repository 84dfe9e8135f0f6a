"""QwenImage Edit Plus (QwenImageEditPlusPipeline: Qwen-Image-Edit-2509, -2511): QwenImage Edit with several images.

Everything but the references is QwenImage Edit's (and QwenImage's: VAE and normalisation, 2x2
packing, time, LoRA format). A sample has one or more reference images (``<name>.ref.<ext>``,
``<name>.ref2.<ext>``, ..., or the table's ``reference``, ``reference2``, ... columns), and the
pipeline's ``__call__`` does this with its list of images, as training does:

- **Two sizes per image.** Each image is resized (``image_processor.resize``, stretched to the size)
  to about 384 x 384 pixels at its aspect ratio for the text encoder (``CONDITION_IMAGE_SIZE``) and to
  about 1024 x 1024 for the VAE (``VAE_IMAGE_SIZE``, ``image_processor.preprocess``), sides multiples
  of 32 (``calculate_dimensions``), whatever size it generates. ``prepare.py`` centre-crops each
  reference to its sample's bucket's aspect ratio and resizes it the same two ways with the pipeline's
  own image processor: for a reference of its bucket's aspect ratio nothing is cropped and both images
  are the pipeline's; every reference of a bucket gets the same two sizes, so batches stack.
- **The prompt reads them all.** The template puts ``Picture N: <|vision_start|><|image_pad|>
  <|vision_end|>`` for each image, in order, before the prompt; the processor expands each pad to that
  image's vision tokens (of its 384 x 384 version), Qwen2.5-VL reads them, and the template's first
  tokens are dropped (``drop_idx``). The cache holds what ``encode_prompt(caption, image=[<the
  references at the condition size>])`` returns, padded to the images' vision tokens plus 512, with the mask.
- **Their tokens follow the target's.** Each reference's latents (``latent_dist.mode()``, normalised by
  ``latents_mean`` / ``latents_std``) are cached in order as ``reference_latents`` ``(R, C, h, w)``;
  training packs each 2x2 and appends them after the target's tokens in order (``prepare_latents``),
  with ``img_shapes`` ``[(1, h, w), (1, h_ref, w_ref), ...]`` (one entry per reference: rotary frames
  1, 2, ...), and the loss reads the target's tokens (``noise_pred[:, : latents.size(1)]``).

A batch stacks its samples' tensors, so the number of references is part of a sample's bucket (with
its shape): samples with one reference and samples with two train in batches of their own. (``tokens``,
which sees only the target's latents' shape, counts the target's tokens and one reference's.)
Validation gives each prompt its ``validation.references`` entry as it is (a path, or a list of
paths: several images), and the pipeline sizes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from recipe.families.family import MAX_SEQUENCE_LENGTH, padded_prompts
from recipe.families.qwenimage_edit import QwenImageEdit

CONDITION_AREA = 384 * 384  # CONDITION_IMAGE_SIZE: the pixels each image is resized to for the text encoder
VAE_AREA = 1024 * 1024  # VAE_IMAGE_SIZE: the pixels each image is resized to for the VAE


def plus_size(area: int, width: int, height: int) -> tuple[int, int]:
    """The ``(width, height)`` of ``area`` pixels, multiples of 32, at the aspect ratio of a ``width x height`` image:
    ``QwenImageEditPlusPipeline``'s ``calculate_dimensions`` (imported when called: the pipelines pull in
    transformers)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    sized_width, sized_height = calculate_dimensions(area, width / height)
    return int(sized_width), int(sized_height)


def crop_to_aspect(image: Image.Image, height: int, width: int) -> Image.Image:
    """``image`` centre-cropped to the aspect ratio ``width / height`` (as it is when it has that ratio)."""
    image_width, image_height = image.size
    if image_width * height > image_height * width:  # wider: keep the middle columns
        kept = round(image_height * width / height)
        left = (image_width - kept) // 2
        return image.crop((left, 0, left + kept, image_height))
    if image_width * height < image_height * width:  # taller: keep the middle rows
        kept = round(image_width * height / width)
        top = (image_height - kept) // 2
        return image.crop((0, top, image_width, top + kept))
    return image


@dataclass
class References:
    """A sample's reference images as the pipeline gives them to its encoders: for the text encoder (PIL, at the
    condition size) and for the VAE (``(R, 3, H, W)`` in ``[-1, 1]``, at the VAE size)."""

    conditions: list[Image.Image]
    pixels: torch.Tensor


class QwenImageEditPlus(QwenImageEdit):
    name, title = "qwenimage_edit_plus", "QwenImage Edit Plus"
    pipeline_class_name = "QwenImageEditPlusPipeline"
    max_references = None  # the pipeline takes any number of images

    def reference_size(self, height: int, width: int) -> tuple[int, int]:
        sized_width, sized_height = plus_size(VAE_AREA, width, height)
        return sized_height, sized_width

    def condition_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(height, width)`` the pipeline resizes an image of this aspect ratio to for its text encoder."""
        sized_width, sized_height = plus_size(CONDITION_AREA, width, height)
        return sized_height, sized_width

    def fit_references(self, pipeline: DiffusionPipeline, images: list[Image.Image], height: int,
                       width: int) -> References:
        cropped = [crop_to_aspect(image, height, width) for image in images]
        condition_height, condition_width = self.condition_size(height, width)
        vae_height, vae_width = self.reference_size(height, width)
        return References([pipeline.image_processor.resize(image, condition_height, condition_width) for image in cropped],
                          torch.cat([pipeline.image_processor.preprocess(image, vae_height, vae_width) for image in cropped]))

    def encode_reference(self, pipeline: DiffusionPipeline, references: References) -> dict[str, torch.Tensor]:
        # each image its own one-frame video, as _encode_vae_image encodes them one by one
        pixels = references.pixels
        return {"reference_latents": torch.cat([self.encode_pixels(pipeline, pixels[i: i + 1]) for i in range(len(pixels))])}

    def encode_caption(self, pipeline: DiffusionPipeline, caption: str,
                       reference: References | None) -> dict[str, torch.Tensor]:
        if reference is None:  # the template holds the images' places: the processor refuses a prompt without them
            raise ValueError(f"{self.title} encodes each prompt with the images it edits: pass them")
        embeds, mask = pipeline.encode_prompt([caption], image=reference.conditions, device=pipeline.device)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        vision = sum(self.vision_tokens(pipeline, image) for image in reference.conditions)
        return {name: tensor[0] for name, tensor in
                padded_prompts([embeds[0][mask[0]]], MAX_SEQUENCE_LENGTH + vision).items()}

    def image_inputs(self, pipeline: DiffusionPipeline, image: Any, height: int, width: int) -> dict[str, Any]:
        return {"image": image}  # one image or a list: the pipeline sizes each itself, as for its users
