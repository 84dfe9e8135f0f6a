"""Shared pieces of the exactness tests: data, a single-process LightningModule, and the reference.

The LightningModule is written as a user would write it for one process: it calls the model on
the full sequence and takes a flow-matching loss on the full output. The data carries each
sample's noise and timestep, so a single-process reference can reproduce any layout's global
batches exactly; the reference trains on the batches Lightning's DistributedSampler gives the
dp ranks, concatenated in rank order.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from fixtures.models import tiny_flux, tiny_ltx, tiny_qwenimage, tiny_wan

TEXT_TOKENS = 8
TEXT_DIM = 32
LTX_GRID = (2, 4, 4)  # latent frames, height, width: 32 video tokens
LATENT_SHAPES = {"flux": (64, 16), "qwenimage": (64, 16), "wan": (4, 4, 8, 8),  # (tokens, channels) / (C, F, H, W)
                 "ltx": (LTX_GRID[0] * LTX_GRID[1] * LTX_GRID[2], 8)}


class SyntheticFlowData(Dataset):
    """Seeded latents, text embeddings, and each sample's own noise and timestep."""

    def __init__(
        self, kind: str, size: int = 16, seed: int = 1234, seq_tokens: int | None = None,
        shape: tuple[int, ...] | None = None, text_tokens: int = TEXT_TOKENS,
    ) -> None:
        shape = shape or LATENT_SHAPES[kind]
        if seq_tokens is not None:
            shape = (seq_tokens, shape[1])
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(size, *shape, generator=g)
        self.noise = torch.randn(size, *shape, generator=g)
        self.text = torch.randn(size, text_tokens, TEXT_DIM, generator=g)
        self.t = torch.rand(size, generator=g)
        # QwenImage takes a text padding mask: samples keep 3..8 of their text tokens.
        self.text_mask = torch.arange(text_tokens) < (3 + torch.arange(size) % 6)[:, None]

    def __len__(self) -> int:
        return len(self.t)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"latents": self.latents[i], "noise": self.noise[i], "text": self.text[i], "t": self.t[i],
                "text_mask": self.text_mask[i]}


def latent_grid(tokens: int) -> tuple[int, int]:
    """``(height, width)`` of a latent grid with ``tokens`` cells, as square as ``tokens`` allows."""
    height = max(h for h in range(1, int(tokens**0.5) + 1) if tokens % h == 0)
    return height, tokens // height


