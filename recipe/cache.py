"""The latent cache: what ``prepare.py`` writes once and ``train.py data=latents`` reads for every epoch.

On disk, a folder of safetensors shards plus ``cache.json``:

- ``cache.json`` names the family and a fingerprint of what made the latents (the VAE's and text
  encoders' configs, the prompt length, the buckets). Adding to a cache with another model or other
  buckets is refused: one cache never mixes latents that mean different things.
- ``shard-r<rank>-<unique id>.safetensors`` holds up to ``data.shard_size`` samples, tensors
  ``<i>.latents`` ``(F, C, H, W)`` and ``<i>.<text tensor>``, with each sample's source file,
  caption, shape and (edit tasks) number of reference images in the header's metadata. A shard is
  written to a temporary name and renamed, so a shard on disk is always whole; a crash loses at most
  the samples not yet in one, and since the writer flushes on the way out of an exception, usually
  not even those.

Reading needs only the headers up front; each sample's tensors are read when it is drawn
(:class:`LatentCache`), so no rank holds the dataset. :class:`BucketBatches` groups samples of
one shape and number of reference images (a bucket: their tensors stack) into batches, the unit a
sampler shuffles and spreads over data-parallel ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from recipe.media import MediaItem

INFO = "cache.json"


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of JSON-able ``settings`` (what made the latents)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def claim(folder: Path, info: dict[str, Any]) -> None:
    """Make ``folder`` a cache made as ``info`` says, or refuse one made otherwise (every rank may call this)."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = folder / INFO
    if existing.is_file():
        found = json.loads(existing.read_text())
        if found["fingerprint"] != info["fingerprint"]:
            raise ValueError(
                f"data.cache={str(folder)!r} was made with model.family={found['family']} from {found['pretrained_path']!r} "
                f"and other settings ({found['settings']}); this run has model.family={info['family']} from "
                f"{info['pretrained_path']!r} ({info['settings']}). Use a new data.cache, or the cache's model and settings"
            )
        return
    temporary = folder / f"{INFO}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(info, indent=1))
    os.replace(temporary, existing)


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.safetensors"))


def shard_samples(shard: Path) -> list[dict[str, Any]]:
    """The samples a shard holds (from its header only)."""
    with safe_open(shard, framework="pt") as opened:
        return json.loads(opened.metadata()["samples"])


def cached_files(folder: Path) -> set[str]:
    """Source files already in the cache's shards."""
    return {sample["file"] for shard in shard_files(folder) for sample in shard_samples(shard)}


class ShardWriter:
    """Collects encoded samples and writes them ``shard_size`` at a time, each shard whole or not at all."""

    def __init__(self, folder: Path, rank: int, shard_size: int) -> None:
        self.folder, self.rank, self.shard_size = folder, rank, shard_size
        self.tensors: dict[str, torch.Tensor] = {}
        self.samples: list[dict[str, Any]] = []
        for stale in folder.glob(f"shard-r{rank}-*.tmp"):  # a shard this rank was writing when it died
            stale.unlink()

    def add(self, item: MediaItem, tensors: dict[str, torch.Tensor], references: int = 0) -> None:
        """One sample's tensors, and its number of reference images (edit tasks; 0: none), part of its bucket."""
        index = len(self.samples)
        for name, tensor in tensors.items():
            self.tensors[f"{index}.{name}"] = tensor.detach().cpu().contiguous().clone()
        self.samples.append({"file": item.file, "caption": item.caption, "shape": list(tensors["latents"].shape),
                             **({"references": references} if references else {})})
        if len(self.samples) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.samples:
            return
        name = f"shard-r{self.rank}-{uuid.uuid4().hex[:12]}.safetensors"  # never the name of a shard on disk
        temporary = self.folder / f"{name[: -len('.safetensors')]}.tmp"
        save_file(self.tensors, temporary, metadata={"samples": json.dumps(self.samples)})
        os.replace(temporary, self.folder / name)
        self.tensors, self.samples = {}, []


class LatentCache(Dataset):
    """The cache's samples, read lazily: ``{"latents": (F, C, H, W), <text tensors>}`` per index."""

    def __init__(self, folder: Path) -> None:
        if not (folder / INFO).is_file():
            raise FileNotFoundError(
                f"data.cache={str(folder)!r} is not a latent cache (no {INFO}); build it with "
                f"python prepare.py model=<family> model.pretrained_path=<pipeline> data.path=<media> data.cache={folder}"
            )
        self.folder, self.info = folder, json.loads((folder / INFO).read_text())
        # ordered by source file, not by shard: shard names are random, and the order (hence each sample's
        # index, batches and noise seeds) must be the same for every cache of the same data
        found = sorted((sample["file"], shard, position, tuple(sample["shape"]), sample.get("references", 0))
                       for shard in shard_files(folder) for position, sample in enumerate(shard_samples(shard)))
        self.index = [(shard, position, shape, references) for _, shard, position, shape, references in found]
        if not self.index:
            raise ValueError(f"data.cache={str(folder)!r} holds no samples yet; run prepare.py (it fills what is missing)")
        self._open: dict[Path, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def shape(self, index: int) -> tuple[int, ...]:
        return self.index[index][2]

    def bucket(self, index: int) -> tuple[tuple[int, ...], int]:
        """What a batch's samples share: the latents' shape and the number of reference images (edit tasks)."""
        return self.index[index][2:]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard, position, _, _ = self.index[index]
        if shard not in self._open:  # opened in the process that reads (a DataLoader worker), on first use
            self._open[shard] = safe_open(shard, framework="pt")
        opened = self._open[shard]
        prefix = f"{position}."
        return {key[len(prefix):]: opened.get_tensor(key) for key in opened.keys() if key.startswith(prefix)}

    def __getstate__(self) -> dict[str, Any]:  # open files stay in the process that opened them
        return {**self.__dict__, "_open": {}}


class BucketBatches(Dataset):
    """Batches of ``batch_size`` samples of one bucket (shape and number of reference images), in a fixed seeded order.

    A batch is the item, so a ``DataLoader(batch_size=None)`` with any sampler (Lightning's
    ``DistributedSampler`` over data-parallel ranks) shuffles and shards whole batches; every rank of
    a context-parallel group draws the same one. A bucket's last batch may be smaller.
    """

    def __init__(self, cache: LatentCache, batch_size: int, seed: int = 0) -> None:
        buckets: dict[tuple[tuple[int, ...], int], list[int]] = defaultdict(list)
        for index in range(len(cache)):
            buckets[cache.bucket(index)].append(index)
        order = random.Random(seed)
        self.batches: list[list[int]] = []
        for bucket in sorted(buckets):
            members = buckets[bucket]
            order.shuffle(members)
            self.batches += [members[i: i + batch_size] for i in range(0, len(members), batch_size)]
        self.cache = cache

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        members = self.batches[index]
        samples = [self.cache[i] for i in members]
        return {"index": torch.tensor(members), **{name: torch.stack([s[name] for s in samples]) for name in samples[0]}}
