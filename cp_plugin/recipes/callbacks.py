"""Lightning callbacks for the training recipe: throughput, communication, memory, samples, curves.

Every rank runs the callbacks (sampling must run on every rank of a CP group, since the model's
collectives need all of them); only rank 0 writes files or talks to the logger.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from cp_plugin.comm import COMM_STATS
from cp_plugin.recipes.data import to_pixels


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: allocated CUDA memory, or resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class TrainingMonitor(L.Callback):
    """Logs step time, tokens/s (global), bytes this rank sent at CP collectives, per-rank peak memory."""

    def __init__(self, tokens_per_sample: int) -> None:
        self.tokens_per_sample = tokens_per_sample
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        COMM_STATS.reset()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step_time = time.perf_counter() - self._start
        samples = len(batch["label"]) * trainer.strategy.distributed_sampler_kwargs["num_replicas"]
        module.log("perf/step_time_s", step_time, sync_dist=True, reduce_fx="max")
        module.log("perf/tokens_per_s", samples * self.tokens_per_sample / step_time, prog_bar=True)
        module.log("comm/bytes_sent_per_step", float(COMM_STATS.bytes_sent), sync_dist=True, reduce_fx="max")
        peaks = module.all_gather(torch.tensor(peak_memory_mb(module.device), device=module.device))
        for rank, peak in enumerate(peaks.reshape(-1).tolist()):
            module.log(f"memory/peak_mb_rank{rank}", peak, rank_zero_only=True)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and at the end) sample one image per class and log a grid from rank 0."""

    def __init__(self, every_n_steps: int, latent_shape: tuple[int, ...], num_classes: int, steps: int,
                 out_dir: Path) -> None:
        self.every_n_steps, self.latent_shape = every_n_steps, latent_shape
        self.num_classes, self.steps, self.out_dir = num_classes, steps, out_dir

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.log_grid(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.log_grid(trainer, module)

    def log_grid(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        labels = torch.arange(self.num_classes, device=module.device)
        latents = module.sample(labels, self.latent_shape, self.steps)  # every rank: the model is context parallel
        if not trainer.is_global_zero:
            return
        from PIL import Image

        frames = to_pixels(latents[:, 0].float().cpu())  # first frame of each sample, (N, 3, H, W)
        columns = 4
        rows = -(-len(frames) // columns)
        grid = torch.ones(3, rows * frames.shape[2], columns * frames.shape[3])
        for i, image in enumerate(frames):
            r, c = divmod(i, columns)
            grid[:, r * image.shape[1] : (r + 1) * image.shape[1], c * image.shape[2] : (c + 1) * image.shape[2]] = image
        picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        picture.resize((picture.width * 2, picture.height * 2), Image.NEAREST).save(self.out_dir / "samples.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [picture], step=trainer.global_step)


class LossCurve(L.Callback):
    """Rank 0 keeps the synced loss of every step and plots it at the end (``loss_curve.png``)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
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
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, losses, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching loss")
        ax.set_title("train.py (default config)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.out_dir / "loss_curve.png", dpi=110)
        plt.close(fig)
