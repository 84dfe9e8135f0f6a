"""LoRA fine-tuning (Hydra group ``lora``): adapters added, trained and saved the way diffusers does it.

``add_lora`` freezes the base and adds peft adapters through diffusers' own API
(``transformer.add_adapter(LoraConfig(...))``); only they train. ``save_lora`` writes them in
diffusers' LoRA format, with the adapter's config (``r``, ``lora_alpha``, targets) as metadata:
without it a loader assumes ``lora_alpha == r`` and a LoRA trained with ``r=4, lora_alpha=8``
reloads at half strength. ``pipeline.load_lora_weights(dir)`` (or ``transformer.load_lora_adapter``)
loads the result. ``rank=0`` means full fine-tuning. Under context parallelism nothing changes:
adapters are ordinary layers inside the blocks, and their gradients are averaged like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import ModelMixin
from torch.distributed.tensor import DTensor

from recipe.families import family


@dataclass
class LoraSettings:
    """``lora.rank`` (0: full fine-tuning), ``lora.alpha`` (default: the rank), ``lora.target_modules``."""

    rank: int = 0
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank} must be >= 0 (0 trains every weight)")


def add_lora(model: ModelMixin, settings: LoraSettings) -> bool:
    """Freeze ``model`` and add trainable LoRA adapters (nothing to do for ``rank=0``); whether it did.

    The adapters train in float32 whatever the base's dtype (``cast_training_params``, as diffusers'
    scripts do): a bfloat16 base halves the weights' memory, but bfloat16 updates of small adapters round away.
    """
    if settings.rank == 0:
        return False
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha or settings.rank, init_lora_weights="gaussian",
        target_modules=list(settings.target_modules),
    ))
    cast_training_params(model, torch.float32)
    return True


def lora_layers(model: ModelMixin) -> dict[str, torch.Tensor]:
    """The adapters' weights, whole: FSDP2 shards are gathered, so every rank must call this."""
    from peft.utils import get_peft_model_state_dict

    return {name: weight.full_tensor() if isinstance(weight, DTensor) else weight
            for name, weight in get_peft_model_state_dict(model).items()}


def save_lora(model: ModelMixin, family_name: str, directory: Path,
              layers: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` 's adapters (``layers``, else :func:`lora_layers`) to ``directory`` in diffusers' LoRA
    format (the family's pipeline loader), with their config; returns the file."""
    family(family_name).lora_loader().save_lora_weights(
        directory,
        transformer_lora_layers=lora_layers(model) if layers is None else layers,
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    return Path(directory) / "pytorch_lora_weights.safetensors"
