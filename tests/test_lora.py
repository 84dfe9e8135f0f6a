"""LoRA (``recipe/lora.py``): only the adapters train, exactly as on one process, and they reload where diffusers loads them.

A tiny Flux gets rank-4 adapters with ``lora_alpha=8`` (a scale the saved file must carry) through
``transformer.add_adapter``, trains under ``ContextParallelStrategy`` with ring 2 (with DDP, with FSDP2
sharding the frozen base, and, with adapters on its MLPs too, with checkpointing and tiling in chunks of 8
tokens, with DDP and with FSDP2), with ulysses 2 x dp 2 (AdamW, adapters on the MLPs too), and under
``ContextParallelPlugin``, and is compared with the same training on one process: the adapters' updates match,
the frozen base does not move. The adapters saved in diffusers' format load into a fresh base with
``load_lora_adapter`` (what ``pipeline.load_lora_weights`` does for the transformer) and give the trained
model's output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from exact import (
    TEXT_DIM,
    FlowMatchingModule,
    SyntheticFlowData,
    assert_update_close,
    flux_ids,
    quiet_trainer,
    reference_run,
)
from launcher import run_distributed
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

# the benchmarks' adapters: the same rank and scale on the attention's layers and the MLPs' (Flux's single-stream
# inline MLP: proj_mlp, proj_out), which tiling computes in chunks through the adapters' own forwards
from benchmarks.worker import LORA as LORA_WITH_MLPS
from fixtures.models import tiny_flux
from recipe.lora import LoraSettings, add_lora, lora_layers, save_lora

STEPS, PER_RANK = 3, 2
LORA = LoraSettings(rank=4, alpha=8)


class LoraFlow(FlowMatchingModule):
    """Tiny Flux with LoRA adapters (seeded, the same on every rank); the base is frozen."""

    # The MLPs' adapters have gradient entries near 1e-6 of a largest 4e-3 (ff.net.0.proj's lora_B: 2.5e-9 at least):
    # at Adam's eps=1e-6 their fp32 rounding moves a step by 1e-4 of the largest, at 1e-4 by 1e-6.
    adam_eps = 1e-4

    def __init__(self, optimizer: str, settings: LoraSettings = LORA) -> None:
        super().__init__("flux", optimizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            add_lora(self.transformer, settings)
            with torch.no_grad():  # start from non-zero adapters, so the base's gradients are not trivially zero
                for name, weight in self.transformer.named_parameters():
                    if "lora_B" in name:
                        weight.normal_(0, 0.02)


def lora_fit(optimizer: str, layout: dict[str, Any], save_dir: str | None,
             settings: LoraSettings = LORA) -> dict[str, Any]:
    """Rank body: fit ``LoraFlow`` under ``ContextParallelStrategy(**layout)``; rank 0 saves the adapters."""
    from cp_plugin import ContextParallelStrategy

    module = LoraFlow(optimizer, settings)
    before = {k: v.clone() for k, v in module.transformer.state_dict().items()}
    strategy = ContextParallelStrategy(**layout)
    trainer = quiet_trainer(strategy, STEPS)
    trainer.fit(module, DataLoader(SyntheticFlowData("flux"), batch_size=PER_RANK, shuffle=True))
    layers = lora_layers(module.transformer)  # every rank: FSDP2 shards are gathered
    if save_dir is not None and trainer.is_global_zero:
        save_lora(module.transformer, "flux", Path(save_dir), layers)
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.transformer.state_dict().items()}
    return {"losses": module.step_losses, "before": before, "state": state, "dp_size": strategy.dp_size}


def lora_accelerate(optimizer: str, layout: dict[str, int]) -> dict[str, Any]:
    """Rank body: the same training as an Accelerate loop under ``ContextParallelPlugin``."""
    from accelerate import Accelerator

    from cp_plugin.accelerate import ContextParallelPlugin

    accelerator = Accelerator(cpu=True)
    module = LoraFlow(optimizer)
    before = {k: v.clone() for k, v in module.transformer.state_dict().items()}
    cp = ContextParallelPlugin(layout)
    model, opt, loader = cp.prepare(accelerator, module, module.configure_optimizers(),
                                    DataLoader(SyntheticFlowData("flux"), batch_size=PER_RANK))
    losses = []
    for step, batch in enumerate(loader):
        if step == STEPS:
            break
        loss = model(batch)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "before": before, "state": module.transformer.state_dict(), "dp_size": cp.mesh.dp_size}


def lora_fits(cases: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [lora_fit(*case) for case in cases]


def _check(results: list[dict[str, Any]], optimizer: str, what: str, sequential: bool = False,
           settings: LoraSettings = LORA) -> None:
    reference = reference_run("flux", optimizer, results[0]["dp_size"], PER_RANK, STEPS,
                              module=LoraFlow(optimizer, settings), sequential=sequential)
    dp = results[0]["dp_size"]
    # each rank's loss is its dp rank's batch: their mean over dp is the one process's
    losses = torch.tensor([r["losses"] for r in results]).view(dp, len(results) // dp, -1)[:, 0].mean(0)
    assert losses.tolist() == pytest.approx(reference["losses"], rel=1e-5), f"{what}: losses"
    for rank, result in enumerate(results):
        for name, before in result["before"].items():
            after = result["state"][name]
            if "lora_" in name:
                assert_update_close(after, reference["state"][f"transformer.{name}"], before, 1e-5, STEPS,
                                    f"{what} rank {rank}: {name}")
            else:
                assert torch.equal(after, before), f"{what} rank {rank}: frozen {name} moved"


def assert_adapters_reproduce(state: dict[str, torch.Tensor], directory: Path, what: str) -> None:
    """The adapters saved in ``directory`` (diffusers' LoRA format), loaded into a fresh base with
    ``load_lora_adapter`` (what ``pipeline.load_lora_weights`` does for the transformer), give the output of
    the trained model ``state``, and that output is not the base's."""
    trained = tiny_flux()
    add_lora(trained, LORA)
    trained.load_state_dict(state)
    reloaded = tiny_flux()
    reloaded.load_lora_adapter(str(directory), prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 64, 16, generator=g), "timestep": torch.tensor([0.3]),
              "encoder_hidden_states": torch.randn(1, 8, TEXT_DIM, generator=g),
              "pooled_projections": torch.randn(1, TEXT_DIM, generator=g), "img_ids": flux_ids(64),
              "txt_ids": torch.zeros(8, 3)}
    with torch.no_grad():
        want, got, base = trained(**inputs).sample, reloaded(**inputs).sample, tiny_flux()(**inputs).sample
    assert (got - want).abs().max() <= 1e-6 * want.abs().max(), f"{what} give another output"
    assert (base - want).abs().max() > 1e-3 * want.abs().max(), "the adapters change nothing: the test cannot fail"


