"""Exact resume, however the checkpoint was written: stop after k steps, resume, reach the uninterrupted run.

The module draws its noise and timesteps from the global RNG inside ``training_step`` (as real
training code does), so resuming is exact only if every rank's RNG stream, the optimizer, the LR
schedule and the position inside the epoch all come back. Checkpoints are written the three ways
Lightning users write them: ``ModelCheckpoint``, ``trainer.save_checkpoint`` after ``fit`` returns
(the loader's iterator is reset by then), and ``trainer.save_checkpoint`` from a callback mid-epoch.
Accelerate's ``save_state`` / ``load_state`` + ``skip_first_batches`` must be exact too. The
comparison is of the *updates* (weights after minus before): replaying or skipping a batch fails it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from exact import FlowMatchingModule, SyntheticFlowData, assert_close_rel, quiet_trainer
from launcher import run_distributed
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from cp_plugin import ContextParallelStrategy

STEPS, STOP = 6, 3  # 16 samples / (2 per rank) / dp: the stop is mid-epoch
RTOL = 2e-5  # of the update over STEPS steps; one replayed batch moves it by ~1e-2 and more


class RandomDrawsModule(FlowMatchingModule):
    """Flow matching with noise and timesteps drawn from the global RNG on every step."""

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        drawn = {**batch, "noise": torch.randn_like(batch["noise"]), "t": torch.rand_like(batch["t"])}
        return super().loss(drawn)

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        decay = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)  # the schedule must resume too
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class SaveAt(Callback):
    """``trainer.save_checkpoint`` from a user's callback, at the end of a given step."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def fit(layout: dict[str, Any], optimizer: str, max_steps: int, callbacks: list[Callback] = (),
        resume: str | None = None) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    module = RandomDrawsModule("flux", optimizer)
    trainer = quiet_trainer(ContextParallelStrategy(**layout), max_steps, enable_checkpointing=bool(callbacks),
                            callbacks=list(callbacks))
    trainer.fit(module, DataLoader(SyntheticFlowData("flux"), batch_size=2, shuffle=True), ckpt_path=resume)
    return trainer