def flux_ids(tokens: int) -> torch.Tensor:
    """Flux position ids of a latent grid: rows ``(0, y, x)``."""
    height, width = latent_grid(tokens)
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.zeros_like(y), y, x], -1).reshape(-1, 3).float()


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the gradients that exist (some parameters are unused, e.g. QwenImage's spare norms)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class FlowMatchingModule(L.LightningModule):
    """Rectified-flow training of a tiny DiT, written for one process."""

    def __init__(
        self, kind: str = "flux", optimizer: str = "adamw", lr: float = 3e-4, checkpointing: bool = False
    ) -> None:
        super().__init__()
        self.kind, self.optimizer_name, self.lr = kind, optimizer, lr
        self.transformer = {"flux": tiny_flux, "qwenimage": tiny_qwenimage, "wan": tiny_wan, "ltx": tiny_ltx}[kind]()
        if checkpointing:  # recompute each block in backward (diffusers' activation checkpointing)
            self.transformer.enable_gradient_checkpointing()
        self.step_losses: list[float] = []
        self.logged_losses: list[float] = []
        self.first_grads: dict[str, torch.Tensor] | None = None

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0, noise, t = batch["latents"], batch["noise"], batch["t"]
        t_b = t.view(-1, *([1] * (x0.dim() - 1)))
        noisy = (1 - t_b) * x0 + t_b * noise
        if self.kind == "flux":
            pred = self.transformer(
                hidden_states=noisy,
                encoder_hidden_states=batch["text"],
                pooled_projections=batch["text"].mean(1),
                timestep=t,
                img_ids=flux_ids(x0.shape[1]),
                txt_ids=torch.zeros(batch["text"].shape[1], 3),
            ).sample
        elif self.kind == "qwenimage":
            pred = self.transformer(
                hidden_states=noisy,
                encoder_hidden_states=batch["text"],
                encoder_hidden_states_mask=batch["text_mask"],
                timestep=t,
                img_shapes=[(1, *latent_grid(x0.shape[1]))] * x0.shape[0],
            ).sample
        elif self.kind == "ltx":
            frames, height, width = LTX_GRID
            pred = self.transformer(
                hidden_states=noisy,
                encoder_hidden_states=batch["text"],
                timestep=t * 1000,
                encoder_attention_mask=batch["text_mask"].float(),
                num_frames=frames,
                height=height,
                width=width,
            ).sample
        else:
            pred = self.transformer(noisy, t * 1000, batch["text"]).sample
        return F.mse_loss(pred, noise - x0)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss, so a DDP-wrapped module (Accelerate) computes it through DDP's forward."""
        return self.loss(batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.step_losses.append(loss.item())
        self.log("loss", loss, sync_dist=True, on_step=True, prog_bar=False)
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        self.logged_losses.append(float(self.trainer.callback_metrics["loss"]))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.first_grads is None:
            self.first_grads = grads_of(self.transformer)

    # Adam divides by sqrt(v) + eps: with eps=1e-8 a gradient entry of 4e-8 turns its fp32 rounding
    # (1e-7 of the largest entry) into a 5% different step; eps=1e-6 and a small lr keep it below 1e-5.
    adam_eps = 1e-6

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            # SGD exposes any error in gradient scale (AdamW normalises it away).
            return torch.optim.SGD(self.parameters(), lr=30 * self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, eps=self.adam_eps, weight_decay=0.01)


def global_batches(dataset: Dataset, dp: int, per_rank: int, steps: int, seed: int = 0) -> list[dict[str, Any]]:
    """The global batch of each step: every dp rank's DistributedSampler batch, concatenated by rank.

    Follows Lightning across epoch boundaries (``set_epoch`` reshuffles; the last partial batch is kept).
    """
    samplers = [DistributedSampler(dataset, num_replicas=dp, rank=r, shuffle=True, seed=seed) for r in range(dp)]
    batches: list[dict[str, Any]] = []
    epoch = 0
    while len(batches) < steps:
        for sampler in samplers:
            sampler.set_epoch(epoch)
        orders = [list(sampler) for sampler in samplers]
        for k in range(0, len(orders[0]), per_rank):
            batches.append(default_collate([dataset[i] for order in orders for i in order[k : k + per_rank]]))
        epoch += 1
    return batches[:steps]


def sequential_batches(dataset: Dataset, dp: int, per_rank: int, steps: int) -> list[dict[str, Any]]:
    """Global batches of an unshuffled loader sharded by Accelerate: rank r takes batch ``k * dp + r``."""
    size = dp * per_rank
    return [default_collate([dataset[i] for i in range(k * size, (k + 1) * size)]) for k in range(steps)]


def reference_run(
    kind: str,
    optimizer: str,
    dp: int,
    per_rank: int,
    steps: int,
    *,
    clip: float | None = None,
    accumulate: int = 1,
    bf16: bool = False,
    data_kwargs: dict[str, Any] | None = None,
    sequential: bool = False,
    module: FlowMatchingModule | None = None,
) -> dict[str, Any]:
    """Train one process on the global batches a ``dp``-way run sees; return losses, grads, weights.

    Mirrors Lightning's order: accumulate ``loss / accumulate``, record gradients (as
    ``on_before_optimizer_step`` does), clip by norm, step. ``module`` trains that instance (a
    subclass with parameters outside the transformer) instead of ``FlowMatchingModule(kind, optimizer)``;
    the grads and weights returned are then all of its own, not only the transformer's.
    """
    measured = module
    if module is None:
        module = FlowMatchingModule(kind, optimizer)
        measured = module.transformer
    opt = module.configure_optimizers()
    losses, first_grads = [], None
    order = sequential_batches if sequential else global_batches
    batches = order(SyntheticFlowData(kind, **(data_kwargs or {})), dp, per_rank, steps * accumulate)
    for i, batch in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.loss(batch)
        (loss / accumulate).backward()
        losses.append(loss.item())
        if (i + 1) % accumulate:
            continue
        if first_grads is None:
            first_grads = grads_of(measured)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return {"losses": losses, "grads": first_grads, "state": measured.state_dict()}


def quiet_trainer(strategy: Any, max_steps: int, devices: int | None = None, **kwargs: Any) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary; ``devices`` defaults to
    torchrun's local world (``LOCAL_WORLD_SIZE``: Lightning deletes ``WORLD_SIZE`` at teardown)."""
    options = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False, **kwargs}
    devices = devices or int(os.environ["LOCAL_WORLD_SIZE"])
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, **options)


