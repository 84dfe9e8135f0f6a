"""The symbolic probe reads a block's data flow: token dims by structure, never by a size coincidence.

Each test runs a real diffusers block once on its real inputs (captured from a one-process forward)
and checks what ``probe_block`` says about them: which inputs index tokens along which dimension,
which token sequences its attention calls use, and in which order joint sequences are concatenated.
The sizes are chosen so that sizes alone would mislead: token counts equal to head dims and widths.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from cp_plugin.compat import tree_flatten
from cp_plugin.probe import ProbeError, TokenDim, is_selection, probe_block
from fixtures.dits.case import BATCH, randn, text_mask
from fixtures.models import seeded


def first_block_inputs(model: torch.nn.Module, blocks: str, inputs: dict[str, Any]) -> tuple[torch.nn.Module, tuple, dict]:
    """The first block of ``model.<blocks>`` and the inputs a one-process forward gives it."""
    block = getattr(model, blocks)[0]
    seen: list[tuple[tuple, dict]] = []
    hook = block.register_forward_pre_hook(lambda _, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return block, *seen[0]


def probe(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, tuple[TokenDim, ...]], Any]:
    """Token dims by input name (``name[i]`` inside tuples), and the probe's result."""
    leaves, _ = tree_flatten((args, kwargs))
    names = [f"arg{i}" for i in range(len(leaves))]
    roles = probe_block(block.forward, args, kwargs, names, type(block).__name__)
    return dict(zip(names, roles.inputs)), roles


def chroma(grid: tuple[int, int], head_dim: int, text: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import ChromaTransformer2DModel

    from fixtures.dits.case import grid_ids

    h, w = grid
    model = seeded(ChromaTransformer2DModel, {
        "patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": head_dim,
        "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (head_dim // 4, head_dim // 4, head_dim // 2),
        "approximator_num_channels": 8, "approximator_hidden_dim": 16, "approximator_layers": 1}, 0)
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": randn(g, BATCH, h * w, 4), "encoder_hidden_states": randn(g, BATCH, text, 32),
              "timestep": torch.rand(BATCH, generator=g), "img_ids": grid_ids(h, w), "txt_ids": torch.zeros(text, 3),
              "attention_mask": torch.cat([text_mask(text), torch.ones(BATCH, h * w, dtype=torch.bool)], 1)}
    return model, inputs


def test_a_rotary_table_whose_head_dim_equals_the_token_count_is_split_along_its_tokens() -> None:
    """Chroma with 16 image tokens, 8 text tokens and head dim 16: the joint (24, 16) rotary table."""
    model, inputs = chroma((4, 4), head_dim=16, text=8)
    block, args, kwargs = first_block_inputs(model, "transformer_blocks", inputs)
    dims, roles = probe(block, args, kwargs)
    image, text = dims["arg0"][0].parts, dims["arg1"][0].parts  # hidden_states, encoder_hidden_states (dim 1)
    assert dims["arg0"] == (TokenDim(1, image),) and dims["arg1"] == (TokenDim(1, text),)
    joint = sorted((d for name, d in dims.items() if d and d[0].parts == text + image), key=lambda d: d[0].dim)  # text first, as Chroma has it
    assert joint == [(TokenDim(0, text + image),)] * 2 + [(TokenDim(1, text + image),)]  # rotary cos, sin; the mask
    assert roles.attention == ((text + image, text + image),)


def test_per_token_modulation_as_wide_as_the_token_count_is_split_along_tokens() -> None:
    """SkyReels-V2 diffusion forcing: a (B, 6, S, C) modulation with S == C (24 tokens, width 24)."""
    from diffusers import SkyReelsV2Transformer3DModel

    model = seeded(SkyReelsV2Transformer3DModel, {
        "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
        "out_channels": 4, "text_dim": 16, "freq_dim": 32, "ffn_dim": 32, "num_layers": 1, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32, "num_frame_per_block": 1}, 0)
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": randn(g, BATCH, 4, 2, 6, 8), "timestep": torch.randint(0, 1000, (BATCH, 2), generator=g),
              "encoder_hidden_states": randn(g, BATCH, 24, 16), "enable_diffusion_forcing": True}
    block, args, kwargs = first_block_inputs(model, "blocks", inputs)
    assert args[0].shape[1] == args[0].shape[2] == 24 and args[2].shape[-2:] == (24, 24)
    dims, roles = probe(block, args, kwargs)
    image = dims["arg0"][0].parts
    assert dims["arg0"] == (TokenDim(1, image),) and dims["arg2"] == (TokenDim(2, image),)  # not its width, dim 3
    assert dims["arg1"] == ()  # the text (24 tokens too) only gives cross-attention keys: it stays whole
    assert roles.attention == ((image, image), (image, ()))


