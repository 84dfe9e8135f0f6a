"""Bad input fails fast and clearly on every rank: the message names the setting and a fix, no rank hangs."""

from __future__ import annotations

import re
from collections.abc import Callable

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cp_plugin import ContextParallelStrategy
from cp_plugin.recipes.models import tiny_flux
from exact import FlowMatchingModule, SyntheticFlowData
from launcher import run_distributed


class PlainModule(L.LightningModule):
    """No diffusers model at all: nothing can be made context parallel."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 4)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch["latents"]).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: L.LightningModule, strategy: ContextParallelStrategy, data: SyntheticFlowData) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=2))


def three_head_flux() -> FlowMatchingModule:
    module = FlowMatchingModule("flux")
    module.transformer = tiny_flux(num_attention_heads=3)
    return module


CASES: dict[str, Callable[[], None]] = {
    "degrees": lambda: fit(FlowMatchingModule(), ContextParallelStrategy(ring_degree=3), SyntheticFlowData("flux")),
    "heads": lambda: fit(three_head_flux(), ContextParallelStrategy(ulysses_degree=2), SyntheticFlowData("flux")),
    "sequence": lambda: fit(
        FlowMatchingModule(), ContextParallelStrategy(ulysses_degree=2), SyntheticFlowData("flux", seq_tokens=49)
    ),
    "no_plan": lambda: fit(PlainModule(), ContextParallelStrategy(ulysses_degree=2), SyntheticFlowData("flux")),
}

EXPECTED = {
    "degrees": r"ring_degree=3 x ulysses_degree=1 = 3 does not divide world_size=2; use degrees whose product is 1 or 2",
    "heads": r"ulysses_degree=2 does not divide num_attention_heads=3 of FluxTransformer2DModel \('transformer'.*use ulysses_degree 1 or 3",
    "sequence": r"sequence length 49 .* is not divisible by the context-parallel size 2 .*e\.g\. 50",
    "no_plan": r"PlainModule has no diffusers model with a _cp_plan \(no diffusers models\).*pass cp_plan=",
}


def collect_errors(names: list[str]) -> dict[str, str]:
    """Run each bad case on this rank and return its error message (every rank must raise)."""
    messages = {}
    for name in names:
        try:
            CASES[name]()
        except (ValueError, RuntimeError) as err:
            messages[name] = f"{type(err).__name__}: {err}"
        else:
            messages[name] = "no error"
    return messages


@pytest.mark.timeout(120)
def test_bad_configs_raise_on_every_rank_with_the_setting_and_a_fix() -> None:
    results = run_distributed(collect_errors, 2, list(CASES), init_process_group=False, pg_timeout_s=30)
    for rank, messages in enumerate(results):
        for name, pattern in EXPECTED.items():
            assert messages[name].startswith("ValueError"), (rank, name, messages[name])
            assert re.search(pattern, messages[name]), (rank, name, messages[name])
