"""Sharded checkpoints (issue 17): each rank writes its own shards with DCP, and any layout resumes from them.

A run under FSDP2 x ring 2 saves mid-epoch into a directory (the default under FSDP2); runs under
ring 2 x ulysses 2 on four ranks, FSDP2 and DDP, resume from it (and FSDP2 from a DDP run's sharded save) and must end where the uninterrupted
run ends, compared by updates (weights after minus before: a replayed or skipped batch, a lost
optimizer state or LR schedule moves them by 1e-2 and more). The dp degree is the same (1), so RNG
streams and the data position carry over. The directory must hold no full copy, a half-written one
must be recognised, ``python -m cp_plugin.convert`` must give a folder ``from_pretrained`` loads, and
Accelerate's ``save_state`` / ``load_state`` must resume FSDP2 runs exactly too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from exact import FlowMatchingModule, SyntheticFlowData, assert_update_close, quiet_trainer
from launcher import run_distributed
from lightning.pytorch.callbacks import Callback
from test_resume import STEPS, STOP, RandomDrawsModule, accelerate_fit, weights
from torch.utils.data import DataLoader

from cp_plugin import ContextParallelStrategy

RTOL = 2e-5  # of the update over STEPS steps (test_resume's bound)
OPTIMIZERS = ("sgd", "adamw")
SAVED = {"ring_degree": 2, "fsdp": True}
RESUMED = {"FSDP2 ring 2 x ulysses 2": {"ring_degree": 2, "ulysses_degree": 2, "fsdp": True},
           "DDP ring 2 x ulysses 2": {"ring_degree": 2, "ulysses_degree": 2}}


class SaveWeightsAt(Callback):
    """``trainer.save_checkpoint`` at the end of a step, keeping the full weights it saved."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path, self.saved = step, path, None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            self.saved = weights(trainer)


def fit(layout: dict[str, Any], optimizer: str, max_steps: int, callbacks: list[Callback] = (),
        resume: str | None = None) -> L.Trainer:
    """test_resume's run, without Lightning's default ModelCheckpoint (callbacks save where they are told)."""
    L.seed_everything(0, verbose=False)
    module = RandomDrawsModule("flux", optimizer)
    trainer = quiet_trainer(ContextParallelStrategy(**layout), max_steps, callbacks=list(callbacks))
    trainer.fit(module, DataLoader(SyntheticFlowData("flux"), batch_size=2, shuffle=True), ckpt_path=resume)
    return trainer


def save_sharded(root: str) -> dict[str, Any]:
    """Rank body (2 ranks): the uninterrupted runs, each saving a sharded checkpoint at ``STOP``."""
    runs = {}
    for optimizer in OPTIMIZERS:
        save = SaveWeightsAt(STOP, Path(root) / f"{optimizer}.ckpt")
        straight = fit(SAVED, optimizer, STEPS, [save])
        runs[optimizer] = {"straight": weights(straight), "at_stop": save.saved}
    # DDP can save sharded too (each replica's tensors written once, by one rank); FSDP2 resumes from it below.
    save = SaveWeightsAt(STOP, Path(root) / "ddp_adamw.ckpt")
    runs["ddp adamw"] = {"straight": weights(fit({"ring_degree": 2, "save_distributed_checkpoint": True}, "adamw",
                                                 STEPS, [save]))}
    return runs


def resume_sharded(root: str) -> dict[str, Any]:
    """Rank body (4 ranks): resume each checkpoint under every layout of ``RESUMED``."""
    runs = {}
    for label, layout in RESUMED.items():
        for optimizer in OPTIMIZERS:
            trainer = fit(layout, optimizer, STEPS, resume=str(Path(root) / f"{optimizer}.ckpt"))
            runs[label, optimizer] = {"state": weights(trainer), "step": trainer.global_step}
    trainer = fit(RESUMED["FSDP2 ring 2 x ulysses 2"], "adamw", STEPS, resume=str(Path(root) / "ddp_adamw.ckpt"))
    runs["FSDP2 ring 2 x ulysses 2 from DDP", "ddp adamw"] = {"state": weights(trainer), "step": trainer.global_step}
    # dp 2 x ring 2: another dp degree loads the weights (RNG and data restart from the seed; nothing trains here)
    loaded = fit({"ring_degree": 2, "fsdp": True}, "adamw", STOP, resume=str(Path(root) / "adamw.ckpt"))
    return {"runs": runs, "dp2 loaded": weights(loaded)}


