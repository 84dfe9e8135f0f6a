"""Normalization layers recomputed in the backward (``cp_plugin.norms``), on one process.

A recomputed norm must give the same outputs and gradients (the same ops run again), hold less at
the step's peak (measured by the instrument the benchmarks use), leave a layer another hook wraps as
it is, and leave the model as it was on ``remove()``. Its exactness under every layout is in
``tests/test_every_dit.py`` (the memory options turn it on with tiling).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from diffusers.models.normalization import AdaLayerNormZero, RMSNorm

from benchmarks.measure import PeakMemory
from cp_plugin.model import Conversion
from cp_plugin.norms import recompute_norms
from cp_plugin.tiling import MIN_TILED_TOKENS, Tiles


class _Normed(torch.nn.Module):
    """A block's normalizations: an adaptive layer norm (Flux's ``norm1``) and RMS norms of queries and keys."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.norm1 = AdaLayerNormZero(width)
        self.to_q, self.to_k = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
        self.norm_q, self.norm_k = RMSNorm(width, eps=1e-6), torch.nn.RMSNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        normed, gate, *_ = self.norm1(x, emb=emb)
        return self.norm_q(self.to_q(normed)) * self.norm_k(self.to_k(normed)).sigmoid() * gate[:, None]


def _step(block: torch.nn.Module, x: torch.Tensor, emb: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    block.zero_grad()
    x = x.detach().requires_grad_()
    with PeakMemory() as memory:
        out = block(x, emb)
        out.square().mean().backward()
    return [out.detach(), x.grad, *(p.grad.clone() for p in block.parameters() if p.requires_grad)], memory.peak


@pytest.mark.parametrize("rows", [None, 100])
def test_recomputed_norms_are_exact_and_hold_less(rows: int | None) -> None:
    """Each norm keeps only its input, not its normalized output (measured: 0.78 of the peak)."""
    torch.manual_seed(0)
    block = _Normed()
    x, emb = torch.randn(2, MIN_TILED_TOKENS, 32), torch.randn(2, 32)
    want, plain = _step(block, x, emb)
    conversion = Conversion()
    recompute_norms(torch.nn.ModuleDict({"block": block}), conversion, Tiles.every(rows))
    got, recomputed = _step(block, x, emb)
    for tiled, untiled in zip(got, want, strict=True):
        assert tiled.equal(untiled)  # the same ops, run again
    assert recomputed < 0.9 * plain, (recomputed, plain)
    conversion.remove()
    assert not any("_diffusers_hook" in vars(m) for m in block.modules())
    assert _step(block, x, emb)[1] == plain


class _Counted(RMSNorm):
    """An RMS norm counting its forwards: a recompute is a second one."""

    calls = 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(hidden_states)


@pytest.mark.parametrize(("tokens", "hooked", "again"), [(MIN_TILED_TOKENS, False, True), (MIN_TILED_TOKENS, True, False),
                                                          (16, False, False)])
def test_a_norm_is_recomputed_unless_another_hook_wraps_it_or_its_sequence_is_short(
    tokens: int, hooked: bool, again: bool
) -> None:
    """A user's forward hook (or a context-parallel split) on the layer would run again in a recompute: such a layer
    runs once, as a layer does under ``MIN_TILED_TOKENS`` tokens, where its output is small."""
    torch.manual_seed(0)
    block = _Normed()
    block.norm_q = _Counted(32, eps=1e-6)
    seen: list[int] = []
    if hooked:
        block.norm_q.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    conversion = Conversion()
    recompute_norms(block, conversion)
    _step(block, torch.randn(2, tokens, 32), torch.randn(2, 32))
    conversion.remove()
    assert (block.norm_q.calls > 1) == again
    assert seen == ([tokens] if hooked else [])


class _Heads(torch.nn.Module):
    """An attention's projections of an adaptive norm's output and the RMS norms of queries and keys over heads:
    ``norm_q(to_q(norm1(x)).unflatten(-1, (heads, -1)))``, the way diffusers' processors split heads between the two;
    ``edit`` writes a projection (``"q"``) or the adaptive norm's output (``"normed"``) in place before it is read."""

    def __init__(self, width: int = 32, heads: int = 4, edit: str = "") -> None:
        super().__init__()
        self.norm1 = AdaLayerNormZero(width)
        self.to_q, self.to_k = torch.nn.Linear(width, width), torch.nn.Linear(width, 2 * width)
        self.to_v = torch.nn.Linear(width, width)
        self.norm_q, self.norm_k = RMSNorm(width // heads, eps=1e-6), torch.nn.RMSNorm(width // heads, eps=1e-6)
        self.out = torch.nn.Linear(width, 8 * width)  # a wide layer after them, whose backward is the step's peak
        self.heads, self.edit = heads, edit

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        normed, gate, *_ = self.norm1(x, emb=emb)
        if self.edit == "normed":
            normed.mul_(2.0)
        q = self.to_q(normed)
        if self.edit == "q":
            q.mul_(2.0)
        k = self.to_k(normed)[..., : x.shape[-1]]  # half of a wider projection (as of a fused one): a part of it
        q = self.norm_q(q.unflatten(-1, (self.heads, -1)))
        k = self.norm_k(k.unflatten(-1, (self.heads, -1)))
        return self.out((q * k.sigmoid()).flatten(-2) * self.to_v(normed) * gate[:, None])


@pytest.mark.parametrize(("edit", "paths"), [("", (1, 3)), ("q", (0, 3)), ("normed", (1, 0))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projections_of_norms_and_norms_of_projections_are_made_again_exactly(
    edit: str, paths: tuple[int, int], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A linear layer given a recomputed norm's output keeps what the norm took, not its output, and a norm given a
    sibling linear layer's whole output (through a view splitting heads) keeps what the layer took: each backward
    makes the tensor again under the forward's autocast. The same ops run, so the same bits come out, and less is
    held at the peak than with plain recomputes of the norms (measured: more than an output's size). A tensor
    written in place after it was made, or a part of one (a fused projection's share), is kept as it is."""
    import cp_plugin.norms as norms

    torch.manual_seed(0)
    block = _Heads(edit=edit)
    x, emb = torch.randn(2, MIN_TILED_TOKENS, 32), torch.randn(2, 32)

    def step() -> tuple[list[torch.Tensor], int]:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            return _step(block, x, emb)

    want, plain = step()
    taken = {"norm": 0, "linear": 0}
    for path, function in (("norm", norms._ProjectedNorm), ("linear", norms._LinearOfMade)):
        monkeypatch.setattr(function, "apply", functools.partial(_counted, function.apply, taken, path))
    conversion = Conversion()
    recompute_norms(block, conversion)
    got, recomputed = step()
    for tiled, untiled in zip(got, want, strict=True):
        assert tiled.equal(untiled)
    assert (taken["norm"], taken["linear"]) == paths  # norm_k's never: it sees a part of to_k's output
    conversion.remove()
    if not edit:  # the plain recompute of both norms, for the same step
        conversion = Conversion()
        recompute_norms(block, conversion)
        monkeypatch.setattr(norms.Made, "source", lambda self, x: None)
        checkpointed = step()[1]
        conversion.remove()
        assert recomputed <= checkpointed - x.numel() * x.element_size(), (recomputed, checkpointed)


def test_a_frozen_projection_of_a_norm_makes_nothing_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen linear layer (a LoRA's base) given a recomputed norm's output needs no weight gradient, so its backward
    does not make the norm's output again to multiply it by the gradient: with the query, key and value layers frozen,
    the adaptive norm's output is made again three times fewer (once, inside ``to_q``'s output, which ``norm_q``
    needs), and every gradient left is the same."""
    import cp_plugin.made as made

    made_again: list[str] = []
    make = made._Made.make
    monkeypatch.setattr(made._Made, "make", lambda self, kept: made_again.append(self.fn.__qualname__) or make(self, kept))
    x, emb = torch.randn(2, MIN_TILED_TOKENS, 32), torch.randn(2, 32)
    counts = []
    for frozen in (False, True):
        torch.manual_seed(0)
        block = _Heads()
        for layer in (block.to_q, block.to_k, block.to_v):
            layer.requires_grad_(not frozen)
        want, _ = _step(block, x, emb)
        conversion = Conversion()
        recompute_norms(block, conversion)
        made_again.clear()
        got, _ = _step(block, x, emb)
        conversion.remove()
        for tiled, untiled in zip(got, want, strict=True):
            assert tiled.equal(untiled)
        counts.append(made_again.count("AdaLayerNormZero.forward"))
    assert counts == [4, 1], counts


def _counted(apply: Any, taken: dict[str, int], path: str, *args: Any) -> Any:
    taken[path] += 1
    return apply(*args)


def test_a_token_count_equal_to_the_width_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a tensor was made of is found by where it came from (the recorded tensor itself, or a view of all of it),
    never by sizes: 32 tokens of width 32, heads of 8, every path taken and every bit the same."""
    import cp_plugin.norms as norms

    torch.manual_seed(0)
    block = _Heads(width=32, heads=4)
    x, emb = torch.randn(2, 32, 32), torch.randn(2, 32)
    want, _ = _step(block, x, emb)
    taken = {"norm": 0, "linear": 0}
    for path, function in (("norm", norms._ProjectedNorm), ("linear", norms._LinearOfMade)):
        monkeypatch.setattr(function, "apply", functools.partial(_counted, function.apply, taken, path))
    conversion = Conversion()
    recompute_norms(block, conversion, Tiles.every(16))
    got, _ = _step(block, x, emb)
    conversion.remove()
    for tiled, untiled in zip(got, want, strict=True):
        assert tiled.equal(untiled)
    assert (taken["norm"], taken["linear"]) == (1, 3)


@pytest.mark.parametrize(("dropout", "norms_made_again"), [(0.0, 1), (0.1, 0)])
def test_a_lora_projection_of_a_norm_is_made_again_for_the_norm_of_it(
    dropout: float, norms_made_again: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With peft's LoRA on the query, key and value layers (base frozen), ``norm_q`` takes the adapter's sum, not a
    linear layer's output: that sum is recorded as the adapted layer's forward of its input, so the norm keeps what
    it was made of (held at the peak: at least one output's size less than when the sum is kept). Every gradient is
    bit for bit the same. With a dropout in the adapter the sum is not recorded: made again, it would draw another
    mask."""
    from peft import LoraConfig, inject_adapter_in_model

    import cp_plugin.norms as norms

    torch.manual_seed(0)
    block = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["to_q", "to_k", "to_v"]), _Heads())
    for name, param in block.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(param, 0, 0.02)
    x, emb = torch.randn(2, MIN_TILED_TOKENS, 32), torch.randn(2, 32)

    def step() -> tuple[list[torch.Tensor], int]:
        torch.manual_seed(1)  # the same dropout masks in every step
        return _step(block, x, emb)

    want, _ = step()
    taken = {"norm": 0, "linear": 0}
    monkeypatch.setattr(norms._ProjectedNorm, "apply",
                        functools.partial(_counted, norms._ProjectedNorm.apply, taken, "norm"))
    conversion = Conversion()
    recompute_norms(block, conversion)
    got, recorded = step()
    for tiled, untiled in zip(got, want, strict=True):
        assert tiled.equal(untiled)
    assert taken["norm"] == norms_made_again
    conversion.remove()
    if not dropout:  # the same step with the sum kept (a hook takes its forward when it is registered)
        monkeypatch.setattr(norms.RecordedAdapter, "new_forward",
                            lambda self, module, *args, **kwargs: self.fn_ref.original_forward(*args, **kwargs))
        conversion = Conversion()
        recompute_norms(block, conversion)
        kept = step()[1]
        conversion.remove()
        assert recorded <= kept - x.numel() * x.element_size(), (recorded, kept)
