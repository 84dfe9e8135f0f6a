"""Exact resume: stop after k steps, resume from the checkpoint, reach the uninterrupted run's weights.

The module draws its noise and timesteps from the global RNG inside ``training_step`` (as real
training code does), so resuming is exact only if every rank's RNG stream, the optimizer, the LR
schedule and the position inside the epoch all come back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from cp_plugin import ContextParallelStrategy
from exact import FlowMatchingModule, SyntheticFlowData, assert_close_rel, quiet_trainer
from launcher import run_distributed

STEPS, STOP = 6, 3  # 16 samples / (2 per rank) / dp: the stop is mid-epoch


class RandomDrawsModule(FlowMatchingModule):
    """Flow matching with noise and timesteps drawn from the global RNG on every step."""

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        drawn = {**batch, "noise": torch.randn_like(batch["noise"]), "t": torch.rand_like(batch["t"])}
        return super().loss(drawn)

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        decay = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)  # the schedule must resume too
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def fit(layout: dict[str, int], max_steps: int, ckpt_dir: Path | None = None, resume: str | None = None) -> dict:
    L.seed_everything(0, verbose=False)
    module = RandomDrawsModule("flux")
    callbacks = [ModelCheckpoint(ckpt_dir, every_n_train_steps=STOP, save_top_k=-1)] if ckpt_dir else []
    trainer = quiet_trainer(ContextParallelStrategy(**layout), max_steps, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks)
    trainer.fit(module, DataLoader(SyntheticFlowData("flux"), batch_size=2, shuffle=True), ckpt_path=resume)
    return {"state": module.transformer.state_dict(), "step": trainer.global_step}


def stop_and_resume(layout: dict[str, int], ckpt_dir: str) -> dict[str, Any]:
    """Rank body: uninterrupted run (saving at the stop), then a fresh run resumed from that checkpoint."""
    straight = fit(layout, STEPS, Path(ckpt_dir))
    checkpoint = str(next(Path(ckpt_dir).glob(f"*step={STOP}.ckpt")))
    return {"straight": straight, "resumed": fit(layout, STEPS, resume=checkpoint), "checkpoint": checkpoint}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("world", "layout"), [(2, {"ulysses_degree": 2}), (4, {"ring_degree": 2})],
                         ids=["ulysses2", "dp2_x_ring2"])
def test_resumed_run_reaches_the_uninterrupted_weights(tmp_path: Path, world: int, layout: dict[str, int]) -> None:
    results = run_distributed(stop_and_resume, world, layout, str(tmp_path), init_process_group=False)
    for r in results:
        assert r["straight"]["step"] == r["resumed"]["step"] == STEPS
        for name, weight in r["straight"]["state"].items():
            assert_close_rel(r["resumed"]["state"][name], weight, 1e-6, f"resumed {name}")


def load_into(layout: dict[str, int], checkpoint: str) -> dict[str, torch.Tensor]:
    """Rank body: fit to the checkpoint's own step under another layout (loads, trains nothing)."""
    return fit(layout, STOP, resume=checkpoint)["state"]


@pytest.mark.timeout(240)
def test_checkpoint_loads_under_another_layout(tmp_path: Path) -> None:
    saved = run_distributed(stop_and_resume, 2, {"ring_degree": 2}, str(tmp_path), init_process_group=False)[0]
    expected = torch.load(saved["checkpoint"], weights_only=True)["state_dict"]
    for state in run_distributed(load_into, 4, {"ulysses_degree": 2}, saved["checkpoint"], init_process_group=False):
        for name, weight in state.items():  # ring 2 -> dp 2 x ulysses 2
            assert weight.equal(expected[f"transformer.{name}"]), name
    single = FlowMatchingModule.load_from_checkpoint(saved["checkpoint"], map_location="cpu")  # -> one process
    for name, weight in single.transformer.state_dict().items():
        assert weight.equal(expected[f"transformer.{name}"]), name
