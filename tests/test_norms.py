"""Normalization layers recomputed in the backward (``cp_plugin.norms``), on one process.

A recomputed norm must give the same outputs and gradients (the same ops run again), hold less at
the step's peak (measured by the instrument the benchmarks use), leave a layer another hook wraps as
it is, and leave the model as it was on ``remove()``. Its exactness under every layout is in
``tests/test_every_dit.py`` (the memory options turn it on with tiling).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.normalization import AdaLayerNormZero, RMSNorm

from benchmarks.measure import PeakMemory
from cp_plugin.model import Conversion
from cp_plugin.norms import recompute_norms
from cp_plugin.tiling import MIN_TILED_TOKENS


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
    return [out.detach(), x.grad, *(p.grad.clone() for p in block.parameters())], memory.peak


@pytest.mark.parametrize("rows", [None, 100])
def test_recomputed_norms_are_exact_and_hold_less(rows: int | None) -> None:
    """Each norm keeps only its input, not its normalized output (measured: 0.78 of the peak)."""
    torch.manual_seed(0)
    block = _Normed()
    x, emb = torch.randn(2, MIN_TILED_TOKENS, 32), torch.randn(2, 32)
    want, plain = _step(block, x, emb)
    conversion = Conversion()
    recompute_norms(torch.nn.ModuleDict({"block": block}), conversion, rows)
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


@pytest.mark.parametrize(("tokens", "hooked", "forwards"), [(MIN_TILED_TOKENS, False, 2), (MIN_TILED_TOKENS, True, 1),
                                                             (16, False, 1)])
def test_a_norm_is_recomputed_unless_another_hook_wraps_it_or_its_sequence_is_short(
    tokens: int, hooked: bool, forwards: int
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
    assert block.norm_q.calls == forwards
    assert seen == ([tokens] if hooked else [])