def lightning_run(
    kind: str,
    optimizer: str,
    strategy_kwargs: dict[str, Any],
    per_rank: int,
    steps: int,
    trainer_kwargs: dict[str, Any] | None = None,
    data_kwargs: dict[str, Any] | None = None,
    checkpointing: bool = False,
) -> dict[str, Any]:
    """Rank body: fit ``FlowMatchingModule`` under ``ContextParallelStrategy`` on torchrun's environment."""
    from cp_plugin import ContextParallelStrategy

    module = FlowMatchingModule(kind, optimizer, checkpointing=checkpointing)
    loader = DataLoader(SyntheticFlowData(kind, **(data_kwargs or {})), batch_size=per_rank, shuffle=True)
    strategy = ContextParallelStrategy(**strategy_kwargs)
    trainer = quiet_trainer(strategy, steps, **(trainer_kwargs or {}))
    trainer.fit(module, loader)
    return {
        "losses": module.step_losses,
        "logged": module.logged_losses,
        "grads": module.first_grads,
        "state": module.transformer.state_dict(),
        "dp_rank": strategy.dp_rank,
        "cp_rank": strategy.cp_rank,
        "left_after_fit": sorted(name for name, m in module.named_modules() if "_diffusers_hook" in vars(m)),
    }


def lightning_runs(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several ``lightning_run`` s in one launch (processes and the process group are reused)."""
    return [lightning_run(**case) for case in cases]


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Max abs difference relative to the max abs expected value (robust for tiny entries)."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = float((actual - expected).abs().max() / scale)
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def update_error(
    after: torch.Tensor, expected_after: torch.Tensor, before: torch.Tensor, steps: int, *, norm: bool = False,
    atol: float = 0.0,
) -> tuple[float, float, float]:
    """``(error beyond the allowance, the expected update's size, the allowance)`` of the update ``after - before``.

    An update is known only to the resolution of the weights: every step rounds each weight twice at
    most (decay, then step), by half an ulp, in both runs, so ``2 * steps`` ulps of ``max|before|`` are
    allowed (this covers weights that do not move at all), plus ``atol``, what the caller knows the
    update may differ by besides (its gradients' tolerance). Sizes are largest entries, or norms
    (``norm=True``; the allowance then scales with the square root of the count).
    """
    expected = expected_after - before
    floor = 2 * steps * torch.finfo(before.dtype).eps * float(before.abs().max())
    measure = torch.linalg.vector_norm if norm else (lambda x: x.abs().max())
    if norm:
        floor *= before.numel() ** 0.5
    allowance = floor + atol
    return max(0.0, float(measure(after - expected_after)) - allowance), float(measure(expected)), allowance


def assert_update_close(
    after: torch.Tensor, expected_after: torch.Tensor, before: torch.Tensor, rtol: float, steps: int, what: str,
    *, norm: bool = False,
) -> None:
    """The update ``after - before`` matches the expected one to ``rtol`` of its largest entry (see :func:`update_error`).

    Weights that barely move in a few steps pass a weight tolerance even when a step is skipped or
    wrong; their updates do not. ``norm=True`` compares norms instead (error norm <= ``rtol`` x update
    norm): AdamW's first steps are about ``lr * sign(grad)``, so under bf16 an entry whose gradient is
    at the rounding noise can flip sign and differ by ``2 lr``; the norm is not decided by a few such
    entries, a skipped step is.
    """
    err, scale, allowance = update_error(after, expected_after, before, steps, norm=norm)
    kind = "norm of the" if norm else "largest"
    assert err <= rtol * scale, (
        f"{what}: update differs by {err + allowance:.2e} > {rtol:.0e} x {kind} update {scale:.2e} + resolution "
        f"{allowance:.1e}"
    )
