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
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.measure import PeakMemory
from cp_plugin import tiling as tiling_module
from cp_plugin.compat import FakeTensorMode, storage_id
from cp_plugin.memory import AUTO_TILING_WIDTHS, apply_memory_options, auto_tiles
from cp_plugin.tiling import (
    MIN_TILED_TOKENS,
    TiledFeedForward,
    Tiles,
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
    return out.detach(), x.grad, [p.grad.clone() for p in module.parameters() if p.requires_grad], memory.peak


@pytest.mark.parametrize("rows", [None, 1000])
def test_a_tiled_feed_forward_is_exact_and_holds_less(rows: int | None) -> None:
    torch.manual_seed(0)
    ff = FeedForward(64, mult=4, activation_fn="gelu-approximate")
    x = torch.randn(2, MIN_TILED_TOKENS, 64)
    out, grad_x, grads, untiled = _step(ff, x)
    tiling = tile_feed_forward(torch.nn.ModuleDict({"ff": ff}), Tiles.every(rows))  # a model holding it, as a block
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


def test_a_feed_forward_network_of_lora_layers_is_tiled_exactly_without_running_its_output_product_again() -> None:
    """LoRA on both layers of a ``FeedForward``: tiled, its adapters' gradients are the untiled ones, the peak falls
    (measured: 0.35 of the untiled one), and the output layer's base product runs once a chunk forward and once
    backward, kept from the forward rather than run again in the chunk's recompute (three times a chunk without)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    ff = inject_adapter_in_model(LoraConfig(r=4, init_lora_weights=False, target_modules=["net.0.proj", "net.2"]),
                                 FeedForward(64, mult=4, activation_fn="gelu-approximate"))
    for name, parameter in ff.named_parameters():
        parameter.requires_grad_("lora_" in name)
    x = torch.randn(2, MIN_TILED_TOKENS, 64)
    out, grad_x, grads, untiled = _step(ff, x)
    tiling = tile_feed_forward(torch.nn.ModuleDict({"ff": ff}))
    assert tiling.paths == ["ff"]
    with _ProductsWith(ff.net[2].get_base_layer().weight) as products:
        tiled_out, tiled_grad_x, tiled_grads, tiled = _step(ff, x)
    tiling.remove()
    torch.testing.assert_close(tiled_out, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tiled_grad_x, grad_x, rtol=1e-6, atol=1e-7)
    for got, want in zip(tiled_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert tiled < 0.45 * untiled, (tiled, untiled)
    chunks = -(-x.shape[:-1].numel() // Tiles.every().chunk(x.shape[:-1].numel(), 64, 256))
    assert products.count == 2 * chunks, (products.count, chunks)


class _SingleStream(torch.nn.Module):
    """A single-stream block's inline MLP (Flux, HunyuanVideo: ``act_mlp(proj_mlp(x))``), whose hidden layer is, by
    ``use``: concatenated after another branch before ``proj_out`` (``"linear"``: a linear layer's output;
    ``"attention"``: an attention layer's, as in Flux), projected alone (``"alone"``), or also read by something else
    (``"read"``); beside a modulation whose activation comes before its linear layer (AdaLayerNorm's)."""

    def __init__(self, width: int = 32, use: str = "linear") -> None:
        super().__init__()
        self.use = use
        self.proj_mlp, self.act_mlp = torch.nn.Linear(width, 4 * width), torch.nn.GELU(approximate="tanh")
        self.mix = Attention(width, heads=2, dim_head=width // 2) if use == "attention" else torch.nn.Linear(width, width)
        self.proj_out = torch.nn.Linear((4 if use == "alone" else 5) * width, width)
        self.silu, self.linear = torch.nn.SiLU(), torch.nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act_mlp(self.proj_mlp(x))
        attended = self.mix(x)  # held while projected, as Flux's attn_output is
        scale = self.linear(self.silu(x.mean(1)))[:, None, : x.shape[-1]]
        if self.use == "alone":
            return self.proj_out(hidden) * (1 + scale) + attended
        if self.use == "read":
            scale = scale + hidden[..., : x.shape[-1]].mean(1, keepdim=True)
        return self.proj_out(torch.cat([attended, hidden], -1)) * (1 + scale)


def _lora_single_stream(adapted: tuple[str, ...], use: str = "linear") -> torch.nn.Module:
    """A ``_SingleStream`` block with peft's LoRA (rank 4, non-zero) on the ``adapted`` layers and its base frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    block = inject_adapter_in_model(LoraConfig(r=4, init_lora_weights=False, target_modules=list(adapted)),
                                    _SingleStream(use=use))
    for name, parameter in block.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return block


def _bf16_untiled_and_tiled(block: torch.nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A step of ``block`` under bf16 autocast, untiled then tiled: its output, the input's gradient and the trained
    parameters' gradients, each time."""
    def step() -> list[torch.Tensor]:
        block.zero_grad()
        inputs = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(inputs)
        out.float().square().mean().backward()
        return [out.detach(), inputs.grad, *(p.grad.clone() for p in block.parameters() if p.requires_grad)]

    untiled = step()
    tiling = tile_feed_forward(torch.nn.ModuleDict({"block": block}))
    tiled = step()
    tiling.remove()
    return untiled, tiled


@pytest.mark.parametrize(("rows", "use", "bound"), [
    (None, "linear", 0.5), (1000, "linear", 0.6), (None, "attention", 0.6), (None, "alone", 0.5), (None, "read", 0.9)])
def test_an_inline_mlp_is_projected_in_chunks_exactly_and_holds_less(
    rows: int | None, use: str, bound: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``proj_out`` takes the hidden layer (4 x 32 wide), alone or concatenated after another branch, neither it
    nor the concatenation (5 x 32) is ever whole, forward or backward (measured: 0.40-0.55 of the untiled peak).
    Where something else reads the hidden layer, it is computed whole as before but not saved for the backward
    (measured: 0.86)."""
    torch.manual_seed(0)
    block = _SingleStream(use=use)
    x = torch.randn(2, MIN_TILED_TOKENS, 32)
    out, grad_x, grads, untiled = _step(block, x)
    assert [name for name, _, _ in inline_mlps(block)] == ["act_mlp", "silu"]  # candidates; silu's input is no output
    tiling = tile_feed_forward(torch.nn.ModuleDict({"block": block}), Tiles.every(rows))
    projected, original = [], tiling_module._ProjectedHidden

    class Counted(original):
        @staticmethod
        def forward(ctx: Any, *args: Any) -> torch.Tensor:
            projected.append(args[1].shape)
            return original.forward(ctx, *args)

    monkeypatch.setattr(tiling_module, "_ProjectedHidden", Counted)
    tiled_out, tiled_grad_x, tiled_grads, tiled = _step(block, x)
    torch.testing.assert_close(tiled_out, out, rtol=1e-6, atol=1e-6)  # the same computation, in chunks
    torch.testing.assert_close(tiled_grad_x, grad_x, rtol=1e-6, atol=1e-7)
    for got, want in zip(tiled_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert len(projected) == (use != "read")
    assert tiled < bound * untiled, (tiled, untiled)
    tiling.remove()
    assert not any("_diffusers_hook" in vars(m) for m in block.modules())
    assert _step(block, x)[3] == untiled


class _ProductsWith(TorchDispatchMode):
    """Counts the matrix products that take ``weight`` (by storage: as a layer passes it, transposed)."""

    def __init__(self, weight: torch.Tensor | None) -> None:
        super().__init__()
        self.storage = None if weight is None else storage_id(weight)
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default) and any(
                isinstance(a, torch.Tensor) and storage_id(a) == self.storage for a in args):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("adapted", "use", "bound"), [
    (("proj_mlp", "proj_out"), "linear", 0.6), (("proj_mlp",), "linear", 0.75), (("proj_out",), "alone", 0.45)])
def test_an_inline_mlp_of_lora_layers_is_projected_in_chunks_exactly_and_holds_less(
    adapted: tuple[str, ...], use: str, bound: float
) -> None:
    """peft's LoRA wraps the MLP's layers (the usual fine-tune): each chunk then runs the adapted layers' own
    forwards under a checkpoint, so the hidden layer and the concatenation are still never whole (measured: 0.51, 0.65
    and 0.33 of the untiled peak, where they were computed whole before: 1.0), the adapters' gradients are those of the
    untiled block, and a wrapped linear layer is not taken for a feed-forward network of its own. The output layer's
    base product, which its backward does not need again, is kept from each chunk's forward rather than run again."""
    torch.manual_seed(0)
    block = _lora_single_stream(adapted, use)
    x = torch.randn(2, MIN_TILED_TOKENS, 32)
    out, grad_x, grads, untiled = _step(block, x)
    tiling = tile_feed_forward(torch.nn.ModuleDict({"block": block}))
    assert "block.act_mlp" in tiling.paths and not any("proj_" in path for path in tiling.paths)
    with _ProductsWith(block.proj_out.get_base_layer().weight if "proj_out" in adapted else None) as products:
        tiled_out, tiled_grad_x, tiled_grads, tiled = _step(block, x)
    chunks = -(-x.shape[:-1].numel() // Tiles.every().chunk(x.shape[:-1].numel(), 32, 128))
    # the output layer's base product: once a chunk forward, once backward (its input's gradient), never again
    assert products.count == (2 * chunks if "proj_out" in adapted else 0), (products.count, chunks)
    torch.testing.assert_close(tiled_out, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tiled_grad_x, grad_x, rtol=1e-6, atol=1e-7)
    for got, want in zip(tiled_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert tiled < bound * untiled, (tiled, untiled)
    tiling.remove()
    assert _step(block, x)[3] == untiled


def test_an_inline_mlp_of_lora_layers_under_a_block_checkpoint_leaves_nothing_behind_its_forward() -> None:
    """Under the block's own checkpoint (``gradient_checkpointing``) a block's forward keeps its input only. The
    output layer's base products, which a chunk keeps beside autograd's saved tensors where nothing else checkpoints,
    are not kept there, so the tiled forward leaves no more behind than the untiled one (measured: the same bytes;
    twice as many with them kept), and the backward of each chunk hands its share of the concatenation's gradient on
    as a copy of its own, not a slice of the whole (measured: 0.34 of the untiled peak, 0.51 with slices), exactly."""
    torch.manual_seed(0)
    block = _lora_single_stream(("proj_mlp", "proj_out"))
    x = torch.randn(2, MIN_TILED_TOKENS, 32)

    def step() -> tuple[list[torch.Tensor], int, int]:
        block.zero_grad()
        inputs = x.detach().requires_grad_()
        with PeakMemory() as memory:
            out = torch.utils.checkpoint.checkpoint(block, inputs, use_reentrant=False)
            after_forward = memory.live
            out.square().mean().backward()
        return [out.detach(), inputs.grad, *(p.grad.clone() for p in block.parameters() if p.requires_grad)], \
            after_forward, memory.peak

    want, untiled_forward, untiled = step()
    tiling = tile_feed_forward(torch.nn.ModuleDict({"block": block}))
    got, tiled_forward, tiled = step()
    tiling.remove()
    for tiled_grad, untiled_grad in zip(got, want, strict=True):
        torch.testing.assert_close(tiled_grad, untiled_grad, rtol=1e-5, atol=1e-7)
    assert tiled_forward <= untiled_forward, (tiled_forward, untiled_forward)
    assert tiled < 0.42 * untiled, (tiled, untiled)


@pytest.mark.parametrize("adapted", [("proj_mlp", "proj_out"), ("proj_mlp",)])
def test_an_inline_mlp_of_lora_layers_trains_under_bf16_autocast_as_untiled(adapted: tuple[str, ...]) -> None:
    """Mixed precision with adapters: each chunk is recomputed under the forward's autocast, whole (the kept product
    would take a cast copy of the weight), so the forward is the same and the gradients are within one bf16 rounding
    (measured: 5.0e-3 and 5.8e-3; bf16's is 7.8e-3)."""
    torch.manual_seed(0)
    block = _lora_single_stream(adapted)
    x = torch.randn(2, MIN_TILED_TOKENS, 32)

    want, got = _bf16_untiled_and_tiled(block, x)
    assert got[0].dtype == torch.bfloat16 and got[0].equal(want[0])
    for tiled, untiled in zip(got[1:], want[1:], strict=True):
        assert float((tiled - untiled).abs().max()) <= 8e-3 * float(untiled.abs().max())


class _Escaping(torch.nn.Module):
    """An inline MLP whose hidden layer leaves the block (returned) or whose input is written in place after the
    linear layer took it: the block computes what it computes untiled, or names the setting that avoids it."""

    def __init__(self, width: int = 16, in_place: bool = False) -> None:
        super().__init__()
        self.in_place = in_place
        self.proj_mlp, self.act_mlp = torch.nn.Linear(width, 4 * width), torch.nn.GELU()
        self.proj_out = torch.nn.Linear(5 * width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x - x.mean(1, keepdim=True)  # combines tokens: a block, no feed-forward network
        hidden = self.act_mlp(self.proj_mlp(x))
        if self.in_place:
            x.mul_(2)
        return self.proj_out(torch.cat([x, hidden], -1)), hidden


def test_a_hidden_layer_that_leaves_the_block_or_is_hooked_is_computed_as_untiled() -> None:
    torch.manual_seed(0)
    block, x = _Escaping(), torch.randn(2, MIN_TILED_TOKENS, 16)
    want = block(x)
    seen: list[torch.Tensor] = []
    tiling = tile_feed_forward(torch.nn.ModuleDict({"block": block}))
    got = block(x)  # returned: the placeholder is computed on the way out
    for tiled, untiled in zip(got, want, strict=True):
        torch.testing.assert_close(tiled, untiled, rtol=1e-6, atol=1e-6)
    handle = block.proj_mlp.register_forward_hook(lambda module, args, out: seen.append(out))
    hooked = block(x)  # a user's hook on the linear layer sees its real output: nothing is deferred
    handle.remove()
    tiling.remove()
    centered = x - x.mean(1, keepdim=True)
    torch.testing.assert_close(seen[0], torch.nn.functional.linear(centered, block.proj_mlp.weight, block.proj_mlp.bias))
    torch.testing.assert_close(hooked[0], want[0], rtol=1e-6, atol=1e-6)


def test_an_input_written_in_place_before_its_hidden_layer_is_read_names_the_setting() -> None:
    block, x = _Escaping(in_place=True), torch.randn(2, MIN_TILED_TOKENS, 16)
    tiling = tile_feed_forward(torch.nn.ModuleDict({"block": block}))
    with pytest.raises(RuntimeError, match=r"modified in place.*tile_feed_forward=False"):
        block(x)
    tiling.remove()
    block(x)  # untiled, it runs


@pytest.mark.parametrize(("use", "bound"), [("read", 1e-3), ("linear", 4e-3)])
def test_an_inline_mlp_under_bf16_autocast_recomputes_its_hidden_layer_as_the_forward_computed_it(
    use: str, bound: float
) -> None:
    """Mixed precision (Lightning's ``bf16-mixed``): the linear layer ran under autocast, so its recompute does too.
    Recomputed for the activation's derivative alone (``"read"``), the gradients are the same (0 here); recomputed in
    float32 they are 5e-3 off. Projected in chunks (``"linear"``), the forward is the same and the gradients are within
    about one bf16 rounding (measured: 3.1e-3): each chunk's weight gradient is rounded to bf16 before the chunks are
    summed, as under gradient accumulation, where one product over every token is rounded once."""
    torch.manual_seed(0)
    block = _SingleStream(use=use)
    x = torch.randn(2, MIN_TILED_TOKENS, 32)

    want, got = _bf16_untiled_and_tiled(block, x)
    assert got[0].dtype == torch.bfloat16 and got[0].equal(want[0])
    for tiled, untiled in zip(got[1:], want[1:], strict=True):
        assert float((tiled - untiled).abs().max()) <= bound * float(untiled.abs().max())


def test_the_automatic_chunk_tiles_long_sequences_only() -> None:
    every = Tiles.every()
    assert every.chunk(MIN_TILED_TOKENS - 1, 64, 256) == MIN_TILED_TOKENS - 1  # not tiled
    assert every.chunk(16384, 64, 256) == 1024  # 16 chunks: each hidden layer a quarter of the input's size
    assert every.chunk(MIN_TILED_TOKENS, 64, 4096) == MIN_TILED_TOKENS // 4  # no shorter chunks
    assert every.chunk(8192, 64, 64) == 8192  # nothing wider than the input
    assert Tiles.every(100).chunk(8192, 64, 256) == 100  # tile_tokens overrides
    assert Tiles.every(100).chunk(99, 64, 256) == 99  # a call shorter than one chunk is not cut
    assert Tiles(100, 4096).chunk(4095, 64, 256) == 4095  # nor one shorter than where tiling starts
    heads = torch.empty(1, 50, 2, 4)  # 50 tokens of queries in 2 heads of 4
    assert Tiles(None, 100).takes(heads) and not Tiles(None, 100, width=8).takes(heads)  # 100 rows, 50 tokens
    assert Tiles(None, 50, width=8).takes(heads)
    with pytest.raises(ValueError, match=r"tile_tokens=0 must be a number of tokens >= 1"):
        Tiles.every(0)


@pytest.mark.parametrize(("shards", "start"), [(1, AUTO_TILING_WIDTHS * 128), (2, AUTO_TILING_WIDTHS * 64),
                                               (4, MIN_TILED_TOKENS)])
def test_auto_tiling_takes_a_sequence_of_64_widths_and_none_shorter(shards: int, start: int) -> None:
    """``tile_feed_forward="auto"`` (the default) takes a rank's share of a sequence of at least 64 of the model's
    widths (128 here), split over ``shards`` ranks, never under ``MIN_TILED_TOKENS``: a call one token shorter runs
    as it is (the untiled peak), one that long holds less."""
    torch.manual_seed(0)
    ff = FeedForward(128, mult=4, activation_fn="gelu-approximate")
    model = torch.nn.ModuleDict({"ff": ff})
    assert auto_tiles(model, None, shards) == Tiles(None, start, 128)
    peaks = {}
    for tokens in (start - 1, start):
        x = torch.randn(1, tokens, 128)
        untiled = _step(ff, x)
        options = apply_memory_options(model, gradient_checkpointing=False, tiling="auto", tile_tokens=None,
                                       shards=shards)
        tiled = _step(ff, x)
        options.remove()
        torch.testing.assert_close(tiled[0], untiled[0], rtol=1e-6, atol=1e-6)
        peaks[tokens] = tiled[3] / untiled[3]
    assert peaks[start - 1] == 1.0 and peaks[start] < 0.6, peaks


def test_auto_tiling_reads_the_width_of_a_models_blocks() -> None:
    """The width is the input of the networks tiling takes (Flux's feed-forward networks and its single-stream blocks'
    inline MLPs): its inner dim, not the width of its text or its heads."""
    flux = CASES["flux"].build()
    width = flux.config.num_attention_heads * flux.config.attention_head_dim
    assert flux.config.joint_attention_dim != width
    assert auto_tiles(flux, None, 1) == Tiles(None, max(MIN_TILED_TOKENS, AUTO_TILING_WIDTHS * width), width)
    assert auto_tiles(torch.nn.Linear(4, 4), None, 1) is None  # nothing to chunk: no tiling


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
    hook = TiledFeedForward(Tiles.every(1))
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
    tile_feed_forward(torch.nn.ModuleDict({"ff": ff}), Tiles.every(8))
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


@pytest.mark.parametrize("policy", ["full", "save_attention"])
def test_blocks_called_with_keyword_arguments_are_checkpointed(policy: str) -> None:
    """HunyuanImage calls its blocks' checkpointing function with ``attention_mask=``, which diffusers' own function
    rejects (a TypeError on one process with ``enable_gradient_checkpointing()``): the option's function passes it on,
    and the step gives the gradients of the model without checkpointing."""
    case = CASES["hunyuanimage"]
    model = case.build().train()
    inputs = case.inputs(torch.Generator().manual_seed(0))

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(**inputs, return_dict=False)[0].square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want = grads()
    options = apply_memory_options(model, gradient_checkpointing=True, tiling=False, tile_tokens=None,
                                   checkpoint_policy=policy)
    got = grads()
    options.remove()
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