def test_joint_order_comes_from_the_blocks_concatenation_without_a_mask() -> None:
    """SD3's joint block concatenates image then text; Chroma's text then image (above)."""
    from fixtures.dits import CASES

    case = CASES["sd3"]
    block, args, kwargs = first_block_inputs(case.build(), "transformer_blocks", case.inputs(torch.Generator()))
    dims, roles = probe(block, args, kwargs)
    image, text = dims["arg0"][0].parts, dims["arg1"][0].parts
    assert roles.attention[0] == (image + text, image + text)


def test_a_mask_padded_to_the_joint_length_covers_the_text_it_ends_with() -> None:
    """HunyuanVideo 1.5 pads its (B, T) text mask on the left to image + text: it indexes the text."""
    from fixtures.dits import CASES

    case = CASES["hunyuanvideo15"]
    block, args, kwargs = first_block_inputs(case.build(), "transformer_blocks", case.inputs(torch.Generator()))
    dims, _ = probe(block, args, kwargs)
    text = dims["arg1"][0].parts
    mask = [name for name, d in dims.items() if d == (TokenDim(1, text),) and name != "arg1"]
    assert len(mask) == 1


def test_tokens_made_inside_a_block_are_refused_naming_the_block() -> None:
    class Registers(torch.nn.Module):
        """Prepends 4 learned tokens to its input before attending: a split cannot follow them."""

        def __init__(self) -> None:
            super().__init__()
            self.registers = torch.nn.Parameter(torch.zeros(1, 4, 8))

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            x = torch.cat([self.registers.expand(hidden_states.shape[0], -1, -1), hidden_states], 1)
            q = x.unflatten(-1, (2, 4)).transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2)[:, 4:]

    with pytest.raises(ProbeError, match=r"Registers: the queries of attention call 0 has length \w+ \+ 4"):
        probe_block(Registers().forward, (torch.randn(2, 9, 8),), {}, ["hidden_states"], "Registers")


def test_text_that_only_gives_cross_attention_keys_stays_whole() -> None:
    """PixArt: only the image stream is split; its text and text mask serve keys every rank holds whole."""
    from fixtures.dits import CASES

    case = CASES["pixart"]
    block, args, kwargs = first_block_inputs(case.build(), "transformer_blocks", case.inputs(torch.Generator()))
    dims, roles = probe(block, args, kwargs)
    assert [name for name, d in dims.items() if d] == ["arg0"]
    assert roles.attention[1][1] == ()  # cross-attention keys: the text, whole on every rank


def sana_block(grid: tuple[int, int], head_dim: int) -> tuple[torch.nn.Module, tuple, dict]:
    from diffusers import SanaTransformer2DModel

    model = seeded(SanaTransformer2DModel, {
        "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": head_dim, "num_layers": 1,
        "num_cross_attention_heads": 2, "cross_attention_head_dim": head_dim, "cross_attention_dim": 2 * head_dim,
        "caption_channels": 12, "sample_size": 8, "patch_size": 1}, 0)
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": randn(g, BATCH, 4, *grid), "encoder_hidden_states": randn(g, BATCH, 5, 12),
              "encoder_attention_mask": text_mask(5).long(), "timestep": torch.rand(BATCH, generator=g)}
    return first_block_inputs(model, "transformer_blocks", inputs)


