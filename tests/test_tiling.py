"""Tiled feed-forward networks and the memory options, on one process.

Tiling must give the same outputs and gradients as the untiled network while holding a smaller
peak (measured by the instrument the benchmarks use, not by a timing), find feed-forward networks
by structure, stay out of a probe's symbolic run, and leave the model as it was on ``remove()``.
Its exactness under every layout is in ``tests/test_every_dit.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention

from benchmarks.measure import PeakMemory
from cp_plugin import tiling as tiling_module
from cp_plugin.compat import FakeTensorMode
from cp_plugin.memory import apply_memory_options
from cp_plugin.tiling import (
    MIN_TILED_TOKENS,
    TiledFeedForward,
    chunk_tokens,
    feed_forward_networks,
    inline_mlps,
    tile_feed_forward,
)
from fixtures.dits import CASES


def _step(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], int]:
    module.zero_grad()
    x = x.detach().requires_grad_()
    with PeakMemory() as memory:
        out = module(x)
        out.square().mean().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in module.parameters()], memory.peak


@pytest.mark.parametrize("rows", [None, 1000])
def test_a_tiled_feed_forward_is_exact_and_holds_less(rows: int | None) -> None:
    torch.manual_seed(0)
    ff = FeedForward(64, mult=4, activation_fn="gelu-approximate")
    x = torch.randn(2, MIN_TILED_TOKENS, 64)
    out, grad_x, grads, untiled = _step(ff, x)
    tiling = tile_feed_forward(torch.nn.ModuleDict({"ff": ff}), rows)  # a model holding the network, as a block does
    assert tiling.paths == ["ff"]
    tiled_out, tiled_grad_x, tiled_grads, tiled = _step(ff, x)
    torch.testing.assert_close(tiled_out, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tiled_grad_x, grad_x, rtol=1e-6, atol=1e-7)
    for got, want in zip(tiled_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the hidden layer (4 x 64 wide, two copies kept for the backward) exists for one chunk at a time
    assert tiled < 0.6 * untiled, (tiled, untiled)
    tiling.remove()
    assert "forward" not in vars(ff) and "_diffusers_hook" not in vars(ff)
    assert _step(ff, x)[3] == untiled


class _SingleStream(torch.nn.Module):
    """A single-stream block's inline MLP (Flux, HunyuanVideo: ``act_mlp(proj_mlp(x))``) concatenated with another
    branch before ``proj_out`` (with ``attention``, an attention layer's output, as in Flux), and a modulation whose
    activation comes before its linear layer (AdaLayerNorm's)."""

    def __init__(self, width: int = 32, attention: bool = False) -> None:
        super().__init__()
        self.proj_mlp, self.act_mlp = torch.nn.Linear(width, 4 * width), torch.nn.GELU(approximate="tanh")
        self.mix = Attention(width, heads=2, dim_head=width // 2) if attention else torch.nn.Linear(width, width)
        self.proj_out = torch.nn.Linear(5 * width, width)
        self.silu, self.linear = torch.nn.SiLU(), torch.nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act_mlp(self.proj_mlp(x))
        attended = self.mix(x)  # held while projected, as Flux's attn_output is
        scale = self.linear(self.silu(x.mean(1)))[:, None, : x.shape[-1]]
        return self.proj_out(torch.cat([attended, hidden], -1)) * (1 + scale)


@pytest.mark.parametrize(("rows", "attention", "bound"), [(None, False, 0.9), (1000, False, 0.9), (None, True, 0.8)])
def test_an_inline_mlp_recomputes_its_hidden_layer_exactly_and_holds_less(
    rows: int | None, attention: bool, bound: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hidden layer (4 x 32 wide) is no longer saved for the backward (measured: 0.88 of the untiled peak); with
    an attention layer's output beside it, ``proj_out`` saves neither the concatenation (5 x 32) nor takes its
    gradient whole (measured: 0.75)."""
    torch.manual_seed(0)
    block = _SingleStream(attention=attention)
    x = torch.randn(2, MIN_TILED_TOKENS, 32)
    out, grad_x, grads, untiled = _step(block, x)
    assert [name for name, _, _, _ in inline_mlps(block)] == ["act_mlp", "silu"]  # candidates; silu's input is no output
    tiling = tile_feed_forward(torch.nn.ModuleDict({"block": block}), rows)
    projected, original = [], tiling_module._ProjectedHidden

    class Counted(original):
        @staticmethod
        def forward(ctx: Any, *args: Any) -> torch.Tensor:
            projected.append(args[0].shape)
            return original.forward(ctx, *args)

    monkeypatch.setattr(tiling_module, "_ProjectedHidden", Counted)
    tiled_out, tiled_grad_x, tiled_grads, tiled = _step(block, x)
    torch.testing.assert_close(tiled_out, out, rtol=1e-6, atol=1e-6)  # the same computation, in chunks
    torch.testing.assert_close(tiled_grad_x, grad_x, rtol=1e-6, atol=1e-7)
    for got, want in zip(tiled_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert len(projected) == attention
    assert tiled < bound * untiled, (tiled, untiled)
    tiling.remove()
    assert not any("_diffusers_hook" in vars(m) for m in block.modules())
    assert _step(block, x)[3] == untiled


def test_an_inline_mlp_under_bf16_autocast_recomputes_its_hidden_layer_as_the_forward_computed_it() -> None:
    """Mixed precision (Lightning's ``bf16-mixed``): the linear layer ran under autocast, so its recompute does too."""
    torch.manual_seed(0)
    block = _SingleStream()
    x = torch.randn(2, MIN_TILED_TOKENS, 32)

    def step() -> tuple[torch.Tensor, ...]:
        block.zero_grad()
        inputs = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(inputs)
        out.float().square().mean().backward()
        return out.detach(), inputs.grad, *(p.grad.clone() for p in block.parameters())

    want = step()
    tiling = tile_feed_forward(torch.nn.ModuleDict({"block": block}))
    got = step()
    tiling.remove()
    assert got[0].dtype == torch.bfloat16 and got[0].equal(want[0])
    # the same bf16 hidden layer gives the same gradients (0 here); one recomputed in float32 is 7e-3 off
    for tiled, untiled in zip(got[1:], want[1:], strict=True):
        assert float((tiled - untiled).abs().max()) <= 1e-3 * float(untiled.abs().max())


def test_the_automatic_chunk_tiles_long_sequences_only() -> None:
    assert chunk_tokens(MIN_TILED_TOKENS - 1, 64, 256, None) == MIN_TILED_TOKENS - 1  # not tiled
    assert chunk_tokens(8192, 64, 256, None) == 2048  # 4 chunks: each hidden layer the size of the input
    assert chunk_tokens(8192, 64, 64, None) == 8192  # nothing wider than the input
    assert chunk_tokens(8192, 64, 256, 100) == 100  # tile_tokens overrides
    with pytest.raises(ValueError, match=r"tile_tokens=0 must be a number of tokens >= 1"):
        tile_feed_forward(torch.nn.Linear(2, 2), 0)


def test_feed_forward_networks_are_found_by_structure_not_name() -> None:
    flux2 = CASES["flux2"].build()  # Flux2FeedForward: a SwiGLU network of its own
    zimage = CASES["zimage"].build()  # Z-Image's own FeedForward (w1, w2, w3)
    found = {name for name, _ in feed_forward_networks(flux2)} | {name for name, _ in feed_forward_networks(zimage)}
    assert {"transformer_blocks.0.ff", "transformer_blocks.0.ff_context", "layers.0.feed_forward"} <= found
    assert not any("attn" in name for name in found)  # attention layers' projections are never tiled
    gate = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    assert feed_forward_networks(torch.nn.Sequential(gate)) == []  # a norm over features: not pointwise
    assert feed_forward_networks(torch.nn.ModuleDict({"pool": _Pool()})) == []  # linear layers that pool tokens


class _Pool(torch.nn.Module):
    """Linear layers and an activation, but its forward averages over tokens: tiling would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x.mean(1, keepdim=True))))


def test_calls_with_another_input_or_symbolic_sizes_run_whole() -> None:
    hook = TiledFeedForward(rows=1)
    seen: list[tuple[int, ...]] = []

    def forward(*args: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(args[0].shape))
        return args[0]

    hook.fn_ref = type("Ref", (), {"original_forward": staticmethod(forward)})()
    hook.hidden = 8
    hook.new_forward(None, torch.ones(3, 2), torch.ones(3, 2))  # paired with a second input (a modulation)
    with FakeTensorMode():
        hook.new_forward(None, torch.empty(3, 2))  # the derived plan's probe
    assert seen == [(3, 2), (3, 2)]
    hook.new_forward(None, torch.ones(3, 2))
    assert seen[2:] == [(1, 2)] * 3


@pytest.mark.timeout(300)
def test_a_compiled_network_is_tiled_inside_its_graph() -> None:
    """``torch.compile`` traces the chunks (no graph break) and gives the untiled network's result."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    ff = FeedForward(32, mult=4)
    x = torch.randn(2, 32, 32)
    want, grad_want, _, _ = _step(ff, x)
    tile_feed_forward(torch.nn.ModuleDict({"ff": ff}), 8)
    counters.clear()
    compiled = torch.compile(ff, backend="aot_eager")
    got, grad_got, _, _ = _step(compiled, x)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_turns_on_for_trained_models_and_back_off() -> None:
    model = CASES["wan"].build()
    options = apply_memory_options(torch.nn.ModuleDict({"transformer": model}), gradient_checkpointing=True,
                                   tiling=False, tile_tokens=None)
    assert model.is_gradient_checkpointing
    options.remove()
    assert not model.is_gradient_checkpointing
    model.requires_grad_(False)  # a frozen model is left alone
    apply_memory_options(model, gradient_checkpointing=True, tiling=False, tile_tokens=None)
    assert not model.is_gradient_checkpointing


def test_gradient_checkpointing_on_a_model_that_cannot_names_the_setting() -> None:
    model = CASES["wan"].build()
    type(model)._supports_gradient_checkpointing = False
    try:
        with pytest.raises(ValueError, match=r"gradient_checkpointing=True: .*WanTransformer3DModel.* does not support "
                                             r"gradient checkpointing.*parallel.gradient_checkpointing=false"):
            apply_memory_options(model, gradient_checkpointing=True, tiling=False, tile_tokens=None)
    finally:
        type(model)._supports_gradient_checkpointing = True


def test_save_attention_turns_on_selective_checkpointing_and_leaves_a_users_own_alone() -> None:
    """The policy becomes the model's checkpointing function; a model whose user turned on whole-block checkpointing
    is not silently given another policy: the error names both ways out."""
    model = CASES["wan"].build()
    options = apply_memory_options(model, gradient_checkpointing=True, tiling=False, tile_tokens=None,
                                   checkpoint_policy="save_attention")
    assert model.is_gradient_checkpointing
    options.remove()
    assert not model.is_gradient_checkpointing
    model.enable_gradient_checkpointing()
    with pytest.raises(ValueError, match=r"checkpoint_policy='save_attention': .* already has gradient checkpointing on"
                                         r".*remove that call.*checkpoint_policy='full'"):
        apply_memory_options(model, gradient_checkpointing=True, tiling=False, tile_tokens=None,
                             checkpoint_policy="save_attention")
