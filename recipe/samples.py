"""Validation samples from the real pipeline, generated with the transformer being trained, under CP.

Every ``every_n_steps`` (and at the end) the family's pipeline (loaded once from
``model.pretrained_path``, without a transformer of its own) generates ``validation.prompts`` with
``module.transformer``, the live, context-parallel model (a two-expert pipeline: the trained experts, the
other loaded from the folder; edit and image-to-video tasks: each prompt starts from its
``validation.references`` image): every rank runs the pipeline with the
same seeded noise, since the transformer's collectives need its whole CP group. Rank 0 writes the
results to ``<run dir>/samples/`` and logs them to W&B next to the loss: images, or videos (mp4
when imageio-ffmpeg is installed, else gif) for video families.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from recipe.callbacks import PeriodicSamples
from recipe.families import family
from recipe.latents import load_pipeline
from recipe.models import ModelConfig, pretrained_source


@dataclass
class ValidationConfig:
    """What the pipeline generates while a pretrained model trains (``validation.*``)."""

    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat"])
    height: int = 512
    width: int = 512
    frames: int = 33  # video families
    guidance_scale: float | None = None  # None: the pipeline's default
    seed: int = 0
    # edit, image-to-video: each prompt's image (one per prompt); a family that edits with several images (QwenImage
    # Edit Plus) also takes a list of paths for a prompt: validation.references=[[a.png,b.png]]
    references: list[Any] = field(default_factory=list)


def save_video(frames: list[Image.Image], stem: Path) -> Path:
    """``stem.mp4`` (imageio-ffmpeg) or, without a video encoder, ``stem.gif`` (PIL)."""
    from diffusers.utils import export_to_gif, export_to_video

    if find_spec("imageio_ffmpeg"):  # export_to_video's encoder
        return Path(export_to_video(frames, str(stem.with_suffix(".mp4")), fps=8))
    return Path(export_to_gif(frames, str(stem.with_suffix(".gif")), fps=8))


def open_images(entry: Any) -> Image.Image | list[Image.Image]:
    """A ``validation.references`` entry's image (a path), or its images (a list of paths), in RGB."""
    if isinstance(entry, str):
        return Image.open(entry).convert("RGB")
    return [Image.open(path).convert("RGB") for path in entry]


class PipelineSamples(PeriodicSamples):
    def __init__(self, every_n_steps: int, model: ModelConfig, validation: ValidationConfig, steps: int,
                 out_dir: Path) -> None:
        super().__init__(every_n_steps)
        chosen = family(model.family)
        if chosen.starts_from_image and len(validation.references) != len(validation.prompts):
            raise ValueError(f"validation.references has {len(validation.references)} images for "
                             f"{len(validation.prompts)} validation.prompts: model.family={model.family} ({chosen.task}) "
                             "starts from an image, so give one per prompt, e.g. validation.references=[<image path>]")
        for entry in validation.references:
            count = 1 if isinstance(entry, str) else len(entry)
            if chosen.max_references is not None and count > chosen.max_references:
                raise ValueError(f"validation.references has {count} images for one prompt ({list(entry)}) but "
                                 f"model.family={model.family} edits with {chosen.max_references}: give one path per "
                                 "prompt")
        if not chosen.starts_from_image and validation.references:
            raise ValueError(f"validation.references is set but model.family={model.family} ({chosen.task}) takes no "
                             "image; drop validation.references")
        takes = inspect.signature(chosen.pipeline_class().__call__).parameters
        if validation.guidance_scale is not None and "guidance_scale" not in takes:
            raise ValueError(f"validation.guidance_scale is set but {chosen.pipeline_class_name} takes none (its guider "
                             "holds the scale, in the pipeline folder's guider/config.json); drop "
                             "validation.guidance_scale")
        self.model, self.validation, self.steps = model, validation, steps
        self.out_dir = out_dir / "samples"
        self.pipeline: Any = None
        # a transformer folder trains, but there is no pipeline (VAE, text encoders) to sample with
        self.skip = model.pretrained_path is not None and "subfolder" not in pretrained_source(model.pretrained_path,
                                                                                               "transformer")
        if self.skip:
            rank_zero_warn(f"model.pretrained_path={model.pretrained_path!r} is a transformer folder: with no pipeline "
                           "to generate with, no validation samples are made; point it at the pipeline folder "
                           "(save_pretrained's) to get them")

    def generate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.skip:
            return
        if self.pipeline is None:
            self.pipeline = load_pipeline(self.model, module.components).to(module.device)
            self.pipeline.set_progress_bar_config(disable=True)
        settings = self.validation
        options: dict[str, Any] = {"height": settings.height, "width": settings.width}
        if module.family.video:
            options["num_frames"] = settings.frames
        # a pipeline that sizes its output from the image it starts from (HunyuanVideo 1.5 I2V) takes no height/width
        takes = inspect.signature(type(self.pipeline).__call__).parameters
        options = {name: value for name, value in options.items() if name in takes}
        if settings.guidance_scale is not None:
            options["guidance_scale"] = settings.guidance_scale
        # Prompts that start from an image run one call each (image-to-video pipelines take one image per call).
        calls = [(list(settings.prompts), {})] if not module.family.starts_from_image else [
            ([prompt], module.family.image_inputs(self.pipeline, open_images(entry), settings.height, settings.width))
            for prompt, entry in zip(settings.prompts, settings.references)]
        results = []
        for prompts, image in calls:
            with torch.no_grad():
                output = self.pipeline(
                    **module.family.prompt_inputs(self.pipeline, prompts), num_inference_steps=self.steps,
                    output_type="pil", generator=torch.Generator().manual_seed(settings.seed), **options, **image,
                )
            results += output.frames if module.family.video else output.images
        if trainer.is_global_zero:
            self.publish(trainer, results)

    def publish(self, trainer: L.Trainer, results: list[Any]) -> None:
        """Write each prompt's sample and log them all to W&B under ``samples``."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        step, prompts = trainer.global_step, list(self.validation.prompts)
        paths = []
        for index, result in enumerate(results):
            stem = self.out_dir / f"step{step:06d}-{index}"
            if isinstance(result, Image.Image):
                result.save(stem.with_suffix(".png"))
                paths.append(stem.with_suffix(".png"))
            else:
                paths.append(save_video(list(result), stem))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log = logger.log_image if paths[0].suffix == ".png" else logger.log_video
                log("samples", [str(p) for p in paths], step=step, caption=prompts)