def weights(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The transformer's full weights (FSDP2 shards gathered), on every rank."""
    from torch.distributed.tensor import DTensor

    state = trainer.lightning_module.transformer.state_dict()
    return {k: v.full_tensor() if isinstance(v, DTensor) else v.detach().clone() for k, v in state.items()}


def save_paths_and_resume(layout: dict[str, Any], optimizer: str, ckpt_dir: str) -> dict[str, Any]:
    """Rank body: one uninterrupted run that also checkpoints at the stop (ModelCheckpoint and a callback),
    a run whose checkpoint is saved after ``fit`` returns, and a resumed run from each checkpoint."""
    root = Path(ckpt_dir) / f"{'_'.join(f'{k}{v}' for k, v in layout.items())}_{optimizer}"
    callbacks = [ModelCheckpoint(root / "model_checkpoint", every_n_train_steps=STOP, save_top_k=-1),
                 SaveAt(STOP, root / "callback.ckpt")]
    straight = fit(layout, optimizer, STEPS, callbacks)
    stopped = fit(layout, optimizer, STOP)
    stopped.save_checkpoint(root / "after_fit.ckpt")  # the loop's iterator has been reset by now
    checkpoints = {
        "ModelCheckpoint": next((root / "model_checkpoint").glob(f"*step={STOP}.ckpt")),
        "save_checkpoint from a callback": root / "callback.ckpt",
        "save_checkpoint after fit": root / "after_fit.ckpt",
    }
    resumed = {how: fit(layout, optimizer, STEPS, resume=str(path)) for how, path in checkpoints.items()}
    return {"initial": weights(fit(layout, optimizer, 0)), "straight": weights(straight),
            "resumed": {how: weights(t) for how, t in resumed.items()},
            "steps": [straight.global_step, *(t.global_step for t in resumed.values())]}


def resume_cases(cases: list[tuple[dict[str, Any], str]], ckpt_dir: str) -> list[dict[str, Any]]:
    return [save_paths_and_resume(layout, optimizer, ckpt_dir) for layout, optimizer in cases]


def check_resumed(result: dict[str, Any], label: str, rtol: float = RTOL) -> None:
    assert result["steps"] == [STEPS] * len(result["steps"]), f"{label}: steps {result['steps']}"
    for how, state in result["resumed"].items():
        for name, straight in result["straight"].items():
            update = straight - result["initial"][name]
            assert_close_rel(state[name] - result["initial"][name], update, rtol, f"{label}, {how}: update of {name}")


TWO_RANKS = [
    ({"ulysses_degree": 2}, "adamw"),
    ({"ulysses_degree": 2}, "sgd"),
    ({"ring_degree": 2, "fsdp": True}, "sgd"),  # a stateless optimizer under FSDP2
    ({"ring_degree": 2, "fsdp": True}, "adamw"),
]


@pytest.mark.timeout(300)
def test_every_save_path_resumes_exactly_on_two_ranks(tmp_path: Path) -> None:
    results = run_distributed(resume_cases, 2, TWO_RANKS, str(tmp_path), init_process_group=False)
    for i, (layout, optimizer) in enumerate(TWO_RANKS):
        for rank in results:
            check_resumed(rank[i], f"{layout} {optimizer}")


@pytest.mark.timeout(240)
def test_every_save_path_resumes_exactly_on_dp2_x_ring2(tmp_path: Path) -> None:
    """Four ranks: gloo sums a gradient element in an order set by its place in DDP's bucket, and a
    restarted DDP's first step uses its initial buckets, not the rebuilt ones of the uninterrupted run.
    That one step rounds differently; where per-rank partial gradients cancel (the AdaLN weights) it
    shows as up to ~1e-4 of the update (measured 9.5e-5 with SGD). Replaying a batch moves it by 1e-2+."""
    for rank in run_distributed(resume_cases, 4, [({"ring_degree": 2}, "sgd")], str(tmp_path), init_process_group=False):
        check_resumed(rank[0], "dp 2 x ring 2 sgd", rtol=3e-4)


def load_into(layout: dict[str, int], checkpoint: str) -> dict[str, torch.Tensor]:
    """Rank body: fit to the checkpoint's own step under another layout (loads, trains nothing)."""
    return weights(fit(layout, "adamw", STOP, resume=checkpoint))


def train_and_save(layout: dict[str, int], path: str) -> None:
    fit(layout, "adamw", STOP).save_checkpoint(path)


@pytest.mark.timeout(240)
def test_checkpoint_loads_under_another_layout(tmp_path: Path) -> None:
    path = str(tmp_path / "ring2.ckpt")
    run_distributed(train_and_save, 2, {"ring_degree": 2}, path, init_process_group=False)
    expected = torch.load(path, weights_only=True)["state_dict"]
    for state in run_distributed(load_into, 4, {"ulysses_degree": 2}, path, init_process_group=False):
        for name, weight in state.items():  # ring 2 -> dp 2 x ulysses 2
            assert weight.equal(expected[f"transformer.{name}"]), name
    single = FlowMatchingModule.load_from_checkpoint(path, map_location="cpu")  # -> one process
    for name, weight in single.transformer.state_dict().items():
        assert weight.equal(expected[f"transformer.{name}"]), name


def accelerate_fit(optimizer: str, max_steps: int, state_dir: str, save_at: int | None = None,
                   resume_at: int | None = None, layout: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Rank body: an Accelerate loop written for one process (``cp.prepare`` for ``accelerator.prepare``)
    under ``layout`` (ring 2 by default) that saves its state at ``save_at``, or loads it and skips the
    consumed batches at ``resume_at``; returns the weights, FSDP2 shards gathered."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from cp_plugin import ParallelConfig
    from cp_plugin.accelerate import ContextParallelPlugin

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(0)
    module = RandomDrawsModule("flux", optimizer)
    schedule = module.configure_optimizers()
    loader = DataLoader(SyntheticFlowData("flux"), batch_size=2, shuffle=True)
    cp = ContextParallelPlugin(ParallelConfig(**(layout or {"ring_degree": 2})))
    model, opt, loader, scheduler = cp.prepare(accelerator, module, schedule["optimizer"], loader,
                                              schedule["lr_scheduler"]["scheduler"])
    step, batches = 0, loader
    if resume_at is not None:
        accelerator.load_state(state_dir)
        step, batches = resume_at, accelerator.skip_first_batches(loader, resume_at)
    while step < max_steps:
        for batch in batches:
            accelerator.backward(model(batch))
            opt.step()
            scheduler.step()
            opt.zero_grad()
            step += 1
            if step == save_at:
                accelerator.save_state(state_dir)
            if step == max_steps:
                break
        batches = loader
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v.detach().clone()
            for k, v in module.transformer.state_dict().items()}


def accelerate_resumes(optimizer: str, state_root: str) -> dict[str, Any]:
    state_dir = str(Path(state_root) / optimizer)
    return {"initial": accelerate_fit(optimizer, 0, state_dir),
            "straight": accelerate_fit(optimizer, STEPS, state_dir, save_at=STOP),
            "resumed": {"save_state / load_state": accelerate_fit(optimizer, STEPS, state_dir, resume_at=STOP)},
            "steps": [STEPS]}


def accelerate_cases(optimizers: list[str], state_root: str) -> list[dict[str, Any]]:
    return [accelerate_resumes(optimizer, state_root) for optimizer in optimizers]


@pytest.mark.timeout(240)
def test_accelerate_save_state_resumes_exactly(tmp_path: Path) -> None:
    optimizers = ["sgd", "adamw"]
    for rank in run_distributed(accelerate_cases, 2, optimizers, str(tmp_path), init_process_group=False):
        for i, optimizer in enumerate(optimizers):
            check_resumed(rank[i], f"Accelerate ring 2 {optimizer}")
