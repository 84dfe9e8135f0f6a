"""Rectified-flow training of a DiT (class- or text-conditioned), written exactly as for one process.

Nothing here knows about context parallelism: the model is called on the full sequence and the
loss is taken on the full output. ``ContextParallelStrategy`` splits and gathers around the model,
and gives every rank of a CP group the same batch and the same random numbers (noise, timesteps),
so this module trains identically on one process or many.

Objective as in diffusers' flow-matching training scripts: ``t ~ sigmoid(N(0, 1))`` (logit-normal),
``x_t = (1 - t) x0 + t noise``, target velocity ``noise - x0``; a family trained otherwise declares its own
time sampling, noising and loss (``recipe.families.family``: CogVideoX's v-prediction on a DDPM
schedule). Each sample's noise and time come
from a generator seeded by (run seed, draw count, the sample's dataset index), so a run is the same
whatever the layout: dp x cp ranks, one process, a resumed run (the count is in the checkpoint). Sampling integrates the velocity
field with Euler steps from ``t = 1`` (noise) to ``t = 0``. A two-expert pipeline (Wan 2.2 A14B,
``model.expert``) trains each expert only on its own noise levels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

import lightning as L
import torch

from recipe.families import family
from recipe.lora import LoraSettings, add_lora
from recipe.models import EXPERTS, ModelConfig, boundary_ratio, build_model


@dataclass
class OptimizerConfig:
    """The optimizer, with linear warm-up (Hydra group ``optimizer``): AdamW, or plain SGD (``name=sgd``).

    SGD is there to check exactness: AdamW divides each step by the gradient's own running size, so a
    gradient off by a constant factor (a wrong scale under a parallel layout) trains almost the same,
    while SGD's step is the gradient itself. ``beta1``/``beta2`` are AdamW's.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    beta1: float = 0.9
    beta2: float = 0.99

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise ValueError(f"optimizer.name={self.name!r} is not one of 'adamw', 'sgd'")


