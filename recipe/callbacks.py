"""Lightning callbacks for the training recipe: throughput, communication, memory, samples, curves.

Every rank runs the callbacks (sampling must run on every rank of a CP group, since the model's
collectives need all of them); only rank 0 writes files or talks to the logger.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from cp_plugin.comm import COMM_STATS
from recipe.data import to_pixels
from recipe.lora import lora_layers, save_lora


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: allocated CUDA memory, or resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class TrainingMonitor(L.Callback):
    """Logs step time, tokens/s (global), bytes this rank sent at CP collectives, per-rank peak memory.

    At the end rank 0 writes ``throughput.json`` to ``out_dir`` (steps, seconds in training steps,
    tokens/s over the steps after the first, which includes warm-up), the figures
    ``benchmarks.default_run`` reports.
    """

    def __init__(self, tokens_per_sample: int, out_dir: Path | None = None) -> None:
        self.tokens_per_sample, self.out_dir = tokens_per_sample, out_dir
        self._start = 0.0
        self._steps: list[tuple[float, int]] = []  # (seconds, global tokens) of each step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        COMM_STATS.reset()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step_time = time.perf_counter() - self._start
        samples = len(batch["latents"]) * trainer.strategy.distributed_sampler_kwargs["num_replicas"]
        self._steps.append((step_time, samples * self.tokens_per_sample))
        module.log("perf/step_time_s", step_time, sync_dist=True, reduce_fx="max")
        module.log("perf/tokens_per_s", samples * self.tokens_per_sample / step_time, prog_bar=True)
        module.log("comm/bytes_sent_per_step", float(COMM_STATS.bytes_sent), sync_dist=True, reduce_fx="max")
        peaks = module.all_gather(torch.tensor(peak_memory_mb(module.device), device=module.device))
        for rank, peak in enumerate(peaks.reshape(-1).tolist()):
            module.log(f"memory/peak_mb_rank{rank}", peak, rank_zero_only=True)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.out_dir is None or not trainer.is_global_zero or len(self._steps) < 2:
            return
        seconds, tokens = (sum(column) for column in zip(*self._steps[1:]))
        summary = {"steps": len(self._steps), "train_step_seconds": sum(s for s, _ in self._steps),
                   "tokens_per_s_after_first_step": tokens / seconds, "world_size": trainer.world_size}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "throughput.json").write_text(json.dumps(summary, indent=1))


class PeriodicSamples(L.Callback):
    """Calls ``generate`` every ``every_n_steps`` (0: never) and once at the end, on every rank: the model is
    context parallel, so sampling needs its whole CP group."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self._sampled_at: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._sampled_at = trainer.global_step
            self.generate(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._sampled_at != trainer.global_step:  # the last step may already have sampled
            self._sampled_at = trainer.global_step
            self.generate(trainer, module)

    def generate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        raise NotImplementedError


class SampleGrid(PeriodicSamples):
    """Every ``every_n_steps`` (and at the end) sample each class of ``examples`` and save/log a grid from rank 0.

    Top row: the training example of each class; bottom row: a sample of that class, drawn from the
    same noise every time, so grids from successive steps show the model improving, not new noise.
    """

    def __init__(self, every_n_steps: int, examples: dict[int, torch.Tensor], steps: int, out_dir: Path) -> None:
        super().__init__(every_n_steps)
        self.steps, self.out_dir = steps, out_dir
        self.labels = torch.tensor(list(examples))
        self.examples = torch.stack(list(examples.values()))  # (N, frames, C, H, W) latents

    def generate(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        samples = module.sample(self.labels.to(module.device), tuple(self.examples.shape[1:]), self.steps)
        if not trainer.is_global_zero:
            return
        from PIL import Image

        rows = [to_pixels(latents[:, 0].float().cpu()) for latents in (self.examples, samples)]  # first frames
        grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # (3, 2 H, N W)
        picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        picture.resize((picture.width * 2, picture.height * 2), Image.NEAREST).save(self.out_dir / "samples.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                caption = f"step {trainer.global_step}: training examples (top), samples (bottom)"
                logger.log_image("samples", [picture], step=trainer.global_step, caption=[caption])


class LossCurve(L.Callback):
    """Rank 0 keeps the synced loss of every step and plots it, with a moving average, at the end
    (``loss_curve.png``): the loss of one step is noisy (its timesteps are random), its trend is not."""

    def __init__(self, out_dir: Path, window: int = 20) -> None:
        self.out_dir, self.window = out_dir, window
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if trainer.is_global_zero and loss is not None:
            self.losses.append((trainer.global_step, float(loss)))

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.losses:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, losses = zip(*self.losses)
        window = max(1, min(self.window, len(losses)))
        average = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        layout = trainer.strategy.parallel_mesh.config
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, losses, lw=0.8, alpha=0.4, label="per step")
        ax.plot(steps[window - 1 :], average, lw=2, label=f"mean of {window} steps")
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching loss")
        ax.set_title(
            f"{trainer.world_size} processes: dp={layout.dp_degree} x ring={layout.ring_degree} "
            f"x ulysses={layout.ulysses_degree}"
        )
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.out_dir / "loss_curve.png", dpi=110)
        plt.close(fig)
        (self.out_dir / "loss_curve.json").write_text(json.dumps({"step": steps, "loss": losses, "mean": average}))


class LoraExport(L.Callback):
    """At the end of training, the LoRA adapters in diffusers' format: ``<run dir>/lora/`` (``pipeline.load_lora_weights``),
    and a two-expert pipeline's low-noise expert's in ``<run dir>/lora_2/`` (``load_into_transformer_2=True``)."""

    def __init__(self, family: str, out_dir: Path) -> None:
        self.family, self.out_dir = family, out_dir

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for name, transformer in module.components.items():
            layers = lora_layers(transformer)  # every rank: FSDP2 shards are gathered
            if trainer.is_global_zero:
                folder = "lora" if name == "transformer" else "lora_2"
                save_lora(transformer, self.family, self.out_dir / folder, layers)
        trainer.strategy.barrier()
