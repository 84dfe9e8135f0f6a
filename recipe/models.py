"""Which DiT the recipe trains (Hydra group ``model``): a family's tiny demo model, or pretrained weights."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin

from recipe.families import family

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # "org/name": what from_pretrained looks up on the Hub


@dataclass
class ModelConfig:
    """Which DiT to train (Hydra group ``model``): a diffusers family, its weights, how to run it."""

    family: str = "flux"
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the tiny config of the family
    text_tokens: int = 8  # class-conditioning tokens fed as encoder_hidden_states (demo data)
    pretrained_path: str | None = None  # a diffusers pipeline folder (or a transformer folder, or a Hub id)
    dtype: str = "float32"  # of the weights; "bfloat16" halves them (LoRA adapters still train in float32)
    gradient_checkpointing: bool = False  # recompute each block in backward: activations of one block at a time
    guidance_scale: float = 3.5  # fed to guidance-distilled transformers (Flux dev) in training
    seed: int = 0
    # Two-expert pipelines (Wan 2.2 A14B): "high" trains `transformer` (noise levels >= boundary_ratio), "low"
    # `transformer_2` (below it), "both" each on its own; None for pipelines with one transformer.
    expert: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"model.dtype={self.dtype!r} is not a torch dtype; use float32 or bfloat16")
        if self.expert not in EXPERTS:
            raise ValueError(f"model.expert={self.expert!r} is not one of high, low, both (or null: one transformer)")


# model.expert -> the pipeline's transformers it trains
EXPERTS: dict[str | None, tuple[str, ...]] = {None: ("transformer",), "high": ("transformer",),
                                              "low": ("transformer_2",), "both": ("transformer", "transformer_2")}


def pipeline_index(path: str | None) -> dict[str, Any]:
    """A pipeline folder's ``model_index.json`` (its components and settings); empty for anything else."""
    index = Path(path) / "model_index.json" if path else None
    return json.loads(index.read_text()) if index and index.is_file() else {}


def boundary_ratio(cfg: ModelConfig) -> float | None:
    """The noise level splitting a two-expert pipeline's transformers (its ``boundary_ratio``), checked against
    ``model.expert``: ``None`` for a pipeline with one transformer (and no ``model.expert``)."""
    config = pipeline_index(cfg.pretrained_path)
    ratio = config.get("boundary_ratio") if (config.get("transformer_2") or [None])[0] else None
    if ratio is None and cfg.expert is not None:
        raise ValueError(f"model.expert={cfg.expert} but model.pretrained_path={cfg.pretrained_path!r} is not a "
                         "pipeline with two experts (transformer_2 and boundary_ratio); drop model.expert")
    if ratio is not None and cfg.expert is None:
        raise ValueError(f"model.pretrained_path={cfg.pretrained_path!r} has two experts split at boundary_ratio="
                         f"{ratio}: choose which to train with model.expert=high (transformer, noise >= {ratio}), "
                         "low (transformer_2, below it) or both")
    return ratio


def seeded(cls: type[ModelMixin], config: dict[str, Any], seed: int) -> ModelMixin:
    """Instantiate ``cls(**config)`` with weights drawn from ``seed`` (same on every rank, no broadcast)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**config)


def build_model(cfg: ModelConfig, subfolder: str = "transformer") -> ModelMixin:
    """The family's tiny model with ``cfg.config`` overrides and seeded weights, or pretrained ones (the pipeline's
    ``subfolder``)."""
    cls = family(cfg.family).transformer_class
    if cfg.pretrained_path is not None:
        model = cls.from_pretrained(**pretrained_source(cfg.pretrained_path, subfolder),
                                    dtype=getattr(torch, cfg.dtype))
    else:
        config = {**family(cfg.family).tiny_config, **cfg.config}
        check_rope_axes(config)
        model = seeded(cls, config, cfg.seed).to(getattr(torch, cfg.dtype))
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()  # from_pretrained returns it in eval mode


def pretrained_source(path: str, subfolder: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for ``model.pretrained_path``: a pipeline folder (its ``subfolder``), a
    folder of the model itself, or a Hub id. Checked first, so a mistyped folder is named, not fetched from the Hub."""
    folder = Path(path)
    if (folder / subfolder / "config.json").is_file():
        return {"pretrained_model_name_or_path": path, "subfolder": subfolder}
    if (folder / "config.json").is_file():
        return {"pretrained_model_name_or_path": path}
    if folder.exists():
        raise FileNotFoundError(f"model.pretrained_path={path!r} holds neither {subfolder}/config.json (a diffusers "
                                "pipeline folder) nor config.json (a model folder); point it at a save_pretrained folder")
    if not HUB_ID.match(path) or path.startswith("."):
        raise FileNotFoundError(f"model.pretrained_path={path!r} does not exist; point it at a diffusers pipeline "
                                "folder, or a Hugging Face Hub id such as black-forest-labs/FLUX.1-dev")
    return {"pretrained_model_name_or_path": path, "subfolder": subfolder}


def check_rope_axes(config: dict[str, Any]) -> None:
    """Flux-style RoPE rotates ``axes_dims_rope`` slices of each head, so they must cover it exactly.

    diffusers does not check this; a mismatch fails later as a bare tensor-size error.
    """
    axes, head_dim = config.get("axes_dims_rope"), config["attention_head_dim"]
    if axes is not None and sum(axes) != head_dim:
        index_axis = head_dim // 8 * 2  # ids are (index, row, col); every axis even: RoPE rotates pairs
        row_axis = (head_dim - index_axis) // 4 * 2
        even = [index_axis, row_axis, head_dim - index_axis - row_axis]
        raise ValueError(
            f"model.config.axes_dims_rope=[{','.join(map(str, axes))}] sums to {sum(axes)} but "
            f"model.config.attention_head_dim={head_dim}; make them agree, e.g. "
            f"model.config.axes_dims_rope=[{','.join(map(str, even))}]"
        )