@pytest.mark.parametrize(("grid", "head_dim"), [((3, 5), 8), ((2, 4), 8), ((1, 4), 4)])
def test_a_grid_convolution_and_linear_attention_are_found_by_structure(grid: tuple[int, int], head_dim: int) -> None:
    """Sana: the block puts its tokens on the (height, width) grid for a 3 x 3 depthwise convolution and back, and
    its linear attention sums value x key over the tokens; at 8 tokens == head dim 8 and 4 == head dim 4 too."""
    block, args, kwargs = sana_block(grid, head_dim)
    leaves, _ = tree_flatten((args, kwargs))
    roles = probe_block(block.forward, args, kwargs, [f"arg{i}" for i in range(len(leaves))], "Sana", grid=True)
    assert roles.inputs[0] == (TokenDim(1, roles.sequences),)  # hidden_states: the one split sequence
    assert len(roles.grid.entries) == len(roles.grid.exits) == 1 and roles.grid.entries[0] < roles.grid.exits[0][0]
    assert roles.grid.exits[0][1] == 2  # (B, C, rows * width) after the convolutions: tokens in dim 2
    assert [dim for _, dim in roles.reductions] == [3]  # value (B, H, D + 1, tokens) @ key: tokens in dim 3


def test_softmax_attention_by_hand_over_split_tokens_is_refused() -> None:
    """A processor that computes softmax(QK^T)V itself would normalise each rank's keys alone."""
    from diffusers.models.attention_processor import AttnProcessor

    block, args, kwargs = sana_block((3, 5), 8)
    block.attn1.set_processor(AttnProcessor())
    leaves, _ = tree_flatten((args, kwargs))
    with pytest.raises(ProbeError, match="softmax over split tokens"):
        probe_block(block.forward, args, kwargs, [f"arg{i}" for i in range(len(leaves))], "Sana", grid=True)


class _MeanBlock(torch.nn.Module):
    """Self-attention over its tokens, plus their mean: added to its output, or computed and dropped."""

    def __init__(self, used: bool) -> None:
        super().__init__()
        self.used = used

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        heads = hidden_states.unflatten(-1, (2, -1)).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(heads, heads, heads).transpose(1, 2).flatten(2)
        pooled = hidden_states.mean(dim=1, keepdim=True)  # a router's load-balancing statistic, say
        return out + pooled if self.used else out


@pytest.mark.parametrize("used", [True, False])
def test_a_mean_over_split_tokens_is_refused_only_when_it_reaches_the_output(used: bool) -> None:
    x = torch.randn(2, 6, 8)
    run = lambda: probe_block(_MeanBlock(used).forward, (x,), {}, ["hidden_states"], "MeanBlock")  # noqa: E731
    if used:
        with pytest.raises(ProbeError, match="mean over split tokens"):
            run()
    else:
        assert run().inputs[0] == (TokenDim(1, run().sequences),)


class PerRun(torch.nn.Module):
    """Cuts its tokens into one run per entry of ``context`` (frames) and attends per run, as Wan-Animate's face
    adapter: to the run's own context tokens, or (``keys="self"``) to the run's tokens; ``strided`` takes every
    ``frames``-th token into a run instead of consecutive ones."""

    def __init__(self, keys: str = "context", strided: bool = False) -> None:
        super().__init__()
        self.keys, self.strided = keys, strided

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, frames = context.shape[:2]
        if self.strided:
            q = hidden_states.unflatten(1, (-1, frames)).transpose(1, 2).flatten(0, 1)
        else:
            q = hidden_states.unflatten(1, (frames, -1)).flatten(0, 1)
        k = q if self.keys == "self" else context.flatten(0, 1)
        out = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], k[:, None])[:, 0]
        return out.unflatten(0, (b, frames)).flatten(1, 2)


def test_attention_per_run_of_consecutive_tokens_against_whole_keys_is_found_as_runs() -> None:
    """3 frames of 8 tokens (width 8) attend their frame's 8 context tokens: the tokens are split, the context and
    the per-run call are not (local attention), the frame count indexes the runs."""
    roles = probe_block(PerRun().forward, (torch.randn(2, 24, 8), torch.randn(2, 3, 8, 8)), {},
                        ["hidden_states", "context"], "PerRun")
    (sequence,) = roles.sequences
    assert roles.inputs == ((TokenDim(1, (sequence,)),), ())
    assert roles.attention == (((), ()),) and roles.outputs == ((TokenDim(1, (sequence,)),),)
    assert [(g.sequence, g.counts) for g in roles.groups] == [(sequence, ((1, 1),))]


@pytest.mark.parametrize("block", [PerRun(strided=True), PerRun(keys="self")], ids=["strided", "self-attention"])
def test_runs_a_split_cannot_compute_locally_are_refused(block: PerRun) -> None:
    with pytest.raises(ProbeError, match="PerRun"):
        probe_block(block.forward, (torch.randn(2, 24, 8), torch.randn(2, 3, 8, 8)), {}, ["hidden_states", "context"],
                    "PerRun")


