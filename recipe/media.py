"""A folder of captioned images or videos, read the way the latent cache needs it.

Captions come from a sidecar ``<name>.txt`` next to each file, or from one table in the folder:
``metadata.jsonl`` (Hugging Face ``imagefolder``'s ``file_name`` + ``text``/``caption``) or
``captions.csv`` with the same columns. Each file is fitted to the *bucket* nearest its aspect
ratio (a list of resolutions and frame counts, ``data.resolutions`` and ``data.frames``): resized to
cover it and centre-cropped, and a video keeps its first frames, as many as the largest frame
count that fits. Buckets keep a batch's samples the same shape without stretching anything.
Edit families also need each sample's reference image (the one the caption asks to change): a
sidecar ``<name>.ref.<ext>`` next to the file, or a ``reference`` column in the table (a path in the
folder). A family that edits with several (QwenImage Edit Plus) reads the next ones from sidecars
``<name>.ref2.<ext>``, ``<name>.ref3.<ext>``, ... or columns ``reference2``, ``reference3``, ... (in
``metadata.jsonl`` the ``reference`` may also be a list of paths), in that order. Sidecar references
are never samples themselves.
Files that cannot be used are not fatal: each becomes a :class:`Skipped` with the reason, so one
broken file among thousands costs that file, and the report names it.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".gif", ".mp4", ".webm", ".mov", ".mkv", ".avi")
CAPTION_TABLES = ("metadata.jsonl", "captions.csv")
REFERENCE = ".ref"  # <name>.ref.<ext>: the reference image of <name>.<ext>; <name>.ref2.<ext>, ...: the next ones
SIDECAR_REFERENCE = re.compile(r"\.ref(\d*)$")  # a reference's stem ends so; its number (none: the first)


@dataclass(frozen=True)
class MediaItem:
    file: str  # relative to the media folder
    caption: str
    references: tuple[str, ...] = ()  # the reference images (edit tasks), in order, relative to the media folder

    @property
    def reference(self) -> str | None:
        """The (first) reference image, if there is one."""
        return self.references[0] if self.references else None


@dataclass(frozen=True)
class Skipped:
    file: str
    reason: str


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int


class UnusableMedia(Exception):
    """This one file cannot be cached (the message says why); the others can."""


def list_media(folder: Path, references: bool = False) -> tuple[list[MediaItem], list[Skipped]]:
    """The captioned media files of ``folder`` (sorted), and those skipped for want of a caption.

    ``references``: each item also needs its reference image (edit tasks); one without is skipped, named.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"data.path={str(folder)!r} is not a directory; point it at a folder of images or videos")
    media = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    files = [file for file in media if not SIDECAR_REFERENCE.search(Path(file).stem)]
    if not files:
        raise FileNotFoundError(f"data.path={str(folder)!r} holds no {'/'.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)} files")
    table = caption_table(folder)
    items, skipped = [], []
    for file in files:
        sidecar = (folder / file).with_suffix(".txt")
        row = table.get(file, {})
        caption = sidecar.read_text().strip() if sidecar.is_file() else row.get("caption")
        found = (sidecar_references(folder, file) or row.get("references", ())) if references else ()
        if not caption:
            skipped.append(Skipped(file, f"no caption: write {Path(file).with_suffix('.txt')} or a row in "
                                         f"{' or '.join(CAPTION_TABLES)}"))
        elif references and not found:
            skipped.append(Skipped(file, f"no reference image: write {Path(file).stem}{REFERENCE}.png next to it or a "
                                         f"'reference' column in {' or '.join(CAPTION_TABLES)}"))
        else:
            items.append(MediaItem(file, caption, tuple(found)))
    return items, skipped


def sidecar_reference(folder: Path, file: str, number: int = 1) -> str | None:
    """The sidecar reference image ``<name>.ref.<ext>`` of ``file`` (any image suffix), if there is one; ``number``
    2, 3, ...: ``<name>.ref2.<ext>``, ``<name>.ref3.<ext>``, ..."""
    stem = Path(file).with_suffix("")
    for suffix in IMAGE_SUFFIXES:
        candidate = stem.with_name(stem.name + REFERENCE + (str(number) if number > 1 else "") + suffix)
        if (folder / candidate).is_file():
            return candidate.as_posix()
    return None


def sidecar_references(folder: Path, file: str) -> list[str]:
    """``file``'s sidecar reference images in order: ``<name>.ref.<ext>``, then ``<name>.ref2.<ext>``, ... up to the
    first number missing."""
    found: list[str] = []
    while (reference := sidecar_reference(folder, file, len(found) + 1)) is not None:
        found.append(reference)
    return found


def caption_table(folder: Path) -> dict[str, dict[str, Any]]:
    """Per file name, its ``caption`` (and ``references``, if given: the ``reference`` column, a path or, in
    ``metadata.jsonl``, a list of paths, then ``reference2``, ``reference3``, ...) from ``metadata.jsonl`` or
    ``captions.csv``."""
    rows: list[dict[str, str]] = []
    if (folder / "metadata.jsonl").is_file():
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    elif (folder / "captions.csv").is_file():
        with open(folder / "captions.csv", newline="") as table:
            rows = list(csv.DictReader(table))
    entries = {}
    for row in rows:
        name, text = row.get("file_name"), row.get("text", row.get("caption"))
        if name is None or text is None:
            raise ValueError(f"{folder}: every caption row needs 'file_name' and 'text' (or 'caption'); got {sorted(row)}")
        entries[name] = {"caption": text.strip(), **({"references": references} if (references := table_references(row))
                                                     else {})}
    return entries


def table_references(row: dict[str, Any]) -> tuple[str, ...]:
    """A caption row's reference images in order: its ``reference`` (a path, or a list of them), then ``reference2``,
    ``reference3``, ... up to the first empty or missing."""
    first = row.get("reference")
    found = list(first) if isinstance(first, list) else [first] if first else []
    while row.get(f"reference{len(found) + 1}"):
        found.append(row[f"reference{len(found) + 1}"])
    return tuple(found)


def read_frames(path: Path) -> list[Image.Image]:
    """The RGB frames of an image (one) or a video (diffusers' ``load_video``: GIFs by PIL, others by imageio)."""
    from diffusers.utils import load_video

    try:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                return [image.convert("RGB")]
        return [frame.convert("RGB") for frame in load_video(str(path))]
    except Exception as error:  # any decoder's failure: this file is unreadable, the rest may be fine
        raise UnusableMedia(f"cannot be read ({type(error).__name__}: {error})") from error


def choose_bucket(frames: list[Image.Image], resolutions: list[tuple[int, int]], frame_counts: list[int]) -> Bucket:
    """The resolution nearest the media's aspect ratio, and the most frames it has among ``frame_counts``."""
    width, height = frames[0].size
    aspect = math.log(height / width)
    best_height, best_width = min(resolutions, key=lambda hw: abs(math.log(hw[0] / hw[1]) - aspect))
    fitting = [count for count in frame_counts if count <= len(frames)]
    if not fitting:
        raise UnusableMedia(f"has {len(frames)} frames, fewer than the smallest of data.frames={sorted(frame_counts)}")
    return Bucket(max(fitting), best_height, best_width)


def to_pixels(frames: list[Image.Image], bucket: Bucket) -> torch.Tensor:
    """The bucket's first frames, each resized to cover it and centre-cropped: ``(F, 3, H, W)`` in ``[-1, 1]``."""
    fitted = [np.asarray(ImageOps.fit(frame, (bucket.width, bucket.height), Image.BICUBIC))
              for frame in frames[: bucket.frames]]
    pixels = torch.from_numpy(np.stack(fitted)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0
