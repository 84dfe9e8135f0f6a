"""FSDP2 over dp x ring (``ParallelConfig(fsdp=True)``) trains exactly as one process, and its checkpoints are one process's.

Real gloo processes, the unchanged single-process ``FlowMatchingModule`` (``tests/exact.py``) and the
same reference: one process trained on the global batches of the dp ranks. All 4-rank runs share
one launch (process start-up dominates on 2 cores).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from exact import (
    FlowMatchingModule,
    SyntheticFlowData,
    assert_close_rel,
    assert_update_close,
    global_batches,
    reference_run,
)
from launcher import run_distributed
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

STEPS, PER_RANK, WORLD = 3, 2, 4
LAYOUT = {"ring_degree": 2, "fsdp": True}  # 4 ranks: dp 2 x ring 2, everything sharded 4 ways
# bf16-mixed AdamW against one process under the same autocast. Measured: first-step gradients within
# 1.1e-2 of the largest entry; updates (after minus before, 3 steps at lr 3e-4) within 2.9e-2 in norm per
# tensor (entry by entry they differ by up to 0.64 of the largest: AdamW's first steps are ~lr * sign(grad),
# and entries whose gradient is at bf16's rounding noise flip sign). A skipped step moves them by 0.52.
BF16_GRAD_RTOL, BF16_UPDATE_RTOL = 3e-2, 0.1


def trainer(max_steps: int, devices: int, strategy: Any = "auto", callbacks: list | None = None, **kwargs: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
                     callbacks=callbacks, enable_checkpointing=bool(callbacks), enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a DTensor's shards (a collective), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class ValidatedModule(FlowMatchingModule):
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch), sync_dist=True)


def fit_then_validate() -> list[float]:
    """Rank body: one sharded step with validation in the fit, then ``trainer.validate`` on the sharded model."""
    from cp_plugin import ContextParallelStrategy

    module, data = ValidatedModule("flux", "sgd"), DataLoader(SyntheticFlowData("flux", size=4), batch_size=PER_RANK)
    run = trainer(1, int(os.environ["LOCAL_WORLD_SIZE"]), ContextParallelStrategy(**LAYOUT))
    run.fit(module, data, data)
    return [float(run.callback_metrics["val_loss"]), run.validate(module, data, verbose=False)[0]["val_loss"]]


def fit(optimizer: str, max_steps: int = STEPS, save_to: str | None = None, resume: str | None = None,
        **trainer_kwargs: Any) -> dict[str, Any]:
    """Rank body: fit under FSDP2 x ring 2, optionally resumed and/or saved mid-epoch after ``max_steps``.

    Returns the full weights, the first step's gradients, and how the parameters were sharded.
    """
    from cp_plugin import ContextParallelStrategy

    module = FlowMatchingModule("flux", optimizer)
    save = [ModelCheckpoint(Path(save_to).parent, Path(save_to).stem, every_n_train_steps=max_steps)] if save_to else None
    # The one-file layout (sharded directories are the default under FSDP2: tests/test_sharded_checkpoint.py).
    strategy = ContextParallelStrategy(**LAYOUT, save_distributed_checkpoint=False)
    run = trainer(max_steps, int(os.environ["LOCAL_WORLD_SIZE"]), strategy, save, **trainer_kwargs)
    run.fit(module, DataLoader(SyntheticFlowData("flux"), batch_size=PER_RANK, shuffle=True), ckpt_path=resume)
    params = list(module.parameters())
    return {
        "state": {name: full(value) for name, value in module.transformer.state_dict().items()},
        "grads": {name: full(grad) for name, grad in (module.first_grads or {}).items()},
        "sharded": all(isinstance(p, DTensor) and p.device_mesh.size() == WORLD for p in params),
        "local_numel": sum(p.to_local().numel() for p in params),
        "numel": sum(p.numel() for p in params),
    }


def fits(cases: list[dict[str, Any]]) -> list[Any]:
    return [fit(**case) for case in cases] + [fit_then_validate()]


def check_weights(result: dict[str, Any], reference: dict[str, Any], rtol: float, what: str) -> None:
    for name, expected in reference["state"].items():
        assert_close_rel(result["state"][name], expected, rtol, f"{what}: weight {name}")


@pytest.mark.timeout(150)
def test_fsdp_ring_matches_one_process_and_checkpoints_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "fsdp.ckpt")
    cases = [
        {"optimizer": "sgd"},
        {"optimizer": "adamw", "save_to": path},
        {"optimizer": "adamw", "max_steps": STEPS + 1, "resume": path},  # the sharded run continues from it
        {"optimizer": "sgd", "gradient_clip_val": 0.05, "accumulate_grad_batches": 2},  # DTensor norms, 2 micro-steps
        {"optimizer": "adamw", "precision": "bf16-mixed"},
    ]
    results = run_distributed(fits, WORLD, cases, init_process_group=False)
    sgd, adamw, resumed, clipped, bf16, validated = ([r[i] for r in results] for i in range(len(cases) + 1))
    dp = WORLD // LAYOUT["ring_degree"]

    for r in sgd:  # every parameter is a DTensor sharded over all 4 ranks
        assert r["sharded"] and r["local_numel"] <= r["numel"] / WORLD * 1.1
    for runs, optimizer in ((sgd, "sgd"), (adamw, "adamw")):
        reference = reference_run("flux", optimizer, dp, PER_RANK, STEPS)
        for r in runs:
            check_weights(r, reference, 1e-5, f"fsdp {optimizer}")
            for name, expected in reference["grads"].items():
                assert_close_rel(r["grads"][name], expected, 1e-4, f"fsdp {optimizer}: first-step grad {name}")
    reference = reference_run("flux", "sgd", dp, PER_RANK, STEPS, clip=0.05, accumulate=2)
    for r in clipped:
        check_weights(r, reference, 1e-5, "fsdp sgd, clip 0.05, accumulate 2")
    reference = reference_run("flux", "adamw", dp, PER_RANK, STEPS, bf16=True)
    before = FlowMatchingModule("flux").transformer.state_dict()
    for r in bf16:  # autocast rounds attention and matmuls differently when the sequence is split
        for name, expected in reference["grads"].items():
            assert_close_rel(r["grads"][name], expected, BF16_GRAD_RTOL, f"fsdp adamw bf16-mixed: first-step grad {name}")
        for name, after in reference["state"].items():
            assert_update_close(r["state"][name], after, before[name], BF16_UPDATE_RTOL, STEPS,
                                f"fsdp adamw bf16-mixed: {name}", norm=True)

    for in_fit, afterwards in validated:  # validation runs on the sharded weights, in and after fit
        assert in_fit == afterwards and in_fit == validated[0][0]

    # The file rank 0 wrote is a one-process checkpoint (full weights, plain optimizer state) plus every rank's RNG.
    checkpoint = torch.load(path, weights_only=True)
    assert isinstance(checkpoint["optimizer_states"][0]["state"][0]["exp_avg"], torch.Tensor)
    assert len(checkpoint["cp_plugin"]["rng_states"]) == WORLD
    restored = FlowMatchingModule.load_from_checkpoint(path, map_location="cpu")
    for name, value in restored.transformer.state_dict().items():
        assert value.equal(adamw[0]["state"][name]), name

    # Continuing one step from it, in one process and in the sharded run, is the uninterrupted 4-step run.
    longer = reference_run("flux", "adamw", dp, PER_RANK, STEPS + 1)
    next_batch = global_batches(SyntheticFlowData("flux"), dp, PER_RANK, STEPS + 1)[-1]
    samples = [{key: value[i] for key, value in next_batch.items()} for i in range(dp * PER_RANK)]
    # A plain one-process Trainer takes the file as it is (the data position lives in cp_plugin's own entry).
    restored = FlowMatchingModule("flux", "adamw")
    trainer(STEPS + 1, 1).fit(restored, DataLoader(samples, batch_size=len(samples)), ckpt_path=path)
    check_weights({"state": restored.transformer.state_dict()}, longer, 1e-5, "one process resumed from fsdp")
    for r in resumed:
        check_weights(r, longer, 1e-5, "fsdp resumed from fsdp")


def nonfinite_shard_seen_by_all(bad_rank: int) -> bool:
    """Rank body: a NaN in one rank's gradient shard makes ``gradients_finite`` false on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from cp_plugin.guard import gradients_finite

    layer = torch.nn.Linear(8, 8)
    fully_shard(layer, mesh=init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.ones(2, 8)).sum().backward()
    assert gradients_finite(optimizer)
    if torch.distributed.get_rank() == bad_rank:
        layer.weight.grad.to_local()[0, 0] = float("nan")
    return gradients_finite(optimizer)