def test_text_selected_by_its_mask_stays_whole_beside_split_video() -> None:
    """Mochi joins each sample's valid text tokens (nonzero of the mask: a count known only from the data) to the
    video tokens: the video is split, the text and its mask stay whole, the selection is one part of the call,
    and the per-sample loop fixes the batch these roles hold for."""
    from diffusers import MochiTransformer3DModel

    model = seeded(MochiTransformer3DModel, {
        "patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1, "pooled_projection_dim": 8,
        "in_channels": 4, "text_embed_dim": 16, "time_embed_dim": 8, "max_sequence_length": 8}, 0)
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": randn(g, BATCH, 4, 1, 8, 8), "encoder_hidden_states": randn(g, BATCH, 8, 16),
              "timestep": torch.rand(BATCH, generator=g), "encoder_attention_mask": text_mask(8)}
    block, args, kwargs = first_block_inputs(model, "transformer_blocks", inputs)  # 16 video tokens == head dim 16
    dims, roles = probe(block, args, kwargs)
    video = dims["arg0"][0].parts
    assert [d.dim for d in dims["arg0"]] == [1] and dims["arg1"] == dims["arg3"] == ()
    assert len(roles.attention) == BATCH
    for queries, keys in roles.attention:
        assert queries == keys and queries[0] == video[0] and is_selection(queries[1]) and len(queries) == 2
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in tree_flatten((args, kwargs))[0]]
    assert roles.fit(shapes)
    assert not roles.fit([(BATCH + 1, *s[1:]) if s and s[0] == BATCH else s for s in shapes])  # probed again


class _CountScaled(torch.nn.Module):
    """Self-attention whose scale grows with the token count (Lumina-Next's proportional attention), or whose
    output is also multiplied by that count's logarithm (``scaled_output``): a number a rank would read as its own."""

    def __init__(self, scaled_output: bool) -> None:
        super().__init__()
        self.scaled_output = scaled_output

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.shape[1]
        heads = hidden_states.unflatten(-1, (2, -1)).transpose(1, 2)
        scale = math.sqrt(math.log(tokens, 16)) / 2
        out = torch.nn.functional.scaled_dot_product_attention(heads, heads, heads, scale=scale).transpose(1, 2)
        return out.flatten(2) * (math.log(tokens) if self.scaled_output else 1.0)


@pytest.mark.parametrize("scaled_output", [False, True])
def test_a_scale_from_the_token_count_is_one_processs_and_other_uses_are_refused(scaled_output: bool) -> None:
    x = torch.randn(2, 8, 8)  # 8 tokens = width: the count is found by structure, not by size
    run = lambda: probe_block(_CountScaled(scaled_output).forward, (x,), {}, ["hidden_states"], "CountScaled")  # noqa: E731
    if scaled_output:
        with pytest.raises(ProbeError, match="reads the count of split tokens as a number"):
            run()
    else:
        roles = run()
        assert roles.inputs[0] == (TokenDim(1, roles.sequences),) and roles.attention == ((roles.sequences,) * 2,)
        assert roles.scales == ((0, math.sqrt(math.log(8, 16)) / 2),)  # the whole sequence's scale


def test_tokens_a_cross_attention_cuts_by_a_count_and_takes_as_keys_only_are_gathered_where_they_enter_it() -> None:
    """Motif-Video image-to-video: its cross-attention cuts 3 image-context tokens off the split encoder stream
    (``encoder_hidden_states[:, 3:]``, and its mask alike) and attends to the rest as keys: gathered there."""
    from fixtures.dits import CASES

    case = CASES["motif_video:second"]
    block, args, kwargs = first_block_inputs(case.build(), "transformer_blocks", case.inputs(torch.Generator()))
    _, roles = probe(block, args, kwargs)
    assert roles.gathered == (("cross_attn", 1, 1), ("cross_attn", 2, 3))  # encoder_hidden_states, the mask's keys
    video = roles.attention[0][0][0]
    assert roles.attention[1] == ((video,), ())  # the cross-attention: split video queries over whole keys


