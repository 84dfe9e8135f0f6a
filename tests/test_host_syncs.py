"""A steady training step reads the device from the host at most once more than stock DDP does.

A host read (``.item()``, ``bool(t)``, ``float(t)``, ``torch.equal``, ``torch.allclose``, ``.tolist()``,
a copy to the CPU) waits for every kernel queued before it: on a GPU the host stops queueing work
and the device then idles. The strategy's checks (the CP group's batch fingerprint, the loss and the
gradients being finite) are folded into one flag the guard reads once, before the optimizer step.

Reads are recorded per step, from batch transfer to the step's end, with a dispatch mode (aten ops
that return a value to the host) and a function mode (``tolist`` and ``numpy`` read a CPU tensor's
memory without an aten op), on steps 2 to 4: the first step makes decisions once per shape (the
probe of a derived plan, sequence dims, mask forms) and may read more. The baseline is the same
module under stock Lightning DDP on the same two ranks, with the same ``static_graph`` setting.
DDP's own reads under a static graph (one per parameter, in its reducer's ``finalize_bucket_dense``:
``local_used_map_[i].item()``) read a map the reducer keeps in host memory: no device sync (also
seen on an H200 with ``torch.cuda.set_sync_debug_mode``), unlike ``find_unused_parameters=True``,
whose reducer copies that map back from the device every step when a parameter is unused.
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from exact import quiet_trainer
from launcher import run_distributed
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset

from fixtures.dits import CASES

STEPS = 4  # steps 2..4 are counted
_aten = torch.ops.aten
# aten ops that hand a tensor's value to the host (is_nonzero: ``bool``; allclose and equal return a bool).
HOST_VALUE_OPS = {_aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default,
                  _aten.allclose.default}
COPY_OPS = {_aten._to_copy.default, _aten.copy_.default}
HOST_ARRAY_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy}
MODELS = ("flux", "wan", "hunyuanvideo")  # diffusers' plans, and a derived plan with a text mask
LAYOUTS = ({"ulysses_degree": 2}, {"ring_degree": 2})


def _to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    """A copy from a device tensor into host memory (``.cpu()``, ``.to("cpu")``, ``cpu_tensor.copy_(cuda_tensor)``)."""
    if func is _aten._to_copy.default:
        device = kwargs.get("device")
        return args[0].device.type != "cpu" and device is not None and torch.device(device).type == "cpu"
    return args[0].device.type == "cpu" and args[1].device.type != "cpu"


class _HostValueOps(TorchDispatchMode):
    """Records each aten op that hands a tensor's value to the host, and where it was asked for."""

    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in HOST_VALUE_OPS or (func in COPY_OPS and _to_host(func, args, kwargs)):
            self.reads.append(f"{func} at {_caller()}")
        return func(*args, **kwargs)


