"""Rectified-flow training of a class-conditioned DiT, written exactly as for one process.

Nothing here knows about context parallelism: the model is called on the full sequence and the
loss is taken on the full output. ``ContextParallelStrategy`` splits and gathers around the model,
and gives every rank of a CP group the same batch and the same random numbers (noise, timesteps),
so this module trains identically on one process or many.

Objective as in diffusers' flow-matching training scripts: ``t ~ sigmoid(N(0, 1))`` (logit-normal),
``x_t = (1 - t) x0 + t noise``, target velocity ``noise - x0``. Sampling integrates the velocity
field with Euler steps from ``t = 1`` (noise) to ``t = 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from recipe.lora import LoraSettings, add_lora
from recipe.models import ModelConfig, build_model, text_dim


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up (Hydra group ``optimizer``)."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    beta1: float = 0.9
    beta2: float = 0.99


def flux_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Flux position ids ``(0, row, col)`` of a ``height x width`` token grid."""
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()


class FlowMatching(L.LightningModule):
    """Class-conditioned flow matching; batches are ``{"latents": (B, F, C, H, W), "label": (B,)}``."""

    def __init__(
        self, model: ModelConfig | Mapping[str, Any], optimizer: OptimizerConfig | Mapping[str, Any], num_classes: int,
        lora: LoraSettings | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        model = model if isinstance(model, ModelConfig) else ModelConfig(**model)
        optimizer = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(**optimizer)
        lora = lora if isinstance(lora, LoraSettings) else LoraSettings(**(lora or {}))
        # plain dicts in the checkpoint, so it loads with torch.load(weights_only=True)
        self.save_hyperparameters({"model": asdict(model), "optimizer": asdict(optimizer), "num_classes": num_classes,
                                   "lora": asdict(lora)})
        self.family = model.family
        if self.family not in ("flux", "wan"):
            raise ValueError(f"model.family={self.family!r}: train.py trains 'flux' or 'wan' models")
        self.transformer = build_model(model)
        add_lora(self.transformer, lora)  # rank 0: every weight trains
        self.text_tokens, self.text_dim = model.text_tokens, text_dim(self.transformer)
        # The conditioning lives outside the CP'd model; its gradient is exact too (see cp_plugin.sequence).
        self.class_embedding = torch.nn.Embedding(num_classes, self.text_tokens * self.text_dim)
        self.optimizer_config = optimizer

    def sequence_length(self, latent_shape: tuple[int, ...]) -> int:
        """Image/video tokens the transformer sees for one sample of latents ``(F, C, H, W)``."""
        frames, _, height, width = latent_shape
        if self.family == "wan":
            pf, ph, pw = self.transformer.config.patch_size
            return (frames // pf) * (height // ph) * (width // pw)
        return height * width

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        return self.class_embedding(labels).view(len(labels), self.text_tokens, self.text_dim)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The model's velocity prediction for latents ``(B, F, C, H, W)`` at times ``t`` ``(B,)``."""
        channels, in_channels = x_t.shape[2], self.transformer.config.in_channels
        if channels != in_channels:
            raise ValueError(
                f"the data's latents have {channels} channels but the model takes in_channels={in_channels}; set "
                f"model.config.in_channels={channels} (and out_channels for Wan), or load a model.pretrained_path "
                "made for such latents"
            )
        text = self.condition(labels)
        if self.family == "wan":  # video: (B, C, F, H, W), timesteps in [0, 1000]
            return self.transformer(x_t.transpose(1, 2), t * 1000, text).sample.transpose(1, 2)
        batch, _, channels, height, width = x_t.shape
        tokens = x_t[:, 0].flatten(2).transpose(1, 2)  # (B, H*W, C): one token per latent pixel
        out = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=text,
            pooled_projections=text.mean(1),
            timestep=t,
            img_ids=flux_ids(height, width, x_t.device),
            txt_ids=torch.zeros(self.text_tokens, 3, device=x_t.device),
        ).sample
        return out.transpose(1, 2).reshape(batch, 1, channels, height, width)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The flow-matching loss of a batch (``forward`` so DDP-wrapped loops, e.g. Accelerate's, can call it)."""
        x0, labels = batch["latents"], batch["label"]
        noise = torch.randn_like(x0)
        t = torch.sigmoid(torch.randn(len(x0), device=x0.device))  # logit-normal timesteps
        t_ = t.view(-1, 1, 1, 1, 1)
        prediction = self.velocity((1 - t_) * x0 + t_ * noise, t, labels)
        return F.mse_loss(prediction.float(), (noise - x0).float())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, shape: tuple[int, ...], steps: int, seed: int = 0) -> torch.Tensor:
        """Latents for ``labels`` by Euler integration from noise (``seed``: same noise on every rank)."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(len(labels), *shape, generator=generator).to(self.device)
        times = torch.linspace(1.0, 0.0, steps + 1, device=self.device)
        for t, t_next in pairwise(times):
            x = x + (t_next - t) * self.velocity(x, t.expand(len(labels)), labels)
        return x

    def configure_optimizers(self) -> dict:
        cfg = self.optimizer_config
        optimizer = torch.optim.AdamW(
            [p for p in self.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2)
        )
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