class _CutQueries:
    """A processor that cuts 3 tokens off its queries' own sequence by a count before attending."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = hidden_states[:, 3:]
        q, k, v = (f(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        return attn.to_out[0](torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class _CutBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn = Attention(query_dim=8, heads=2, dim_head=4, processor=_CutQueries())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.attn(hidden_states)


def test_tokens_an_attention_layer_cuts_by_a_count_and_takes_queries_from_stay_refused() -> None:
    """Only tokens a layer takes as keys only are gathered for it: cut queries would be every rank's own cut."""
    with pytest.raises(ProbeError, match=r"_CutBlock: it cuts \w+ - 3 of the \w+ tokens of a split sequence by a count"):
        probe(_CutBlock(), (torch.randn(BATCH, 10, 8),), {})


def test_a_child_without_attention_that_cuts_tokens_by_a_count_runs_on_the_whole_sequence() -> None:
    """NucleusMoE's expert-choice MoE: each expert takes its top ``capacity`` tokens of the whole sequence, a cut by a
    count inside the block's ``img_mlp``. Its two token inputs are gathered where they enter it and this rank's rows
    are taken of its output; the block's attention stays split."""
    from fixtures.dits import CASES

    case = CASES["nucleusmoe"]
    model = case.build()
    block, args, kwargs = first_block_inputs(model, "transformer_blocks", case.inputs(torch.Generator()))
    moe = model.transformer_blocks[1]  # the first block is dense
    assert moe.moe_enabled and not block.moe_enabled
    _, roles = probe(moe, args, kwargs)
    assert roles.gathered == (("img_mlp", 0, 1), ("img_mlp", 1, 1))  # hidden_states, hidden_states_unmodulated
    assert roles.localized == (("img_mlp", 0, 1),)  # its one output, along its tokens
    image = roles.inputs[0][0].parts
    assert roles.attention[0][0] == image  # split image queries, as in the dense block


class _TopTokens(torch.nn.Module):
    """Keeps the 2 tokens of largest norm, scaled, and zeros the rest: a cut by a count over all tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = x.norm(dim=-1).topk(2, dim=1).indices
        picked = torch.zeros_like(x).scatter(1, top[..., None].expand(-1, -1, x.shape[-1]), 2.0)
        return x * picked[:, : x.shape[1]]


class _OwnCutBlock(torch.nn.Module):
    def __init__(self, in_child: bool) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn = Attention(query_dim=8, heads=2, dim_head=4)
        self.top = _TopTokens() if in_child else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.attn(hidden_states)
        if self.top is not None:
            return self.top(x)
        n = math.ceil(x.shape[1] / 4)  # the block's own forward keeps a count of tokens
        return torch.cat([x[:, :n] * 2, x[:, n:]], 1)


class _TopTokensFlat(_TopTokens):
    """The same top 2, returned with batch and tokens flattened together: no dimension of what it returns is the
    tokens it was given, so this rank's rows of it cannot be taken."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).flatten(0, 1)


class _OwnTopBlock(_OwnCutBlock):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _TopTokens.forward(self, self.attn(hidden_states))  # the same top-2 of all tokens, in its own forward


def test_a_cut_by_a_count_or_a_top_k_in_the_blocks_own_forward_stays_refused_and_in_a_child_is_run_whole() -> None:
    """A child without attention can take the whole sequence (gathered where it enters, this rank's rows where it
    returns); the block's own forward cannot, as its attention runs on the split."""
    x = torch.randn(BATCH, 10, 8)
    with pytest.raises(ProbeError, match=r"_OwnCutBlock: it cuts .* of the \w+ tokens of a split sequence by a count"):
        probe(_OwnCutBlock(in_child=False), (x,), {})
    with pytest.raises(ProbeError, match=r"_OwnTopBlock: it takes a topk over split tokens"):
        probe(_OwnTopBlock(in_child=False), (x,), {})
    _, roles = probe(_OwnCutBlock(in_child=True), (x,), {})  # a top-k over tokens alone, no cut: a statistic
    assert roles.gathered == (("top", 0, 1),) and roles.localized == (("top", 0, 1),)
    flat = _OwnCutBlock(in_child=True)
    flat.top = _TopTokensFlat()
    with pytest.raises(ProbeError, match=r"_OwnCutBlock: it takes a topk over split tokens"):
        probe(flat, (x,), {})


