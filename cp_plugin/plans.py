"""Which plan makes each diffusers model context parallel: ``cp_plan=``, the model's own, or a derived one.

diffusers ships a ``_cp_plan`` for about a dozen of its ~75 transformer classes. For the others a
plan is derived from structure: a DiT turns its latents (and text) into token streams once, runs
them through lists of transformer blocks, and projects the result back. So the derived plan splits
every token stream where it enters the blocks, splits what follows it (rotary tables, per-token
modulation, control latents, masks: found by their lengths at the first block, see
``streams.py``), routes every attention call made inside a block (``attention/dispatch.py``), and
gathers after the last block, before anything the model does on the whole sequence (output norm,
projection, unpatchify).

Layers that mix tokens outside attention are followed where a split can be exact: convolutions
over the token grid get halos from neighbouring ranks (``grid.py``), products that sum over tokens
(linear attention) are summed over ranks (``reductions.py``). What the split cannot express is
refused here, before anything runs or communicates, naming the model and the plan entry to write:
no list of blocks with attention among the model's children, group norms over tokens and
convolutions that change the grid's size (``grid.grid_radius``). A block whose own code cannot be
followed (softmax attention by hand, tokens cut by a count) is refused by its probe (``probe.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

from cp_plugin.attention.dispatch import calls_attention
from cp_plugin.grid import grid_radius

Plan = dict[str, Any]
# The fix every refusal names: the plan entries to write, in diffusers' own format.
PLAN_HINT = (
    "pass cp_plan={'<attribute path>': {'<block list>.0': {'hidden_states': ContextParallelInput(split_dim=1, "
    "expected_dims=3)}, 'proj_out': ContextParallelOutput(gather_dim=1, expected_dims=3)}} (diffusers' _cp_plan "
    "format) naming where its token sequence enters the blocks and where it leaves them"
)


@dataclass(frozen=True)
class DerivedPlan:
    """A plan derived from a model's structure: its top-level lists of transformer blocks.

    Every block of these lists splits the full-length token streams it is given and the tensors
    that follow them; the last block to run in a forward gathers what it returns (``streams.py``).
    """

    model: str
    block_lists: tuple[str, ...]
    gathered_after: tuple[str, ...] = ()  # lists whose last block gathers its streams (``GATHERED_AFTER``)


def attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every diffusers attention layer of ``model``: ``Attention``, the newer ``AttentionModuleMixin``, and any
    other module whose ``processor`` reaches attention (Mochi's ``MochiAttention`` is a plain ``nn.Module``)."""
    return [(name, sub) for name, sub in model.named_modules()
            if isinstance(sub, (Attention, AttentionModuleMixin))
            or (getattr(sub, "processor", None) is not None and calls_attention(sub.processor))]


def attention_heads(attn: torch.nn.Module) -> int | None:
    """An attention layer's head count (``heads``, or ``num_heads`` in newer classes such as Krea 2's), if it says."""
    heads = getattr(attn, "heads", None) or getattr(attn, "num_heads", None)
    return int(heads) if heads else None


def within(name: str, outer: str) -> bool:
    """Whether the module at attribute path ``name`` is the one at ``outer`` or inside it (``""``: the root)."""
    return outer == "" or name == outer or name.startswith(f"{outer}.")


def outermost(module: torch.nn.Module, picked: Callable[[torch.nn.Module], bool],
              outside: Iterable[str] = ()) -> list[tuple[str, torch.nn.Module]]:
    """The modules of ``module`` that ``picked`` selects, by attribute path, none inside another one selected or inside
    a module ``outside`` names: a hook on each reaches what is inside it once."""
    excluded, found = list(outside), []
    for name, sub in module.named_modules():
        if not any(within(name, outer) for outer in excluded) and picked(sub):
            found.append((name, sub))
            excluded.append(name)
    return found


def find_models(module: torch.nn.Module) -> dict[str, ModelMixin]:
    """Outermost diffusers models inside ``module`` (``""`` if ``module`` is one), by attribute path."""
    return dict(outermost(module, lambda sub: isinstance(sub, ModelMixin)))


