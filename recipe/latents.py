"""Training on your own data (Hydra group ``data=latents``): encode it once into a cache, then train from it.

:func:`encode_folder` is ``prepare.py``'s work: every rank (``torchrun`` sets ``RANK`` and
``WORLD_SIZE``; no process group is needed) takes every ``world_size``-th captioned file of
``data.path``, skips those already cached, and encodes the rest with the pipeline's own VAE and
text encoders (``recipe.families``) into ``data.cache``. Running it again fills only what is
missing, so an interrupted run resumes, and a run with more files adds them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm import tqdm

from recipe.cache import LatentCache, ShardWriter, cached_files, claim, fingerprint
from recipe.families import MAX_SEQUENCE_LENGTH, Family, family
from recipe.media import Bucket, MediaItem, Skipped, UnusableMedia, choose_bucket, list_media, read_frames, to_pixels
from recipe.models import ModelConfig, pipeline_index, pretrained_source

log = logging.getLogger(__name__)


@dataclass
class LatentsConfig:
    """Your captioned media (``path``, read by ``prepare.py``) and its latent cache (``cache``, read by ``train.py``)."""

    cache: str | None = None  # the cache folder
    path: str | None = None  # the media folder: images/videos with <name>.txt captions, or metadata.jsonl/captions.csv
    resolutions: list[list[int]] = field(default_factory=lambda: [[512, 512], [384, 640], [640, 384]])  # [height, width]
    frames: list[int] = field(default_factory=lambda: [1])  # frame counts (video: e.g. [17, 33, 81])
    shard_size: int = 64  # samples per cache file
    batch_size: int = 1
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if any(len(hw) != 2 or min(hw) <= 0 for hw in self.resolutions) or not self.resolutions:
            raise ValueError(f"data.resolutions={self.resolutions} must be a list of [height, width] pairs")
        if not self.frames or min(self.frames) < 1:
            raise ValueError(f"data.frames={self.frames} must be a list of frame counts >= 1")

    def require(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) is None:
                raise ValueError(f"data.{name} is not set; pass data.{name}=<folder>")


def load_pipeline(model: ModelConfig, live: dict[str, torch.nn.Module] | None = None) -> DiffusionPipeline:
    """The family's pipeline from ``model.pretrained_path`` in ``model.dtype``, with the ``live`` transformers (by
    component name; the pipeline's others load from the folder), or without any (``None``: to encode data)."""
    if model.pretrained_path is None:
        raise ValueError("model.pretrained_path is not set; pass model.pretrained_path=<diffusers pipeline folder>")
    source = pretrained_source(model.pretrained_path, "transformer")
    if "subfolder" not in source:
        raise ValueError(f"model.pretrained_path={model.pretrained_path!r} is a model folder; this needs the whole "
                         "pipeline (vae, text encoders, scheduler): point it at the folder save_pretrained wrote")
    two = "transformer_2" in pipeline_index(model.pretrained_path)
    components = live if live is not None else dict.fromkeys(["transformer", *(["transformer_2"] if two else [])])
    return family(model.family).pipeline_class().from_pretrained(
        source["pretrained_model_name_or_path"], **components, dtype=getattr(torch, model.dtype)
    )


def latent_cache(data: LatentsConfig, model: ModelConfig) -> LatentCache:
    """``data.cache``, checked to be a cache of ``model.family``."""
    data.require("cache")
    cache = LatentCache(Path(data.cache))
    if cache.info["family"] != model.family:
        raise ValueError(f"data.cache={data.cache!r} holds {cache.info['family']} latents (from "
                         f"{cache.info['pretrained_path']!r}) but model.family={model.family}; train a "
                         f"{cache.info['family']} model on it, or build a cache for this one with prepare.py")
    return cache


def cache_settings(pipeline: DiffusionPipeline, data: LatentsConfig) -> dict:
    """What makes the cached tensors what they are: the encoders' configs, the prompt length, the buckets."""
    encoders = {name: {k: v for k, v in component.config.to_dict().items()
                       if not k.startswith("_") and k != "transformers_version"}
                for name, component in pipeline.components.items() if name.startswith("text_encoder") and component}
    return {"vae": dict(pipeline.vae.config), "text_encoders": encoders, "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "resolutions": data.resolutions, "frames": data.frames, "latents": "latent_dist.mode(), normalised"}


def check_buckets(chosen: Family, pipeline: DiffusionPipeline, data: LatentsConfig) -> None:
    for frames in data.frames:
        for height, width in data.resolutions:
            reason = chosen.check_size(pipeline, frames, height, width)
            if reason:
                raise ValueError(f"data.resolutions={data.resolutions} x data.frames={data.frames}: "
                                 f"{frames} x {height} x {width} does not fit {chosen.name}: {reason}")


def reference_images(folder: Path, item: MediaItem) -> list[Image.Image]:
    """The item's reference images as read (the first frame of each), in order."""
    images = []
    for reference in item.references:
        try:
            images.append(read_frames(folder / reference)[0])
        except UnusableMedia as problem:
            raise UnusableMedia(f"its reference {reference} {problem}") from problem
    return images


def encode_folder(model: ModelConfig, data: LatentsConfig, rank: int = 0, world_size: int = 1) -> dict:
    """Encode this rank's share of ``data.path`` into ``data.cache``; what it did: ``{"cached", "present", "skipped"}``."""
    data.require("path", "cache")
    chosen = family(model.family)
    items, skipped = list_media(Path(data.path), references=chosen.reference)
    most = chosen.max_references
    skipped += [Skipped(item.file, f"{len(item.references)} reference images ({', '.join(item.references)}); "
                                   f"{chosen.title} edits with {most} at most")
                for item in items if most is not None and len(item.references) > most]
    items = [item for item in items if most is None or len(item.references) <= most]
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    pipeline = load_pipeline(model).to(device)
    check_buckets(chosen, pipeline, data)
    settings = cache_settings(pipeline, data)
    folder = Path(data.cache)
    claim(folder, {"family": chosen.name, "pretrained_path": model.pretrained_path, "settings": settings,
                   "fingerprint": fingerprint({"family": chosen.name, **settings})})
    done = cached_files(folder)
    mine = [item for item in items[rank::world_size] if item.file not in done]
    skipped = skipped[rank::world_size]  # each rank reports its share once
    cached = 0
    writer = ShardWriter(folder, rank, data.shard_size)
    resolutions = [tuple(hw) for hw in data.resolutions]
    try:  # flush what was encoded even if a later file crashes the run: nothing encoded is lost
        for item in tqdm(mine, desc=f"caching (rank {rank}/{world_size})", disable=rank != 0, unit="file"):
            try:
                frames = read_frames(Path(data.path) / item.file)
                bucket: Bucket = choose_bucket(frames, resolutions, data.frames)
                images = reference_images(Path(data.path), item)
            except UnusableMedia as problem:
                skipped.append(Skipped(item.file, str(problem)))
                continue
            pixels = to_pixels(frames, bucket)
            reference = chosen.fit_references(pipeline, images, bucket.height, bucket.width) if images else None
            with torch.no_grad():
                tensors = {"latents": chosen.encode_pixels(pipeline, pixels),
                           **chosen.encode_caption(pipeline, item.caption, reference),
                           **chosen.encode_conditioning(pipeline, pixels)}
                if reference is not None:
                    tensors.update(chosen.encode_reference(pipeline, reference))
            writer.add(item, tensors, len(images))
            cached += 1
    finally:
        writer.flush()
    for problem in skipped:
        log.warning("skipped %s: %s", Path(data.path) / problem.file, problem.reason)
    return {"cached": cached, "present": len(done), "skipped": skipped}