@pytest.mark.timeout(300)
def test_sharded_save_resumes_exactly_under_other_layouts_and_converts(tmp_path: Path) -> None:
    from cp_plugin.checkpoint import check_complete, is_complete

    saved = run_distributed(save_sharded, 2, str(tmp_path), init_process_group=False)[0]
    initial = FlowMatchingModule("flux").transformer.state_dict()
    model_bytes = sum(v.numel() * v.element_size() for v in initial.values())

    for optimizer in OPTIMIZERS:  # a directory of per-rank shards, none of them a full copy
        path = tmp_path / f"{optimizer}.ckpt"
        assert path.is_dir() and is_complete(path), optimizer
        shards = sorted(path.glob("*.distcp"))
        total = sum(f.stat().st_size for f in shards)
        assert len(shards) == 2, [f.name for f in shards]
        for shard in shards:
            assert shard.stat().st_size < 0.65 * total, f"{optimizer}: {shard.name} holds most of the checkpoint"
            assert shard.stat().st_size < 0.75 * model_bytes * (3 if optimizer == "adamw" else 1), shard.name
        assert (path / "meta.pt").stat().st_size < model_bytes / 10  # loops, RNG, schedulers: no tensors of the model

    resumed = run_distributed(resume_sharded, 4, str(tmp_path), init_process_group=False)
    for rank in resumed:
        for name, value in rank["dp2 loaded"].items():
            assert value.equal(saved["adamw"]["at_stop"][name]), f"dp 2 x ring 2 loaded {name}"
        for (label, optimizer), run in rank["runs"].items():
            assert run["step"] == STEPS, f"{label} {optimizer}: step {run['step']}"
            for name, after in saved[optimizer]["straight"].items():
                assert_update_close(run["state"][name], after, initial[name], RTOL, STEPS,
                                    f"{label} {optimizer} resumed from ring 2: {name}")

    # An interrupted save: shards written, DCP's .metadata (written last) missing.
    half = tmp_path / "half.ckpt"
    shutil.copytree(tmp_path / "adamw.ckpt", half)
    (half / ".metadata").unlink()
    assert not is_complete(half)
    with pytest.raises(ValueError, match="incomplete"):
        check_complete(half)
    truncated = tmp_path / "truncated.ckpt"  # a one-file checkpoint cut short
    one_file = tmp_path / "one.ckpt"
    torch.save({"w": torch.ones(1000)}, one_file)
    truncated.write_bytes(one_file.read_bytes()[:2000])
    assert is_complete(one_file) and not is_complete(truncated) and not is_complete(tmp_path / "missing")

    # convert: a diffusers folder with the weights saved at STOP.
    out = tmp_path / "converted"
    subprocess.run([sys.executable, "-m", "cp_plugin.convert", str(tmp_path / "adamw.ckpt"), str(out)], check=True,
                   capture_output=True)
    from diffusers import FluxTransformer2DModel

    loaded = FluxTransformer2DModel.from_pretrained(out / "transformer")
    for name, value in loaded.state_dict().items():
        assert value.equal(saved["adamw"]["at_stop"][name]), name


def accelerate_resumes(state_root: str) -> dict[str, Any]:
    layout = {"ring_degree": 2, "fsdp": True}
    runs = {}
    for optimizer in OPTIMIZERS:
        state_dir = str(Path(state_root) / optimizer)
        straight = accelerate_fit(optimizer, STEPS, state_dir, save_at=STOP, layout=layout)
        runs[optimizer] = {"straight": straight,
                           "resumed": accelerate_fit(optimizer, STEPS, state_dir, resume_at=STOP, layout=layout)}
    return runs