class FlowMatching(L.LightningModule):
    """Flow matching on ``{"latents": (B, F, C, H, W), ...conditioning}``.

    The conditioning is a class ``"label"`` (the demo data: a learned embedding stands in for text) or
    the text tensors a latent cache holds (``"prompt_embeds"``, ...; ``num_classes=0``).
    """

    def __init__(
        self, model: ModelConfig | Mapping[str, Any], optimizer: OptimizerConfig | Mapping[str, Any], num_classes: int,
        lora: LoraSettings | Mapping[str, Any] | None = None, seed: int = 0,
    ) -> None:
        super().__init__()
        model = model if isinstance(model, ModelConfig) else ModelConfig(**model)
        optimizer = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(**optimizer)
        lora = lora if isinstance(lora, LoraSettings) else LoraSettings(**(lora or {}))
        # plain dicts in the checkpoint, so it loads with torch.load(weights_only=True)
        self.save_hyperparameters({"model": asdict(model), "optimizer": asdict(optimizer), "num_classes": num_classes,
                                   "lora": asdict(lora), "seed": seed})
        self.seed = seed
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # batches drawn for: part of the state
        self.family = family(model.family).trained_from(model.pretrained_path)
        # Two-expert pipelines: each trained expert sees only the noise levels the pipeline gives it.
        self.expert, self.boundary = model.expert, boundary_ratio(model)
        trained = {name: build_model(model, name) for name in EXPERTS[model.expert]}
        first, *second = trained.values()  # model.expert=low: transformer_2 is the one trained, held as transformer
        self.transformer = first
        self.transformer_2 = second[0] if second else None  # model.expert=both: the low-noise expert
        self.lora = add_lora(self.transformer, lora)  # rank 0: every weight trains
        if self.transformer_2 is not None:
            add_lora(self.transformer_2, lora)
        # A LoRA checkpoint holds the adapters only: the frozen base comes from model.pretrained_path again.
        self.strict_loading = not self.lora
        self.guidance_scale = model.guidance_scale
        self.class_embedding = None
        if num_classes:
            # The conditioning lives outside the CP'd model; its gradient is exact too (see cp_plugin.sequence).
            self.text_tokens, self.text_dim = model.text_tokens, self.family.text_dims(self.transformer)["prompt_embeds"]
            self.class_embedding = torch.nn.Embedding(num_classes, self.text_tokens * self.text_dim)
        self.optimizer_config = optimizer

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        """The pipeline's transformers this module trains, by component name (``transformer``, ``transformer_2``)."""
        if self.transformer_2 is not None:
            return {"transformer": self.transformer, "transformer_2": self.transformer_2}
        return {EXPERTS[self.expert][0]: self.transformer}

    def ddp_options(self) -> dict[str, Any]:
        """What DDP must be told about this module: with both experts a step may leave one of them unused, and which
        one changes from step to step, so DDP finds unused parameters every step (its static graph cannot)."""
        return {"find_unused_parameters": True} if self.transformer_2 is not None else {}

    def sequence_length(self, latent_shape: tuple[int, ...]) -> int:
        """Image/video tokens the transformer sees for one sample of latents ``(F, C, H, W)``."""
        return self.family.tokens(self.transformer, latent_shape)

    def check_data(self, sample: dict[str, torch.Tensor]) -> None:
        """Refuse, before training, data whose latents or text this model cannot take (naming both sides)."""
        self.velocity_inputs_fit(sample["latents"].shape[1])
        for name, width in self.family.text_dims(self.transformer).items():
            if name not in sample or (width is not None and sample[name].shape[-1] != width):
                found = sample[name].shape[-1] if name in sample else "none"
                raise ValueError(f"the data's {name} have width {found} but the model takes {width}: the cache was "
                                 "made with another model; build one with this model.pretrained_path (prepare.py)")

    def velocity_inputs_fit(self, channels: int) -> None:
        in_channels, fitting = self.transformer.config.in_channels, self.family.input_channels(channels)
        if in_channels not in fitting:
            raise ValueError(
                f"the data's latents have {channels} channels but the model takes in_channels={in_channels}; set "
                f"model.config.in_channels={fitting[0]} (and out_channels={channels} for Wan), or load a "
                "model.pretrained_path made for such latents"
            )

    def condition(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The text conditioning of ``batch``: the cached text tensors, or the label's learned embedding."""
        if "label" not in batch:
            return {name: batch[name] for name in self.family.text_dims(self.transformer)}
        labels = batch["label"]
        text = self.class_embedding(labels).view(len(labels), self.text_tokens, self.text_dim)
        return self.family.demo_text(text)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's velocity prediction for latents ``(B, F, C, H, W)`` at times ``t`` ``(B,)``.

        With both experts, each sample goes to the expert of its noise level, as the pipeline's sampling loop does
        (``transformer`` at ``t >= boundary_ratio``, ``transformer_2`` below)."""
        self.velocity_inputs_fit(x_t.shape[2])
        if self.transformer_2 is None:
            return self.family.velocity(self.transformer, x_t, t, text, self.guidance_scale)
        high = t >= self.boundary
        out = x_t.new_zeros(x_t.shape, dtype=torch.float32)
        for expert, chosen in ((self.transformer, high), (self.transformer_2, ~high)):
            if chosen.any():
                text_chosen = {name: value[chosen] for name, value in text.items()}
                out[chosen] = self.family.velocity(expert, x_t[chosen], t[chosen], text_chosen, self.guidance_scale).float()
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The family's training loss of a batch (``forward`` so DDP-wrapped loops, e.g. Accelerate's, can call it)."""
        x0 = batch["latents"].float()
        noise, t = self.noise_and_times(batch["index"], x0)
        text = self.condition(batch)
        x_t, given = self.family.noisy_latents(x0, noise, t, text)  # image-to-video: leading frames given clean
        prediction = self.velocity(x_t, t, text)
        return self.family.loss(prediction[:, given:], x0[:, given:], noise[:, given:], x_t[:, given:], t)

    def noise_and_times(self, indices: torch.Tensor, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's noise and time (the family's ``draw_time``: logit-normal flow times by default), from its
        own generator (see the module docstring); one expert of two draws again until the time is its own (the
        distribution restricted to its noise levels)."""
        noise, times, draws = [], [], int(self.draws)  # one read of the count (a device sync on a GPU)
        for index in indices.tolist():
            generator = torch.Generator(x0.device).manual_seed(hash((self.seed, draws, index)) % 2**63)
            noise.append(torch.randn(x0.shape[1:], generator=generator, device=x0.device))
            time = self.family.draw_time(generator, x0.device)
            while self.expert in ("high", "low") and (float(time) >= self.boundary) != (self.expert == "high"):
                time = self.family.draw_time(generator, x0.device)
            times.append(time)
        self.draws += 1
        return torch.stack(noise), torch.stack(times)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, shape: tuple[int, ...], steps: int, seed: int = 0) -> torch.Tensor:
        """Latents for ``labels`` by Euler integration from noise (``seed``: same noise on every rank)."""
        if self.family.objective != "flow matching":
            raise ValueError(f"model.family={self.family.name}: {self.family.title} was trained with "
                             f"{self.family.objective}, whose predictions the demo's Euler steps cannot integrate; "
                             "train it on a latent cache (data=latents), whose validation samples the pipeline's own "
                             "scheduler generates")
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(len(labels), *shape, generator=generator).to(self.device)
        times = torch.linspace(1.0, 0.0, steps + 1, device=self.device)
        text = self.condition({"label": labels})
        for t, t_next in pairwise(times):
            x = x + (t_next - t) * self.velocity(x, t.expand(len(labels)), text).float()
        return x

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With LoRA, keep only what trains: the frozen base is model.pretrained_path's, and may be many GB."""
        if self.lora:
            frozen = {name for name, weight in self.named_parameters() if not weight.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def configure_optimizers(self) -> dict:
        cfg = self.optimizer_config
        trained = [p for p in self.parameters() if p.requires_grad]
        if cfg.name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
