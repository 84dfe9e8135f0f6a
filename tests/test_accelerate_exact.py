"""ContextParallelPlugin: an Accelerate loop written for one process trains exactly as one process.

Ranks get torchrun's environment (``tests/launcher.py``), as ``torchrun`` gives them; one test runs
``examples/train_accelerate.py`` under ``torchrun`` itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from exact import FlowMatchingModule, SyntheticFlowData, assert_close_rel, grads_of, lightning_run, reference_run
from launcher import run_distributed
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

STEPS, PER_RANK = 3, 2
ROOT = Path(__file__).resolve().parents[1]


def accelerate_run(
    kind: str, optimizer: str, layout: dict[str, Any], accumulate: int = 1, order: list[int] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rank body: the loop an Accelerate user writes for one process, plus ``cp.prepare``."""
    from accelerate import Accelerator

    from cp_plugin import ParallelConfig
    from cp_plugin.accelerate import ContextParallelPlugin

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    module = FlowMatchingModule(kind, optimizer)
    opt = module.configure_optimizers()
    loader = DataLoader(SyntheticFlowData(kind, **(data or {})), batch_size=PER_RANK, sampler=order)  # None: sequential
    cp = ContextParallelPlugin(ParallelConfig(**layout))
    model, opt, loader = cp.prepare(accelerator, module, opt, loader)
    losses, first_grads, gathered_t = [], None, []
    for i, batch in enumerate(loader):
        if i == STEPS * accumulate:
            break
        with accelerator.accumulate(model):
            loss = model(batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and first_grads is None:
                first_grads = grads_of(module.transformer)
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
        gathered_t.append(accelerator.gather_for_metrics(batch["t"]))
    saved_sharded = False
    if layout.get("fsdp"):  # FSDP2-sharded models: save_state writes each rank's shards with DCP
        from cp_plugin.checkpoint import is_complete

        state_dir = Path(tempfile.gettempdir()) / f"cp_plugin_state_{os.environ['MASTER_PORT']}"
        saved_sharded = is_complete(Path(accelerator.save_state(str(state_dir))) / "sharded")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(state_dir)
    from dits_exact import memory_options_on

    return {"losses": losses, "grads": _full(first_grads), "state": _full(module.transformer.state_dict()),
            "memory": memory_options_on(module.transformer),
            "saved_sharded": saved_sharded,
            "gathered_t": torch.cat(gathered_t), "dp_rank": cp.mesh.dp_rank,
            "sharded": all(isinstance(p, DTensor) for p in module.parameters())}


def _full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors from FSDP2's sharded ones (DTensor), others as they are."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def accelerate_runs(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [accelerate_run(**c) for c in cases]


def check(
    results: list[dict[str, Any]], kind: str, optimizer: str, layout: dict[str, int], accumulate: int = 1,
    data: dict[str, Any] | None = None,
) -> None:
    cp = layout.get("ring_degree", 1) * layout.get("ulysses_degree", 1)
    dp = len(results) // cp
    reference = reference_run(kind, optimizer, dp, PER_RANK, STEPS, accumulate=accumulate, sequential=True, data_kwargs=data)
    label = f"{kind} {layout} {optimizer} accumulate={accumulate}"
    losses = torch.tensor([r["losses"] for r in results]).view(dp, cp, -1)[:, 0].mean(0)
    assert_close_rel(losses, torch.tensor(reference["losses"]), 1e-5, f"{label} loss")
    for r in results:
        assert r["sharded"] == r["saved_sharded"] == layout.get("fsdp", False), f"{label}: FSDP2 sharding, save_state"
        # tiling's default ("auto") hooks the networks it would take at long sequences
        asked = {"gradient_checkpointing": bool(layout.get("gradient_checkpointing")),
                 "tile_feed_forward": layout.get("tile_feed_forward", "auto") is not False}
        assert r["memory"] == asked, f"{label}: memory options on while training"
        for name, expected in reference["grads"].items():
            assert_close_rel(r["grads"][name], expected, 1e-4, f"{label} grad {name}")
        for name, expected in reference["state"].items():
            assert_close_rel(r["state"][name], expected, 1e-5, f"{label} weight {name}")
    # gather_for_metrics: every sample of the global batches once, in order, on every rank
    expected_t = SyntheticFlowData(kind, **(data or {})).t[: STEPS * accumulate * dp * PER_RANK]
    for r in results:
        assert r["gathered_t"].equal(expected_t), label


TWO = [
    {"kind": "flux", "optimizer": "adamw", "layout": {"ulysses_degree": 2}},
    {"kind": "flux", "optimizer": "sgd", "layout": {"ring_degree": 2}, "accumulate": 2},
    {"kind": "wan", "optimizer": "adamw", "layout": {"ring_degree": 2}},
    {"kind": "flux", "optimizer": "sgd", "layout": {"ulysses_degree": 2, "fsdp": True}, "accumulate": 2},
    # QwenImage leaves its last text branch unused: no DDP option needed (the plugin's static graph)
    {"kind": "qwenimage", "optimizer": "adamw", "layout": {"ring_degree": 2}, "accumulate": 2},
    # memory options as ParallelConfig fields, with FSDP2 sharding the checkpointed, tiled blocks
    {"kind": "wan", "optimizer": "sgd", "layout": {"ring_degree": 2, "fsdp": True, "gradient_checkpointing": True,
                                                   "tile_feed_forward": True, "tile_tokens": 8}},
]
FOUR = [
    {"kind": "flux", "optimizer": "adamw", "layout": {"ring_degree": 2}},  # dp 2 x ring 2
    {"kind": "flux", "optimizer": "sgd", "layout": {"ring_degree": 2, "ulysses_degree": 2}},
    {"kind": "flux", "optimizer": "sgd", "layout": {"ring_degree": 2}, "data": {"seq_tokens": 1001}},  # padded
    {"kind": "flux", "optimizer": "adamw", "layout": {"ring_degree": 2, "fsdp": True}},  # FSDP2 over dp 2 x ring 2
]


@pytest.mark.timeout(300)
def test_two_processes_match_one_process() -> None:
    results = run_distributed(accelerate_runs, 2, TWO, init_process_group=False)
    for i, spec in enumerate(TWO):
        check([r[i] for r in results], **spec)


@pytest.mark.timeout(300)
def test_four_processes_match_one_process() -> None:
    results = run_distributed(accelerate_runs, 4, FOUR, init_process_group=False)
    for i, spec in enumerate(FOUR):
        check([r[i] for r in results], **spec)


def lightning_and_accelerate() -> tuple[dict[str, Any], dict[str, Any]]:
    lightning = lightning_run("flux", "adamw", {"ring_degree": 2}, PER_RANK, STEPS)
    # Lightning always shuffles training data with DistributedSampler(seed=0): feed Accelerate that order
    order = list(DistributedSampler(SyntheticFlowData("flux"), num_replicas=1, rank=0, shuffle=True, seed=0))
    return lightning, accelerate_run("flux", "adamw", {"ring_degree": 2}, order=order)


@pytest.mark.timeout(300)
def test_lightning_and_accelerate_reach_the_same_weights() -> None:
    for lightning, accelerate in run_distributed(lightning_and_accelerate, 2, init_process_group=False):
        for name, weight in lightning["state"].items():
            assert_close_rel(accelerate["state"][name], weight, 1e-6, f"Lightning vs Accelerate: {name}")


def nonfinite_run(on_nonfinite: str) -> dict[str, Any]:
    """Rank body: ring 2; rank 1's loss is NaN at step 1 (so only its gradients are), 3 steps."""
    from accelerate import Accelerator

    from cp_plugin import ParallelConfig
    from cp_plugin.accelerate import ContextParallelPlugin

    accelerator = Accelerator(cpu=True)
    module = FlowMatchingModule("flux", "sgd")
    before = {k: v.clone() for k, v in module.transformer.state_dict().items()}
    cp = ContextParallelPlugin(ParallelConfig(ring_degree=2), on_nonfinite=on_nonfinite)
    model, opt, loader = cp.prepare(accelerator, module, module.configure_optimizers(),
                                    DataLoader(SyntheticFlowData("flux"), batch_size=PER_RANK))
    try:
        for step, batch in enumerate(loader):
            if step == STEPS:
                break
            loss = model(batch)
            accelerator.backward(loss * float("nan") if step == 1 and accelerator.process_index == 1 else loss)
            opt.step()
            opt.zero_grad()
    except FloatingPointError as err:
        return {"error": str(err)}
    state = module.transformer.state_dict()
    return {"finite": all(bool(v.isfinite().all()) for v in state.values()),
            "changed": any(not v.equal(before[k]) for k, v in state.items()), "state": state}


@pytest.mark.timeout(200)
def test_nonfinite_gradients_raise_or_skip_on_every_rank() -> None:
    raised = run_distributed(nonfinite_run, 2, "raise", init_process_group=False)
    for rank, result in enumerate(raised):  # every rank stops at the same step, naming itself
        assert re.search(rf"non-finite gradients at step 1, rank {rank}; .*on_nonfinite='skip'", result["error"])
    skipped = run_distributed(nonfinite_run, 2, "skip", init_process_group=False)
    assert all(r["finite"] and r["changed"] for r in skipped)  # the NaN step dropped, the others taken
    for name, weight in skipped[0]["state"].items():
        assert weight.equal(skipped[1]["state"][name]), name


def bad_configs() -> dict[str, str]:
    from accelerate import Accelerator
    from accelerate.utils import ParallelismConfig

    from cp_plugin.accelerate import ContextParallelPlugin

    messages = {}
    cases = {
        "degrees": lambda: ContextParallelPlugin({"ring_degree": 3}).prepare(Accelerator(cpu=True), torch.nn.Linear(2, 2)),
        "not_joined": lambda: ContextParallelPlugin({"ring_degree": 2})._setup(
            type("Single", (), {"num_processes": 1, "parallelism_config": None})()
        ),
        "mismatch": lambda: ContextParallelPlugin(
            {"ring_degree": 2} if torch.distributed.get_rank() == 0 else {"ulysses_degree": 2}
        ).prepare(Accelerator(cpu=True), torch.nn.Linear(2, 2)),
        "nonfinite_option": lambda: ContextParallelPlugin({"ring_degree": 2}, on_nonfinite="ignore"),
        "accelerate_cp": lambda: ContextParallelPlugin({"ring_degree": 2})._setup(
            type("WithCP", (), {"num_processes": 2, "parallelism_config": ParallelismConfig(cp_size=2)})()
        ),
    }
    for name, case in cases.items():
        try:
            case()
            messages[name] = "no error"
        except ValueError as err:
            messages[name] = str(err)
    return messages


@pytest.mark.timeout(120)
def test_bad_configs_fail_on_every_rank_with_a_fix() -> None:
    for messages in run_distributed(bad_configs, 2, init_process_group=False):
        assert "ring_degree=3 x ulysses_degree=1 = 3 does not divide world_size=2" in messages["degrees"]
        assert re.search(r"num_processes=1 but 2 processes were launched.*Accelerator\(cpu=True\)", messages["not_joined"])
        assert "cp_size=2" in messages["accelerate_cp"] and "cannot be combined" in messages["accelerate_cp"]
        assert re.search(r"ranks \[1\] were started with different settings than rank 0", messages["mismatch"])
        assert "on_nonfinite='ignore' is not supported; use 'raise' or 'skip'" in messages["nonfinite_option"]


def example_run(folder: Path, processes: int, parallel: str) -> subprocess.CompletedProcess:
    """examples/train_accelerate.py under torchrun: LoRA, 3 steps of SGD (its step is the gradient itself) at a
    learning rate that moves the loss (lr 2 instead of 1 changes step 3's by 5e-3 of it)."""
    folder.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           str(ROOT / "examples" / "train_accelerate.py"), f"parallel={parallel}", "trainer.max_steps=3",
           "trainer.accumulate_grad_batches=2", "data.image_size=16", "data.crops=16", "checkpoint_every_n_steps=2",
           "lora.rank=4", "optimizer=sgd", "optimizer.lr=1.0", "optimizer.warmup_steps=1", f"hydra.run.dir={folder}"]
    result = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.timeout(400)
def test_example_script_under_torchrun(tmp_path: Path) -> None:
    """Ring 2 against the same script on one process: each step's loss within 1e-5 (measured: equal to the 7 digits
    printed)."""
    result = example_run(tmp_path, 2, "ring")
    losses = [float(loss) for loss in re.findall(r"step \d+ loss (\S+)", result.stdout)]
    alone = [float(loss) for loss in re.findall(r"step \d+ loss (\S+)",
                                                 example_run(tmp_path / "one_process", 1, "none").stdout)]
    assert len(losses) == len(alone) == 3
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, alone)), (losses, alone)
    trainable, total = map(int, re.search(r"trainable parameters: (\d+) of (\d+)", result.stdout).groups())
    assert 0 < trainable < total / 5, "lora.rank=4: the adapters (and the class embedding) train, not the base"
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb")), "no W&B offline run"
    assert (tmp_path / "checkpoints" / "step_2").is_dir()  # accelerator.save_state
    assert "step 3" in result.stdout
    refused = subprocess.run([sys.executable, str(ROOT / "examples" / "train_accelerate.py"), "resume=last",
                              f"hydra.run.dir={tmp_path / 'refused'}"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0 and "resume=last is not supported by this example" in refused.stderr
