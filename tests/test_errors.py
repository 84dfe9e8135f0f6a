"""Bad input fails fast and clearly on every rank: the message names the setting and a fix, no rank hangs."""

from __future__ import annotations

import re
from collections.abc import Callable

import lightning as L
import pytest
import torch
from diffusers import ModelMixin
from exact import FlowMatchingModule, SyntheticFlowData, quiet_trainer
from launcher import run_distributed
from torch.utils.data import DataLoader

from cp_plugin import ContextParallelStrategy
from fixtures.models import tiny_flux


class PlainModule(L.LightningModule):
    """No diffusers model at all (or, with ``blockless``, one without transformer blocks): nothing to make context parallel."""

    def __init__(self, blockless: bool = False) -> None:
        super().__init__()
        self.net = BlocklessModel() if blockless else torch.nn.Linear(4, 4)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch["latents"]).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: L.LightningModule, strategy: ContextParallelStrategy, data: SyntheticFlowData, steps: int = 1) -> None:
    trainer = quiet_trainer(strategy, steps, 2)
    trainer.fit(module, DataLoader(data, batch_size=2))


class RaggedData(SyntheticFlowData):
    """Each rank builds a different sequence length: the ranks of a CP group disagree."""

    def __init__(self) -> None:
        super().__init__("flux", seq_tokens=64 if torch.distributed.get_rank() == 0 else 36)


class DivergingData(SyntheticFlowData):
    """The ranks agree on the first batch; from the second on, rank 1's latents differ (the same shapes).

    A batch of shapes already verified is compared on the device and read by the step's guard, with
    the loss and gradient checks: every rank raises there, before the optimizer step.
    """

    def __init__(self) -> None:
        super().__init__("flux")
        self.served = 0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.served += 1
        item = super().__getitem__(i)
        if self.served > 2 and torch.distributed.get_rank() == 1:  # batch_size=2: from the second batch on
            item["latents"] = item["latents"] + 1
        return item


class BlocklessModel(ModelMixin):
    """A diffusers model with neither a ``_cp_plan`` nor a list of attention blocks to derive one from."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class NaNOnRankOne(FlowMatchingModule):
    """Rank 1's loss turns NaN at step 1 (plain data parallelism, so only that rank sees it)."""

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = super().loss(batch)
        bad = self.global_rank == 1 and self.trainer.global_step == 1
        return loss * float("nan") if bad else loss


def applied_twice() -> None:
    from cp_plugin import ParallelConfig, ParallelMesh
    from cp_plugin.model import apply_context_parallel

    mesh = ParallelMesh.build(ParallelConfig(ulysses_degree=2), "cpu")
    module = FlowMatchingModule()
    apply_context_parallel(module, mesh)
    apply_context_parallel(module, mesh)


def three_head_flux() -> FlowMatchingModule:
    module = FlowMatchingModule("flux")
    module.transformer = tiny_flux(num_attention_heads=3)
    return module


CASES: dict[str, Callable[[], None]] = {
    "degrees": lambda: fit(FlowMatchingModule(), ContextParallelStrategy(ring_degree=3), SyntheticFlowData("flux")),
    "heads": lambda: fit(three_head_flux(), ContextParallelStrategy(ulysses_degree=2), SyntheticFlowData("flux")),
    "no_plan": lambda: fit(PlainModule(), ContextParallelStrategy(ulysses_degree=2), SyntheticFlowData("flux")),
    "underivable": lambda: fit(PlainModule(blockless=True), ContextParallelStrategy(ring_degree=2), SyntheticFlowData("flux")),
    "ragged": lambda: fit(FlowMatchingModule(), ContextParallelStrategy(ulysses_degree=2), RaggedData()),
    "diverged": lambda: fit(FlowMatchingModule(), ContextParallelStrategy(ring_degree=2), DivergingData(), steps=3),
    "mismatch": lambda: fit(
        FlowMatchingModule(),
        ContextParallelStrategy(**({"ring_degree": 2} if torch.distributed.get_rank() == 0 else {"ulysses_degree": 2})),
        SyntheticFlowData("flux"),
    ),
    "twice": applied_twice,
    "nonfinite": lambda: fit(NaNOnRankOne(), ContextParallelStrategy(), SyntheticFlowData("flux"), steps=3),
    "skip": lambda: fit(NaNOnRankOne(), ContextParallelStrategy(on_nonfinite="skip"), SyntheticFlowData("flux"), steps=3),
    "rotate": lambda: ContextParallelStrategy(ring_degree=2, rotate_method="alltoall"),
    "nonfinite_option": lambda: ContextParallelStrategy(on_nonfinite="ignore"),
}

EXPECTED = {
    "degrees": r"ValueError: ring_degree=3 x ulysses_degree=1 = 3 does not divide world_size=2; use degrees whose product is 1 or 2",
    "heads": r"ulysses_degree=2 does not divide num_attention_heads=3 of FluxTransformer2DModel \('transformer'.*use ulysses_degree 1 or 3",
    "no_plan": r"PlainModule contains no diffusers model, so nothing can be made context parallel; pass cp_plan=",
    "underivable": r"BlocklessModel \('net'\) has no _cp_plan and no list of transformer blocks with attention among its "
                   r"children, so no plan can be derived; pass cp_plan=.*'<block list>.0'.*'proj_out'",
    "ragged": r"ranks of context-parallel group \[0, 1\] received different batches",
    "diverged": r"ValueError: the ranks of context-parallel group \[0, 1\] received different batches",
    "mismatch": r"ranks \[1\] were started with different settings than rank 0 .*ring_degree=2.*ulysses_degree=2",
    "twice": r"RuntimeError: context parallelism is already applied to FluxTransformer2DModel \('transformer'\)",
    "nonfinite": r"FloatingPointError: non-finite gradients at step 1, rank [01]: (this rank's|another rank's) loss",
    "skip": r"^no error$",  # on_nonfinite="skip": the NaN step is dropped on every rank and training goes on
    "rotate": r"rotate_method='alltoall' is not supported; use one of 'p2p', 'allgather'",
    "nonfinite_option": r"on_nonfinite='ignore' is not supported; use 'raise' or 'skip'",
}


def collect_errors(names: list[str]) -> dict[str, str]:
    """Run each bad case on this rank and return its error message (every rank must raise)."""
    messages = {}
    for name in names:
        try:
            CASES[name]()
        except (ValueError, RuntimeError, FloatingPointError) as err:
            messages[name] = f"{type(err).__name__}: {err}"
        else:
            messages[name] = "no error"
    return messages


@pytest.mark.timeout(120)
def test_bad_configs_raise_on_every_rank_with_the_setting_and_a_fix() -> None:
    results = run_distributed(collect_errors, 2, list(CASES), init_process_group=False, pg_timeout_s=30)
    for rank, messages in enumerate(results):
        for name, pattern in EXPECTED.items():
            assert re.search(pattern, messages[name]), (rank, name, messages[name])
    # a non-finite loss is named by the rank that produced it; its peer names the other rank
    assert "step 1, rank 1: this rank's loss was not finite" in results[1]["nonfinite"]
    assert "step 1, rank 0: another rank's loss was not" in results[0]["nonfinite"]
