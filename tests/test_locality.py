"""Between blocks, a split tensor's token dimension is followed through indexing, reshapes and permutations.

``cp_plugin/locality.py`` decides from these where a split tensor keeps its tokens after a model's
own op, and when an op divides or merges them (then it runs on the gathered tensor). The exactness
of whole models that rely on them (Z-Image and Lumina 2 packing samples, Krea 2 and HiDream slicing
streams, DreamLite reshaping tokens into a grid) is checked in ``tests/test_every_dit.py``.
"""

from __future__ import annotations

import pytest
import torch

from cp_plugin.locality import _dim_after_index, _moved_token_dim


@pytest.mark.parametrize("index, expected", [
    (0, 0),  # x[i]: one sample, its tokens now first
    ((0, slice(None, 5)), 0),
    ((slice(None), slice(2, None)), 1),
    ((Ellipsis, 0), 1),  # a feature picked: tokens stay where they were
    ((None, slice(None)), 2),  # a new leading dim
    ((slice(None), 3), None),  # one token picked: no token dimension left
    ((slice(None), torch.tensor([0, 2])), None),  # advanced indexing: not followed
])
def test_the_token_dimension_after_an_index(index: object, expected: int | None) -> None:
    assert _dim_after_index(index, 3, 1) == expected  # x of (batch, tokens, features)


def test_a_reshape_keeps_whole_tokens_and_loses_divided_ones() -> None:
    x = torch.zeros(2, 6, 8)  # tokens in dim 1
    heads = x.view(2, 6, 2, 4)
    assert _moved_token_dim(torch.Tensor.view, x, 1, heads, (x, 2, 6, 2, 4), {}) == 1
    grid = x.view(2, 2, 3, 8)  # the tokens as 2 rows of 3: a grid a convolution would read
    assert _moved_token_dim(torch.Tensor.view, x, 1, grid, (x, 2, 2, 3, 8), {}) is None
    merged = x.reshape(12, 8)  # batch and tokens merged
    assert _moved_token_dim(torch.Tensor.reshape, x, 1, merged, (x, 12, 8), {}) is None


def test_a_permutation_moves_the_token_dimension() -> None:
    x = torch.zeros(2, 6, 8)
    assert _moved_token_dim(torch.Tensor.transpose, x, 1, x.transpose(0, 1), (x, 0, 1), {}) == 0
    assert _moved_token_dim(torch.Tensor.permute, x, 1, x.permute(2, 0, 1), (x, 2, 0, 1), {}) == 2
    assert _moved_token_dim(torch.movedim, x, 1, x.movedim(1, -1), (x, 1, -1), {}) == 2
