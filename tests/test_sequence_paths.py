"""The sequence paths a LightningModule can take under ``ContextParallelStrategy`` train exactly as one process.

``tests/test_strategy_exact.py`` covers the default path (full inputs, gathered outputs, loss on the
full sequence). This file covers the rest of what the README promises, each against a one-process
run of the same module on the same global batches, with SGD and AdamW:

- ``shard_batch`` / ``presharded_inputs`` / ``gather_outputs=False``: no rank holds the full latents;
- ``strategy.shard`` and ``strategy.gather`` inside ``training_step``;
- a loss taken on local tokens;
- parameters outside the diffusers model: a conditioning embedding before it and a loss head after it.

The last two are where an inexact adjoint shows: diffusers' inference gather keeps only the local
slice of the gradient, which scales the model's gradients by ``1/cp`` but not the loss head's. The
local-loss paths use no output gather; they rest on DDP's mean over every rank, CP ranks included
(averaging over dp only, or summing over the CP group on top, is wrong there).
First-step gradients catch a wrong scale under either optimizer (AdamW normalises it away in the
weights); the weight *updates* (after minus before, not the weights, which barely move in 3 steps)
catch a wrong or skipped step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from exact import (
    TEXT_DIM,
    FlowMatchingModule,
    SyntheticFlowData,
    assert_close_rel,
    assert_update_close,
    flux_ids,
    grads_of,
    quiet_trainer,
    reference_run,
)
from launcher import run_distributed
from torch.utils.data import DataLoader

STEPS, PER_RANK = 3, 2
CHANNELS = 16  # tiny Flux's latent channels
# strategy options of each path; the module's loss follows the same name
PATHS: dict[str, dict[str, Any]] = {
    # full inputs, local outputs: the loss is taken on this rank's tokens, the target cut with strategy.shard
    "local_loss": {"gather_outputs": False},
    # latents arrive sharded (presharded hidden_states), the noise is sharded in the step with strategy.shard
    "shard_local": {"shard_batch": {"latents": 1}},
    # everything sharded; strategy.gather brings output and target back, the loss is on the full sequence
    "shard_gather": {"shard_batch": {"latents": 1, "noise": 1}},
}
# Measured (fp32, gloo, 2 and 4 ranks): first-step gradients within 9e-7 of the largest entry, losses
# within 1.1e-7; SGD updates equal to the fp32 resolution of the weights; AdamW updates within 1.7e-4
# (Adam's 1/sqrt(v) turns fp32 rounding of tiny gradient entries into a larger relative step).
# A skipped step changes an update by ~1/3, a wrong gradient scale the gradients by ~1/2.
LOSS_RTOL, GRAD_RTOL, UPDATE_RTOL = 1e-5, 1e-5, 1e-3


class SequencePathModule(FlowMatchingModule):
    """Tiny Flux with a conditioning embedding on the text and a loss head on the output, taking ``path``.

    Without a ``ContextParallelStrategy`` (the one-process reference) shard and gather are the
    identity, and every path is the plain loss ``mse(head(transformer(noisy, condition(text))), noise - x0)``.
    """

    def __init__(self, optimizer: str, path: str = "local_loss") -> None:
        super().__init__("flux", optimizer)
        self.path = path
        with torch.random.fork_rng(devices=[]):  # the same weights on every rank and in the reference
            torch.manual_seed(1)
            self.condition = torch.nn.Linear(TEXT_DIM, TEXT_DIM)
            self.head = torch.nn.Linear(CHANNELS, CHANNELS)

    def cp_strategy(self) -> Any:
        """The ``ContextParallelStrategy`` training this module, or ``None`` in one process."""
        from cp_plugin import ContextParallelStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategy if isinstance(strategy, ContextParallelStrategy) else None

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        strategy = self.cp_strategy()
        cp = strategy.cp_size if strategy else 1
        shard = strategy.shard if strategy else lambda x, dim: x
        gather = strategy.gather if strategy else lambda x, dim: x
        x0, noise, t = batch["latents"], batch["noise"], batch["t"]
        tokens = x0.shape[1] * (cp if "latents" in PATHS[self.path].get("shard_batch", {}) else 1)
        if self.path == "shard_local":
            noise = shard(noise, 1)
        t_b = t.view(-1, 1, 1)
        text = self.condition(batch["text"])
        pred = self.transformer(
            hidden_states=(1 - t_b) * x0 + t_b * noise,
            encoder_hidden_states=text,
            pooled_projections=text.mean(1),
            timestep=t,
            img_ids=flux_ids(tokens),  # ids of the full sequence: the model's split hook shards them
            txt_ids=torch.zeros(text.shape[1], 3),
        ).sample
        target = noise - x0
        if self.path == "local_loss":
            target = shard(target, 1)
        elif self.path == "shard_gather":
            pred, target = gather(pred, 1), gather(target, 1)
        return F.mse_loss(self.head(pred), target)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.first_grads is None:  # every parameter's, the embedding's and the head's too
            self.first_grads = grads_of(self)


def case(path: str, optimizer: str, **layout: int) -> dict[str, Any]:
    return {"path": path, "optimizer": optimizer, "strategy_kwargs": {**layout, **PATHS[path]}}


def fit_path(path: str, optimizer: str, strategy_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Rank body: fit ``SequencePathModule`` for ``STEPS`` steps; its local losses, first gradients, weights."""
    from cp_plugin import ContextParallelStrategy

    module = SequencePathModule(optimizer, path)
    strategy = ContextParallelStrategy(**strategy_kwargs)
    loader = DataLoader(SyntheticFlowData("flux"), batch_size=PER_RANK, shuffle=True)
    quiet_trainer(strategy, STEPS).fit(module, loader)
    return {"losses": module.step_losses, "logged": module.logged_losses, "grads": module.first_grads,
            "state": module.state_dict(), "cp": strategy.cp_size}


