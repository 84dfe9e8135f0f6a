"""Converting a model leaves no trace: routing only while it runs, and ``remove`` gives back a plain model.

In one 2-rank launch, for a model with its own plan (Flux: dispatch calls) and one with a derived
plan (SD3: SDPA called directly, joint text and image), each rank

- stands in for another library that patched ``F.scaled_dot_product_attention`` before cp_plugin;
- converts the model and checks that SDPA and diffusers' backend registry are what they were, before
  and after a converted forward and backward (routing is in place only while the model runs);
- runs a never-converted copy beside it, whose attention reaches the other library's patch;
- removes the conversion and checks every module's and processor's attributes are as before.

The parent compares the converted model's loss and gradients, the unconverted copy's and the removed
model's with the same model trained in the parent (a fresh process): the unconverted and removed runs
must match it as closely as two processes do, the converted one as closely as context parallelism does.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from exact import assert_close_rel
from launcher import run_distributed

CASES = ("flux", "sd3")
CP_RTOL = 1e-5  # context-parallel attention against one process (float32)
SAME_RTOL = 1e-6  # the same computation in two processes (thread counts may differ)


def loss_and_grads(
    model: torch.nn.Module, inputs: dict[str, Any], averaged: bool = False
) -> tuple[float, dict[str, torch.Tensor]]:
    """A seeded MSE loss of the model's output and its gradients (cleared afterwards); ``averaged``: the
    mean over the ranks, as DDP takes it."""
    out = model(**inputs, return_dict=False)[0]
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    loss = torch.nn.functional.mse_loss(out, target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if averaged:
        for g in grads.values():
            torch.distributed.all_reduce(g)
            g /= torch.distributed.get_world_size()
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def traces(model: torch.nn.Module) -> dict[str, Any]:
    """What a conversion could leave behind: every module's and attention processor's own attributes."""
    found: dict[str, Any] = {}
    for name, module in model.named_modules():
        found[name] = sorted(vars(module))
        processor = getattr(module, "processor", None)
        if processor is not None:
            found[f"{name}.processor"] = dict(vars(processor))
    return found


class OtherLibrarySDPA:
    """Another library's patch of SDPA, installed before cp_plugin: it must stay, and keep seeing plain calls."""

    def __init__(self, sdpa: Any) -> None:
        self.sdpa, self.calls = sdpa, 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self.sdpa(*args, **kwargs)


def convert_run_remove(names: tuple[str, ...]) -> dict[str, Any]:
    """Rank body: per case, converted / unconverted / removed losses and gradients, and the checks above."""
    import torch.nn.functional as F

    from cp_plugin import ParallelConfig, ParallelMesh
    from cp_plugin.compat import attention_backends
    from cp_plugin.model import apply_context_parallel, remove_context_parallel
    from fixtures.dits import CASES as ALL

    mesh = ParallelMesh.build(ParallelConfig(ulysses_degree=2), "cpu")
    original = F.scaled_dot_product_attention
    other = OtherLibrarySDPA(original)
    F.scaled_dot_product_attention = other
    results: dict[str, Any] = {}
    try:
        for name in names:
            case = ALL[name]
            model, plain = case.build(seed=0), case.build(seed=0)
            before, backends = traces(model), dict(attention_backends())
            conversion = apply_context_parallel(model, mesh)
            untouched = lambda: F.scaled_dot_product_attention is other and attention_backends() == backends  # noqa: E731
            assert untouched(), f"{name}: converting patched SDPA or the backend registry"
            inputs = case.inputs(torch.Generator().manual_seed(3))
            converted = loss_and_grads(model, inputs, averaged=True)
            assert untouched(), f"{name}: a converted forward left SDPA or the backend registry patched"
            seen = other.calls
            unconverted = loss_and_grads(plain, inputs)
            assert other.calls > seen, f"{name}: the unconverted model's attention did not reach the SDPA in place"
            if name == "flux":  # removing by the module works as well as by the handle
                remove_context_parallel(model)
            else:
                conversion.remove()
            assert traces(model) == before, f"{name}: removing left attributes changed"
            removed = loss_and_grads(model, inputs)
            assert untouched()
            for what, (loss, grads) in {"removed": removed}.items():
                assert loss == unconverted[0], f"{name}: {what} loss {loss} != never converted {unconverted[0]}"
                assert all(torch.equal(grads[n], g) for n, g in unconverted[1].items()), f"{name}: {what} gradients"
            results[name] = {"converted": converted, "unconverted": unconverted, "removed": removed}
    finally:
        F.scaled_dot_product_attention = original
    return results


@pytest.mark.timeout(300)
def test_conversion_is_scoped_and_reversible() -> None:
    from fixtures.dits import CASES as ALL

    results = run_distributed(convert_run_remove, 2, CASES)
    for name in CASES:
        case = ALL[name]
        reference = loss_and_grads(case.build(seed=0), case.inputs(torch.Generator().manual_seed(3)))
        for rank, per_rank in enumerate(results):
            for what, rtol in (("converted", CP_RTOL), ("unconverted", SAME_RTOL), ("removed", SAME_RTOL)):
                loss, grads = per_rank[name][what]
                assert abs(loss - reference[0]) <= rtol * abs(reference[0]), f"{name} rank {rank} {what} loss"
                assert grads.keys() == reference[1].keys(), f"{name} rank {rank} {what}: other parameters got gradients"
                for n, g in reference[1].items():
                    assert_close_rel(grads[n], g, rtol, f"{name} rank {rank} {what} gradient {n}")