class FlexBlock(torch.nn.Module):
    """Self-attention through diffusers' flex backend with a BlockMask, its tokens padded to the mask's block size
    as processors do for flex attention: zeros appended (AnyFlow-FAR) or ``F.pad`` to the rounded length (Qwen-Image
    2.1). ``built``: the mask is made from the tokens' own block means (NABLA's pattern) instead of passed in."""

    def __init__(self, pad: str = "cat", built: bool = False) -> None:
        super().__init__()
        self.pad, self.built = pad, built

    def forward(self, hidden_states: torch.Tensor, block_mask: Any = None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from torch.nn.attention.flex_attention import BlockMask

        q = hidden_states.unflatten(-1, (2, -1))
        tokens = q.shape[1]
        if self.pad == "cat":
            extra = int(math.ceil(tokens / 128.0) * 128.0 - tokens)
            q = torch.cat([q, q.new_zeros(q.shape[0], extra, *q.shape[2:])], 1)
        else:
            q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, int(math.ceil(tokens / 128) * 128) - tokens))
        if self.built:
            means = q.unflatten(1, (-1, 128)).mean(2).transpose(1, 2)  # (B, H, blocks, D)
            order = (means @ means.transpose(-1, -2)).argsort(-1, descending=True).to(torch.int32)
            block_mask = BlockMask.from_kv_blocks(torch.ones_like(order[..., 0]), order, BLOCK_SIZE=128)
        out = dispatch_attention_fn(q, q, q, attn_mask=block_mask, backend="flex")
        return out[:, :tokens].flatten(2)


def _probe_with_routing(block: torch.nn.Module, *args: Any) -> Any:
    """``probe_block`` as the split runs it: with the attention routing in place, so dispatch calls reach the probe."""
    from cp_plugin.attention.dispatch import AttentionRouting

    names = ["hidden_states", "block_mask"][:len(args)]
    return AttentionRouting().run(None, probe_block, block.forward, args, {}, names, "FlexBlock")


@pytest.mark.parametrize("pad", ["cat", "pad"])
def test_tokens_padded_to_a_block_masks_block_size_are_the_tokens(pad: str) -> None:
    """27 tokens padded to 128 for a BlockMask over the whole sequence: the call attends the split tokens (the zeros
    are left out where the split runs it), by a constant appended or by a pad to a rounded length."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask = create_block_mask(lambda b, h, q, kv: q >= kv, 1, None, 128, 128, device="cpu")
    roles = _probe_with_routing(FlexBlock(pad), torch.randn(2, 27, 16), mask)
    (sequence,) = roles.sequences
    assert roles.inputs == ((TokenDim(1, (sequence,)),), ())
    assert roles.attention == (((sequence,), (sequence,)),)


def test_a_block_mask_built_from_the_tokens_a_rank_holds_is_refused() -> None:
    with pytest.raises(ProbeError, match="BlockMask built inside the block"):
        _probe_with_routing(FlexBlock(built=True), torch.randn(2, 200, 16))


class _CountScaledTop(_CountScaled):
    """Proportional attention (its scale from the token count), then a top-2 of all tokens in a child."""

    def __init__(self) -> None:
        super().__init__(scaled_output=False)
        self.top = _TopTokens()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.top(super().forward(hidden_states))


def test_a_block_that_reads_its_token_count_keeps_the_child_it_runs_whole() -> None:
    """The probe that follows a count read as a number keeps what the first probe found: the child run whole."""
    _, roles = probe(_CountScaledTop(), (torch.randn(BATCH, 8, 8),), {})
    assert roles.gathered == (("top", 0, 1),) and roles.localized == (("top", 0, 1),)
    assert roles.scales  # the attention's scale, at the sequence's count


class _Numbered(torch.nn.Module):
    """Self-attention, then each token's position added: positions numbered from the count of the tokens it holds."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        heads = hidden_states.unflatten(-1, (2, -1)).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(heads, heads, heads).transpose(1, 2).flatten(2)
        return out + torch.arange(hidden_states.shape[1], dtype=out.dtype)[None, :, None]


def test_positions_numbered_inside_a_block_are_refused() -> None:
    """Under a split each rank would number its own tokens from 0: positions must come from before the split."""
    with pytest.raises(ProbeError, match=r"_Numbered: it numbers split tokens \(torch.arange over their count"):
        probe(_Numbered(), (torch.randn(BATCH, 8, 8),), {})
