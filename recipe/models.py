"""Which DiT the recipe trains (Hydra group ``model``): a family's tiny fixture or local weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers import FluxTransformer2DModel, ModelMixin, QwenImageTransformer2DModel, WanTransformer3DModel

from fixtures.models import TINY_FLUX, TINY_QWENIMAGE, TINY_WAN, seeded

FAMILIES = {"flux": (FluxTransformer2DModel, TINY_FLUX), "wan": (WanTransformer3DModel, TINY_WAN),
            "qwenimage": (QwenImageTransformer2DModel, TINY_QWENIMAGE)}


@dataclass
class ModelConfig:
    """Which DiT to train (Hydra group ``model``): a diffusers family, its config, and conditioning size."""

    family: str = "flux"
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the tiny config of the family
    text_tokens: int = 8  # class-conditioning tokens fed as encoder_hidden_states
    pretrained_path: str | None = None  # a local diffusers model directory (from_pretrained) instead
    seed: int = 0


def build_model(cfg: ModelConfig) -> ModelMixin:
    """The family's tiny model with ``cfg.config`` overrides and seeded weights, or local pretrained ones."""
    if cfg.family not in FAMILIES:
        raise ValueError(f"model.family={cfg.family!r} is not one of {sorted(FAMILIES)}")
    cls, tiny = FAMILIES[cfg.family]
    if cfg.pretrained_path is not None:
        return cls.from_pretrained(cfg.pretrained_path, local_files_only=True)
    config = {**tiny, **cfg.config}
    check_rope_axes(config)
    return seeded(cls, config, cfg.seed)


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


def text_dim(model: ModelMixin) -> int:
    """Width of the ``encoder_hidden_states`` the model expects."""
    config = model.config
    return config.get("joint_attention_dim") or config.get("text_dim")