def derive_plan(model: torch.nn.Module, path: str) -> DerivedPlan:
    """The derived plan of ``model`` (at ``path``), or a ``ValueError`` saying why it cannot have one."""
    where = f"{type(model).__name__} ('{path}')"
    lists = [
        (name, child) for name, child in model.named_children()
        if isinstance(child, torch.nn.ModuleList) and len(child) and attention_modules(child)
    ]
    if not lists:
        raise ValueError(f"{where} has no _cp_plan and no list of transformer blocks with attention among its "
                         f"children, so no plan can be derived; {PLAN_HINT}")
    for name, blocks in lists:
        for i, block in enumerate(blocks):
            grid_radius(block, f"{where}: block '{name}.{i}'")  # refuses convolutions a halo cannot follow
    names = tuple(name for name, _ in lists)
    gathered = GATHERED_AFTER.get(type(model).__name__, ((), ""))[0]
    return DerivedPlan(type(model).__name__, names, tuple(name for name in gathered if name in names))


# Block lists after whose last block a class's derived plan gathers its streams, and why (verified exact): the split
# ends there, as after the model's last block, and the next list splits the whole sequences it is given anew. Only
# where the model's code between the lists cannot run on split tokens and nothing it does shows that: a token count
# read off a split tensor is this rank's, and the tensors built from that number are tied to no split tensor.
GATHERED_AFTER: dict[str, tuple[tuple[str, ...], str]] = {
    "BriaFibo2Transformer2DModel": (("noise_refiner",), (
        "after its noise refiner it builds the noise mask (B, gist + image) and the image part of the attention "
        "mask from the refined stream's token count (hidden_states.shape[1]) and fills them at whole-sequence "
        "positions ([:, gist : gist + image] = 1)"
    )),
}


# Classes whose own ``_cp_plan`` cp_plugin replaces by the plan it derives (verified exact), and why.
DERIVED_OVER_OWN: dict[str, str] = {
    "LTX2VideoTransformer3DModel": (
        "its plan splits the rotary tables as (B, T, D) where LTX-2.x builds split tables (B, H, T, D/2), has no "
        "entry for the audio-video cross-attention's rotary table, and routes attention over audio it never splits"
    ),
    "LTXVideoTransformer3DModel": (
        "its plan does not split the timestep, which LTXImageToVideoPipeline gives per token (zero on the given "
        "frame's tokens): their modulation would meet this rank's tokens at the whole sequence's length"
    ),
    "MiniMaxH3Transformer3DModel": (
        "its plan routes the text refiner's attention, which runs on the whole text before the split"
    ),
}


def own_plan(model: torch.nn.Module) -> Plan | None:
    """The model's own ``_cp_plan``, unless cp_plugin derives a better one for its class (``DERIVED_OVER_OWN``)."""
    return None if type(model).__name__ in DERIVED_OVER_OWN else getattr(model, "_cp_plan", None)


def resolve_plans(module: torch.nn.Module, cp_plan: Mapping[str, Plan] | None) -> dict[str, Plan | DerivedPlan]:
    """Which models get which plan: ``cp_plan`` (path -> plan) wins, else each model's ``_cp_plan``, else a derived one.

    Raises when a model can be given none, naming what was found and how to fix it.
    """
    models = find_models(module)
    if cp_plan is not None:
        missing = [path for path in cp_plan if path not in dict(module.named_modules())]
        if missing:
            raise ValueError(
                f"cp_plan names {missing}, which are not submodules of {type(module).__name__}; "
                f"use attribute paths such as {sorted(models) or ['transformer']}"
            )
        return dict(cp_plan)
    if not models:
        raise ValueError(f"{type(module).__name__} contains no diffusers model, so nothing can be made context "
                         "parallel; pass cp_plan={'<attribute path>': {...}} (see diffusers' _cp_plan format)")
    return {path: own_plan(model) or derive_plan(model, path) for path, model in models.items()}