@pytest.mark.timeout(300)
def test_lora_trains_only_adapters_as_one_process_and_reloads_in_diffusers_format(tmp_path: Path) -> None:
    cases = [("adamw", {"ring_degree": 2, "fsdp": True}, str(tmp_path / "lora"), LORA),
             ("sgd", {"ring_degree": 2}, None, LORA),
             ("sgd", {"ring_degree": 2, "gradient_checkpointing": True, "tile_feed_forward": True, "tile_tokens": 8},
              None, LORA_WITH_MLPS),
             ("sgd", {"ring_degree": 2, "fsdp": True, "gradient_checkpointing": True, "tile_feed_forward": True,
                      "tile_tokens": 8}, None, LORA_WITH_MLPS)]
    results = run_distributed(lora_fits, 2, cases, init_process_group=False)
    for i, (optimizer, layout, _, settings) in enumerate(cases):
        _check([r[i] for r in results], optimizer, f"{optimizer} {layout}", settings=settings)
    assert_adapters_reproduce(results[0][0]["state"], tmp_path / "lora", "reloaded adapters")


@pytest.mark.timeout(300)
def test_lora_under_ulysses_and_dp_matches_one_process() -> None:
    results = run_distributed(lora_fits, 4, [("adamw", {"ulysses_degree": 2}, None, LORA_WITH_MLPS)],
                              init_process_group=False)
    _check([r[0] for r in results], "adamw", "adamw ulysses 2 x dp 2", settings=LORA_WITH_MLPS)


@pytest.mark.timeout(300)
def test_lora_with_accelerate_matches_one_process() -> None:
    results = run_distributed(lora_accelerate, 2, "sgd", {"ulysses_degree": 2}, init_process_group=False)
    _check(results, "sgd", "accelerate sgd ulysses 2", sequential=True)
