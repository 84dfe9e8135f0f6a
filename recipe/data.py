"""Real images as long token sequences, with no download: crops of scikit-learn's bundled photos.

scikit-learn ships two photographs (``load_sample_images``: a temple in China and a flower). We
cut deterministic crops, label each crop with its photo and quadrant (8 classes, the
conditioning), and turn pixels into "latents" with a fixed, invertible pixel-unshuffle, so no VAE
is needed and generated latents decode straight back to images. A 64x64 crop becomes 1024 tokens
of 12 channels (Flux) and a short panning clip becomes a video latent (Wan). ``path=`` swaps the
photos for a folder of your own images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from recipe.media import IMAGE_SUFFIXES

PIXEL_UNSHUFFLE = 2  # each latent token holds a 2x2 pixel patch: 3 * 2 * 2 = 12 channels
QUADRANTS = 4


@dataclass
class DataConfig:
    """What to train on (Hydra group ``data``)."""

    image_size: int = 64
    frames: int = 1  # > 1: clips panning across the photo, for video models
    crops: int = 512
    photo_size: int | None = 128  # shorter side photos are resized to before cropping; null: full resolution
    batch_size: int = 2
    num_workers: int = 0
    path: str | None = None  # a folder of images (png/jpg) instead of scikit-learn's photos
    seed: int = 0


def load_photos(path: str | None) -> list[Image.Image]:
    """RGB images: the user's folder, or scikit-learn's bundled photographs."""
    if path is None:
        from sklearn.datasets import load_sample_images

        return [Image.fromarray(photo) for photo in load_sample_images().images]
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"data.path={path!r} is not a directory; point it at a folder of images, or drop it for the bundled photos")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"data.path={path!r} contains no {'/'.join(IMAGE_SUFFIXES)} images; point it at an image folder")
    return [Image.open(f).convert("RGB") for f in files]


def resize_shorter_side(photo: Image.Image, size: int | None) -> np.ndarray:
    """``photo`` scaled so its shorter side is ``size`` pixels (``None``: unchanged), as an ``(H, W, 3)`` array.

    Scaling sets how much of a scene one crop shows: at full resolution a 64px crop of a 427x640
    photo is a patch of texture; at 128px it is a recognisable part of the scene.
    """
    if size is not None:
        scale = size / min(photo.size)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.LANCZOS)
    return np.asarray(photo)


def to_latent(pixels: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` in [0, 255] -> ``(..., 12, H/2, W/2)`` in [-1, 1]."""
    return F.pixel_unshuffle(pixels.float() / 127.5 - 1.0, PIXEL_UNSHUFFLE)


def to_pixels(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_latent`, clamped to valid pixels in [0, 1]."""
    return ((F.pixel_shuffle(latent, PIXEL_UNSHUFFLE) + 1.0) / 2.0).clamp(0.0, 1.0)


class PhotoCrops(Dataset):
    """Deterministic crops (or panning clips) with a (photo, quadrant) class label.

    Items: ``latents`` of shape ``(frames, 12, s/2, s/2)`` and ``label`` (int). Crops are fixed
    at construction from ``seed``, so every rank builds the identical dataset.
    """

    def __init__(self, config: DataConfig) -> None:
        self.config = config
        photos = [resize_shorter_side(photo, config.photo_size) for photo in load_photos(config.path)]
        size, frames = config.image_size, config.frames
        pan = size // 8  # pixels moved per frame in a clip
        span = size + pan * (frames - 1)
        usable = [p for p in photos if min(p.shape[:2]) >= 2 * span]
        if not usable:
            raise ValueError(
                f"data.image_size={size} with data.frames={frames} needs photos of at least {2 * span}px per side; "
                "use a smaller data.image_size, fewer data.frames or a larger data.photo_size"
            )
        rng = np.random.default_rng(config.seed)
        self.items: list[tuple[torch.Tensor, int]] = []
        for i in range(config.crops):
            photo_index = i % len(usable)
            photo = usable[photo_index]
            quadrant = int(rng.integers(QUADRANTS))
            h, w = photo.shape[0] // 2, photo.shape[1] // 2
            top = (quadrant // 2) * h + int(rng.integers(h - span + 1))
            left = (quadrant % 2) * w + int(rng.integers(w - span + 1))
            clip = np.stack([photo[top : top + size, left + f * pan : left + f * pan + size] for f in range(frames)])
            pixels = torch.from_numpy(clip).permute(0, 3, 1, 2)  # (frames, 3, size, size)
            self.items.append((to_latent(pixels), photo_index * QUADRANTS + quadrant))
        self.num_classes = len(usable) * QUADRANTS

    def examples(self, count: int = 8) -> dict[int, torch.Tensor]:
        """``{label: latents}`` of the first item of up to ``count`` classes spread over all classes.

        Sample grids show these next to samples of the same class; capping the count keeps sampling
        cheap for a folder of many images.
        """
        wanted = set(np.linspace(0, self.num_classes - 1, min(count, self.num_classes)).round().astype(int).tolist())
        found: dict[int, torch.Tensor] = {}
        for latents, label in self.items:
            if label in wanted:
                found.setdefault(label, latents)
        return dict(sorted(found.items()))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        latents, label = self.items[index]
        return {"latents": latents, "label": label, "index": index}