class _HostArrays(TorchFunctionMode):
    """Records ``tolist`` and ``numpy`` calls, which read a CPU tensor's memory without an aten op."""

    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in HOST_ARRAY_METHODS:
            self.reads.append(f"{func.__name__} at {_caller()}")
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """The innermost frame outside torch's own modules and this file: what asked for the value."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("test_host_syncs.py"):
            return f"{frame.filename.rsplit('/', 2)[-2:]}:{frame.lineno} {frame.name}"
    return "torch"


class StepBatches(Dataset):
    """Step ``i``'s batch: the case's pipeline inputs drawn from seed ``100 + i``, and a target shaped like the
    latents (these models return their input's shape)."""

    def __init__(self, case_name: str) -> None:
        self.case = CASES[case_name]

    def __len__(self) -> int:
        return STEPS

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(100 + i)
        inputs = self.case.inputs(g)
        return {"inputs": inputs, "target": torch.randn(inputs["hidden_states"].shape, generator=g)}


class CountedDiT(L.LightningModule):
    """A plain DiT training step (no logging, no ``.item()``) whose host reads are recorded from step 2 on."""

    def __init__(self, case_name: str) -> None:
        super().__init__()
        self.model = CASES[case_name].build(seed=0)
        self.reads: list[list[str]] = []  # per counted step
        self._modes: tuple[_HostValueOps, _HostArrays] | None = None
        self._transfers = 0

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self._transfers += 1
        if self._transfers > 1:  # steady steps: from the batch's transfer to the step's end
            self.reads.append([])
            self._modes = (_HostValueOps(self.reads[-1]), _HostArrays(self.reads[-1]))
            for mode in self._modes:
                mode.__enter__()
        return batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.model(**batch["inputs"], return_dict=False)[0]
        return F.mse_loss(out, batch["target"])

    def on_train_batch_end(self, *args: Any) -> None:
        if self._modes is not None:
            for mode in reversed(self._modes):
                mode.__exit__(None, None, None)
            self._modes = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def counted_run(case_name: str, layout: dict[str, int] | None) -> list[list[str]]:
    """Rank body: fit ``case_name`` for ``STEPS`` steps under ``ContextParallelStrategy(**layout)``, or under
    stock ``DDPStrategy(static_graph=True)`` (the setting the strategy defaults to) when ``layout`` is None."""
    from lightning.pytorch.strategies import DDPStrategy

    from cp_plugin import ContextParallelStrategy

    module = CountedDiT(case_name)
    strategy = DDPStrategy(static_graph=True) if layout is None else ContextParallelStrategy(**layout)
    trainer = quiet_trainer(strategy, STEPS, use_distributed_sampler=False)  # every rank reads the same batches
    trainer.fit(module, DataLoader(StepBatches(case_name), batch_size=None))
    return module.reads


def counter_calibration() -> list[str]:
    """What the counter records for six host reads of each kind: ``bool``, ``.item()``, ``float``, ``torch.equal``,
    ``torch.allclose`` and ``.tolist()`` (so that a counter blind to them cannot pass the bound below)."""
    reads: list[str] = []
    t = torch.ones(3)
    with _HostValueOps(reads), _HostArrays(reads):
        for read in (lambda: bool(t[0] > 0), t.sum().item, lambda: float(t.sum()), lambda: torch.equal(t, t),
                     lambda: torch.allclose(t, t), t.tolist):
            read()
    return reads


def counted_runs(cases: list[tuple[str, dict[str, int] | None]]) -> tuple[list[str], list[list[list[str]]]]:
    """Rank body: the counter's calibration, then several ``counted_run`` s in one launch."""
    return counter_calibration(), [counted_run(*case) for case in cases]


def _summary(reads: list[str]) -> str:
    return "\n  ".join(f"{n} x {what}" for what, n in Counter(reads).most_common())


@pytest.mark.timeout(300)
def test_a_steady_step_reads_the_host_at_most_once_more_than_ddp() -> None:
    cases = [(model, layout) for model in MODELS for layout in (None, *LAYOUTS)]
    results = run_distributed(counted_runs, 2, cases, timeout=240)
    for rank, (calibration, runs) in enumerate(results):
        assert len(calibration) == 6, f"the counter saw {calibration} of six host reads"
        by_case = dict(zip([f"{model} {layout or 'ddp'}" for model, layout in cases], runs))
        for model in MODELS:
            ddp = by_case[f"{model} ddp"]
            assert len(ddp) == STEPS - 1, f"{model}: {len(ddp)} steps counted"
            for layout in LAYOUTS:
                cp = by_case[f"{model} {layout}"]
                for step, (cp_reads, ddp_reads) in enumerate(zip(cp, ddp, strict=True), start=2):
                    what = f"{model} {layout} rank {rank} step {step}"
                    assert len(cp_reads) - len(ddp_reads) <= 1, (
                        f"{what}: {len(cp_reads)} host reads, stock DDP {len(ddp_reads)}; the strategy's\n  "
                        f"{_summary(cp_reads)}\nDDP's\n  {_summary(ddp_reads)}"
                    )