def fit_paths(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [fit_path(**spec) for spec in cases]


def check_path(results: list[dict[str, Any]], spec: dict[str, Any]) -> None:
    """Losses, first-step gradients and weight updates of every rank match one process."""
    cp = results[0]["cp"]
    dp = len(results) // cp
    label = f"{spec['path']} {spec['optimizer']} {spec['strategy_kwargs']}"
    reference = reference_run("flux", spec["optimizer"], dp, PER_RANK, STEPS, module=SequencePathModule(spec["optimizer"]))
    before = SequencePathModule(spec["optimizer"]).state_dict()
    # Local losses differ per CP rank; their mean over all ranks is the global loss (equal shards).
    mean_loss = torch.tensor([r["losses"] for r in results]).mean(0)
    assert_close_rel(mean_loss, torch.tensor(reference["losses"]), LOSS_RTOL, f"{label}: loss per step")
    assert_close_rel(torch.tensor(results[0]["logged"]), torch.tensor(reference["losses"]), LOSS_RTOL, f"{label}: synced log")
    for rank, r in enumerate(results):
        assert r["grads"].keys() == reference["grads"].keys(), f"{label}: gradients of different parameters"
        for name, expected in reference["grads"].items():
            assert_close_rel(r["grads"][name], expected, GRAD_RTOL, f"{label}: rank {rank} first grad {name}")
        for name, after in reference["state"].items():
            assert_update_close(r["state"][name], after, before[name], UPDATE_RTOL, STEPS, f"{label}: rank {rank} {name}")


TWO_RANKS = [case(path, optimizer, **layout) for layout in ({"ulysses_degree": 2}, {"ring_degree": 2})
             for path in PATHS for optimizer in ("sgd", "adamw")]
FOUR_RANKS = [case(path, optimizer, ring_degree=2) for path in PATHS for optimizer in ("sgd", "adamw")]  # dp 2 x ring 2
FOUR_RANKS += [case("shard_local", optimizer, ring_degree=2, ulysses_degree=2) for optimizer in ("sgd", "adamw")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world, cases", [(2, TWO_RANKS), (4, FOUR_RANKS)], ids=["ulysses2_ring2", "dp2_ring2_usp4"])
def test_sequence_paths_match_one_process(world: int, cases: list[dict[str, Any]]) -> None:
    results = run_distributed(fit_paths, world, cases, init_process_group=False)
    for i, spec in enumerate(cases):
        check_path([r[i] for r in results], spec)