@pytest.mark.timeout(240)
def test_accelerate_save_state_under_fsdp_is_sharded_and_resumes_exactly(tmp_path: Path) -> None:
    from cp_plugin.checkpoint import is_complete

    initial = FlowMatchingModule("flux").transformer.state_dict()
    for rank in run_distributed(accelerate_resumes, 2, str(tmp_path), init_process_group=False):
        for optimizer, run in rank.items():
            for name, after in run["straight"].items():
                assert_update_close(run["resumed"][name], after, initial[name], RTOL, STEPS,
                                    f"Accelerate FSDP2 ring 2 {optimizer} save_state / load_state: {name}")
    for optimizer in OPTIMIZERS:
        sharded = tmp_path / optimizer / "sharded"
        assert is_complete(sharded) and len(list(sharded.glob("*.distcp"))) == 2
        assert not list((tmp_path / optimizer).glob("optimizer*.bin"))  # no rank-0-only optimizer file


def lora_save(path: str) -> dict[str, torch.Tensor]:
    """Rank body (2 ranks): train LoRA adapters on a frozen, FSDP2-sharded tiny Flux and save sharded after fit."""
    from test_lora import LoraFlow

    module = LoraFlow("adamw")
    trainer = quiet_trainer(ContextParallelStrategy(ring_degree=2, fsdp=True), 2)
    trainer.fit(module, DataLoader(SyntheticFlowData("flux"), batch_size=2, shuffle=True))
    trainer.save_checkpoint(path)
    return weights(trainer)


@pytest.mark.timeout(200)
def test_convert_writes_lora_adapters_that_diffusers_loads(tmp_path: Path) -> None:
    from test_lora import assert_adapters_reproduce

    from cp_plugin.convert import convert

    path = tmp_path / "lora.ckpt"
    state = run_distributed(lora_save, 2, str(path), init_process_group=False)[0]
    written = convert(path, tmp_path / "out")
    assert sorted(p.name for p in written["transformer"].iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert_adapters_reproduce(state, written["transformer"], "converted adapters")


def one_file_saves(root: str) -> dict[str, dict[str, torch.Tensor]]:
    """Rank body (2 ranks, DDP, ring 2): a full and a LoRA training, each saved as one file after fit."""
    from test_lora import LoraFlow

    saved = {}
    for name, module in (("full", FlowMatchingModule("flux")), ("lora", LoraFlow("adamw"))):
        trainer = quiet_trainer(ContextParallelStrategy(ring_degree=2), 2)
        trainer.fit(module, DataLoader(SyntheticFlowData("flux"), batch_size=2, shuffle=True))
        trainer.save_checkpoint(str(Path(root) / f"{name}.ckpt"))
        saved[name] = weights(trainer)
    return saved


@pytest.mark.timeout(240)
def test_convert_reads_one_file_checkpoints_of_full_and_lora_runs(tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel
    from test_lora import assert_adapters_reproduce

    from cp_plugin.convert import convert

    saved = run_distributed(one_file_saves, 2, str(tmp_path), init_process_group=False)[0]
    assert (tmp_path / "full.ckpt").is_file(), "DDP runs write one file"
    full = convert(tmp_path / "full.ckpt", tmp_path / "full")["transformer"]
    for name, value in FluxTransformer2DModel.from_pretrained(full).state_dict().items():
        assert value.equal(saved["full"][name]), name
    lora = convert(tmp_path / "lora.ckpt", tmp_path / "lora")["transformer"]
    assert sorted(p.name for p in lora.iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert_adapters_reproduce(saved["lora"], lora, "adapters converted from one file")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="records no diffusers model .*'diffusers_models' entry"):
        convert(tmp_path / "foreign.ckpt", tmp_path / "foreign")
