"""The attention masks diffusers models build, reduced to what context-parallel attention carries."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from cp_plugin.attention import masks
from cp_plugin.attention.masks import (
    BlockMaskTiles,
    CausalTiles,
    DenseTiles,
    MaskTiles,
    Reach,
    key_padding_mask,
    outer_product,
    whole_sequence_mask,
)


def test_key_padding_masks_in_every_form_become_one_bool_mask() -> None:
    valid = torch.tensor([[True, True, False], [True, False, False]])
    additive = torch.zeros(2, 3).masked_fill(~valid, -10000.0)
    for mask in (valid, valid[:, None], valid[:, None, None], valid[:, None, None].expand(2, 4, 1, 3),
                 additive[:, None], additive[:, None, None].expand(2, 4, 1, 3), valid.float().log()):
        keys, rows = key_padding_mask(mask, batch=2, queries=5, keys=3)
        assert keys.equal(valid) and rows is None, tuple(mask.shape)


def test_a_joint_outer_product_over_local_tokens_becomes_its_key_mask_and_query_rows() -> None:
    valid = torch.tensor([[True, True, True, False]])
    joint = (valid[:, :, None] & valid[:, None, :])[:, None]  # (B, 1, L, L), as HunyuanVideo 1.5 builds it
    keys, rows = key_padding_mask(joint, batch=1, queries=4, keys=4)
    assert keys.equal(valid) and rows.equal(valid)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    assert outer_product(causal[:, 0]) is None
    with pytest.raises(ValueError, match=r"is not a key-padding mask \(nor an outer product of one\)"):
        key_padding_mask(causal, batch=1, queries=4, keys=4)


def test_masks_that_differ_between_heads_or_hold_biases_are_refused() -> None:
    per_head = torch.ones(1, 2, 1, 3, dtype=torch.bool)
    per_head[0, 1, 0, 2] = False
    with pytest.raises(ValueError, match=r"differs between heads"):
        key_padding_mask(per_head, batch=1, queries=3, keys=3)
    with pytest.raises(ValueError, match=r"got other bias values"):
        key_padding_mask(torch.full((1, 3), 0.5), batch=1, queries=3, keys=3)


def test_a_block_causal_mask_over_the_whole_sequence_is_read_in_padded_tiles() -> None:
    frames = torch.arange(5) // 2  # frame blocks of 2 tokens, 5 tokens: padded to 6 on 2 or 3 ranks
    block_causal = (frames[:, None] >= frames[None, :])[None, None]
    with pytest.warns(UserWarning, match=r"5 x 5 attention mask on every rank \(O\(S\^2\) memory\)"):
        keys, tiles, rows = whole_sequence_mask(block_causal, length=5, padded=6)
    assert keys is None and rows is None
    full = tiles.tile((0, 6), (0, 6), torch.device("cpu"))
    assert full.shape == (1, 6, 6)
    assert full[0, :5, :5].equal(block_causal[0, 0]) and not full[0, :, 5].any() and full[0, 5, :5].all()
    for rows_, cols in (((0, 3), (3, 6)), ((3, 6), (0, 3)), ((4, 6), (2, 5)), ((5, 6), (5, 6))):
        assert tiles.tile(rows_, cols, torch.device("cpu")).equal(full[:, slice(*rows_), slice(*cols)]), (rows_, cols)


def test_causal_tiles_are_the_lower_triangle_of_the_whole_sequence() -> None:
    tiles = CausalTiles(7)
    whole = tiles.tile((0, 8), (0, 8), torch.device("cpu"))[0]
    want = torch.ones(8, 8, dtype=torch.bool).tril()
    want[:, 7], want[7, :7] = False, True  # the padded key is masked; the padded query attends every real key
    assert whole.equal(want)
    assert tiles.tile((2, 6), (4, 8), torch.device("cpu"))[0].equal(want[2:6, 4:8])


def test_an_outer_product_over_the_whole_sequence_becomes_a_padded_key_mask_and_query_rows() -> None:
    valid = torch.tensor([[True, True, True, False, True]])
    keys, full, rows = whole_sequence_mask((valid[:, :, None] & valid[:, None, :])[:, None], length=5, padded=6)
    assert full is None and keys.tolist() == [[True, True, True, False, True, False]]
    assert rows.tolist() == [[True, True, True, False, True, True]]  # a padded query attends the real keys


def test_a_block_mask_read_in_tiles_attends_what_flex_attention_attends() -> None:
    """Frame-causal over 200 tokens padded to 256 (full blocks of 16 below the diagonal, partial ones on it): SDPA with
    the mask's tiles put together gives flex attention's output for the real tokens, and any tile is that mask's."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    length, frames = 200, torch.arange(256) // 48

    def frame_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (frames[kv] <= frames[q]) & (q < length) & (kv < length)

    block_mask = create_block_mask(frame_causal, 2, None, 256, 256, device="cpu", BLOCK_SIZE=16)
    assert block_mask.full_kv_num_blocks is not None and int(block_mask.full_kv_num_blocks.sum()) > 0
    q, k, v = (torch.randn(2, 3, 256, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    tiles = BlockMaskTiles(block_mask, length)
    cpu = torch.device("cpu")
    dense = tiles.tile((0, length), (0, length), cpu)
    assert dense.shape == (2, length, length) and not bool(dense.all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex attention uncompiled
        want = flex_attention(q, k, v, block_mask=block_mask)[:, :, :length]
    got = torch.nn.functional.scaled_dot_product_attention(q[:, :, :length], k[:, :, :length], v[:, :, :length],
                                                           attn_mask=dense[:, None])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for rows, cols in (((0, 100), (100, 200)), ((37, 141), (5, 163)), ((150, 200), (0, 60))):  # across block edges
        assert tiles.tile(rows, cols, cpu).equal(dense[:, slice(*rows), slice(*cols)]), (rows, cols)


def test_a_block_mask_per_head_gives_each_heads_tiles() -> None:
    """A BlockMask with a head dim and no ``mask_mod`` (NABLA's: the blocks it lists are all it attends) is read per head,
    and ``for_heads`` keeps the heads a rank holds after Ulysses' exchange."""
    from torch.nn.attention.flex_attention import BlockMask

    listed = torch.tensor([[[[1, 0, 0], [0, 1, 1], [1, 0, 1]], [[1, 1, 0], [0, 1, 0], [0, 1, 1]]]], dtype=torch.bool)
    count = listed.sum(-1).to(torch.int32)
    order = listed.int().argsort(-1, descending=True).to(torch.int32)
    block_mask = BlockMask.from_kv_blocks(torch.zeros_like(count), order, count, order, BLOCK_SIZE=4)
    tiles, cpu = BlockMaskTiles(block_mask, 11), torch.device("cpu")  # 11 tokens: the last block partly real
    want = listed.repeat_interleave(4, -2).repeat_interleave(4, -1)[..., :11, :11]
    assert tiles.tile((0, 11), (0, 11), cpu).equal(want)
    assert tiles.tile((3, 9), (2, 11), cpu).equal(want[..., 3:9, 2:11])
    second = tiles.for_heads(1, 2)
    assert second.tile((0, 12), (5, 12), cpu).shape == (1, 1, 12, 7)
    assert second.tile((0, 11), (5, 11), cpu).equal(want[:, 1:, :, 5:])
    padded = second.tile((8, 12), (0, 12), cpu)[0, 0]
    assert not padded[:, 11].any() and padded[3, :11].all()  # the padded key is masked; the padded query attends all


def _frame_causal_tiles(kind: str) -> MaskTiles:
    """Frames of 48 tokens over 200 real tokens, as tiles of each kind (blocks of 16)."""
    from torch.nn.attention.flex_attention import create_block_mask

    length, frames = 200, torch.arange(256) // 48
    if kind == "causal":
        return CausalTiles(length)
    if kind == "dense":
        return DenseTiles((frames[:length, None] >= frames[None, :length])[None])

    def frame_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (frames[kv] <= frames[q]) & (q < length) & (kv < length)

    return BlockMaskTiles(create_block_mask(frame_causal, 1, None, 256, 256, device="cpu", BLOCK_SIZE=16), length)


@pytest.mark.parametrize("kind", ["causal", "dense", "block mask"])
def test_tiles_that_attend_nothing_or_everything_are_known_without_reading_them(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``reach`` says NONE only of a tile with no attended pair and ALL only of one whose pairs are all attended (so a
    ring may skip the one and run the other without a mask), and for tiles on the mask's 16-token blocks it says
    which, never the undecided SOME where the tile is empty or full; padded rows and keys (past 200) included."""
    monkeypatch.setattr(masks, "DENSE_BLOCK", 16)
    tiles, cpu = _frame_causal_tiles(kind), torch.device("cpu")
    edges = [0, 16, 37, 48, 96, 101, 144, 192, 200, 208, 224]
    decided = {Reach.NONE: 0, Reach.ALL: 0}
    for rows in zip(edges, edges[1:]):
        for first in range(len(edges) - 1):
            for cols in ((edges[first], edges[later]) for later in range(first + 1, len(edges))):
                tile, reach = tiles.tile(rows, cols, cpu), tiles.reach(rows, cols)
                aligned = all(edge % 16 == 0 for edge in (*rows, *cols)) and max(rows[1], cols[1]) <= 192
                if reach is Reach.NONE or (aligned and not tile.any()):
                    assert reach is Reach.NONE and not tile.any(), (rows, cols, reach)
                elif reach is Reach.ALL or (aligned and tile.all()):
                    assert reach is Reach.ALL and tile.all(), (rows, cols, reach)
                decided[reach] = decided.get(reach, 0) + 1
    assert decided[Reach.NONE] > 10 and decided[Reach.ALL] > 10, decided


def test_a_block_mask_per_head_is_skipped_only_where_every_head_held_attends_nothing() -> None:
    from torch.nn.attention.flex_attention import BlockMask

    listed = torch.tensor([[[[1, 0, 0], [0, 1, 1], [1, 0, 1]], [[1, 1, 0], [0, 1, 0], [0, 1, 1]]]], dtype=torch.bool)
    count = listed.sum(-1).to(torch.int32)
    order = listed.int().argsort(-1, descending=True).to(torch.int32)
    tiles = BlockMaskTiles(BlockMask.from_kv_blocks(torch.zeros_like(count), order, count, order, BLOCK_SIZE=4), 12)
    assert tiles.reach((0, 4), (4, 8)) is Reach.SOME  # head 1 attends it, head 0 does not
    assert tiles.for_heads(0, 1).reach((0, 4), (4, 8)) is Reach.NONE
    assert tiles.for_heads(1, 2).reach((0, 4), (4, 8)) is Reach.ALL
    assert tiles.reach((4, 8), (4, 8)) is Reach.ALL and tiles.reach((0, 8), (8, 12)) is Reach.SOME
    assert tiles.reach((0, 4), (8, 12)) is Reach.NONE