@pytest.mark.timeout(60)
def test_nonfinite_guard_sees_every_shard() -> None:
    assert run_distributed(nonfinite_shard_seen_by_all, 2, 1) == [False, False]


def fsdp_misuse(cases: list[str]) -> dict[str, tuple[str, bool]]:
    """Rank body: each unsupported combination's error, and whether a process group existed by then."""
    from lightning.pytorch.plugins import MixedPrecision

    from cp_plugin import ContextParallelStrategy

    setups = {
        "ddp_option": ({"find_unused_parameters": True}, {}),
        "grad_scaler": ({}, {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}),
    }
    errors = {}
    for name in cases:
        strategy_kwargs, trainer_kwargs = setups[name]
        strategy = ContextParallelStrategy(ulysses_degree=2, fsdp=True, **strategy_kwargs)
        try:
            trainer(1, 2, strategy, **trainer_kwargs).fit(FlowMatchingModule(), DataLoader(SyntheticFlowData("flux")))
            errors[name] = ("no error", torch.distributed.is_initialized())
        except ValueError as err:
            errors[name] = (str(err), torch.distributed.is_initialized())
    return errors


@pytest.mark.timeout(60)
def test_unsupported_combinations_fail_before_any_collective() -> None:
    expected = {
        "ddp_option": r"fsdp=True\) shards the model with FSDP2 instead of wrapping it in DDP, so the DDP options "
        r"\['find_unused_parameters'\] do not apply; remove them or set fsdp=False",
        "grad_scaler": r"gradient scaler \(precision='16-mixed'\).*use precision='bf16-mixed'",
    }
    for errors in run_distributed(fsdp_misuse, 2, list(expected), init_process_group=False):
        for name, pattern in expected.items():
            message, process_group = errors[name]
            assert re.search(pattern, message) and not process_group, (name, message)


def test_unsupported_launch_is_named() -> None:
    from cp_plugin import ParallelConfig
    from cp_plugin.fsdp import check_compatible

    with pytest.raises(ValueError, match=r"start_method='spawn'\); launch with torchrun"):
        check_compatible({}, "spawn", grad_scaler=False)
    with pytest.raises(ValueError, match=r"fsdp='yes' must be True or False"):
        ParallelConfig(fsdp="yes")
