"""Every verified class resolves its plan at the published model's size: real head dims, a real resolution.

The exactness tests train tiny configurations; a plan that only resolves at their sizes is not a plan.
Here each class is built with its published configuration on the meta device (no memory, no weights)
and called as its pipeline calls it at a realistic resolution and prompt length. Each block of a
derived plan is probed on the inputs it gets there (``cp_plugin/probe.py``), as a converted model
probes it at its first step: its token inputs must resolve, every token sequence its attention
splits must enter the block whole in an input of its own (the stream a split starts from), and no
input may index tokens along two dimensions unless it is a ``(queries, keys)`` mask. No collective
runs; no process group is needed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dits_exact import flex_as_sdpa

from cp_plugin.attention.dispatch import AttentionRouting
from cp_plugin.compat import tree_flatten, tree_flatten_with_path, tree_unflatten
from cp_plugin.grid import grid_radius
from cp_plugin.plans import DerivedPlan, resolve_plans
from cp_plugin.probe import BlockRoles, probe_block
from fixtures.dits import CASES

REAL = {name: case for name, case in CASES.items() if case.real_inputs is not None}


def _names(args: tuple, kwargs: dict) -> list[str]:
    return ["".join(str(p) for p in path) for path, _ in tree_flatten_with_path((args, kwargs))[0]]


def check_roles(roles: BlockRoles, names: list[str], shapes: list[Any], where: str) -> None:
    """What the derived plan needs of a block's roles when every input arrives whole (its first list's case)."""
    for sequence in roles.sequences:
        sources = [n for n, dims in zip(names, roles.inputs) if any(d.parts == (sequence,) for d in dims)]
        assert sources, f"{where}: token sequence {sequence} enters only as part of joint inputs"
    for name, dims, shape in zip(names, roles.inputs, shapes):
        if len(dims) > 1:
            assert [d.dim for d in dims] == [len(shape) - 2, len(shape) - 1], (
                f"{where}: input {name} {shape} indexes tokens along dims {[d.dim for d in dims]}")


def probe_real(name: str) -> list[str]:
    """Build ``name``'s published model on meta, call it at real size, probe each kind of block; what was probed."""
    case = REAL[name]
    model = case.build_real()
    leaves, spec = tree_flatten(case.real_inputs(torch.Generator().manual_seed(0)))
    inputs = tree_unflatten([x.to("meta") if isinstance(x, torch.Tensor) else x for x in leaves], spec)
    plan = resolve_plans(model, None)[""]
    if not isinstance(plan, DerivedPlan):
        return []
    seen: dict[Any, tuple[str, torch.nn.Module, tuple, dict]] = {}
    hooks = []
    for list_name in plan.block_lists:
        for i, block in enumerate(model.get_submodule(list_name)):
            def capture(module: torch.nn.Module, args: tuple, kwargs: dict, where: str = f"{list_name}.{i}") -> None:
                leaves, spec = tree_flatten((args, kwargs))
                key = (type(module), spec, tuple((x.dim(), x.dtype) if isinstance(x, torch.Tensor) else type(x)
                                                 for x in leaves))
                seen.setdefault(key, (where, module, args, kwargs))
            hooks.append(block.register_forward_pre_hook(capture, with_kwargs=True))
    try:
        with torch.no_grad(), flex_as_sdpa():  # flex attention does not run on meta
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    probed = []
    for where, block, args, kwargs in seen.values():
        names = _names(args, kwargs)
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in tree_flatten((args, kwargs))[0]]
        # with the attention routing in place, as a converted model probes: dispatch calls reach the probe
        roles = AttentionRouting().run(None, probe_block, block.forward, args, kwargs, names, f"{case.cls} {where}",
                                       shapes, grid=grid_radius(block, where) > 0)
        check_roles(roles, names, shapes, f"{case.cls} {where}")
        probed.append(where)
    return probed


@pytest.mark.parametrize("name", sorted(REAL))
def test_the_published_model_resolves_its_plan_at_a_real_size(name: str) -> None:
    probe_real(name)
