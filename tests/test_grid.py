"""Which convolutions over the token grid a split can follow with halos, and which it refuses (``cp_plugin/grid.py``).

The halos themselves are verified by training: Sana and Sana-Video reproduce one process under Ulysses and the
ring (``tests/test_every_dit.py``), and dropping the halo rows fails that check (its mutations).
"""

from __future__ import annotations

import pytest
import torch

from cp_plugin.grid import grid_radius
from fixtures.dits import CASES


def test_the_radius_is_what_the_blocks_convolutions_read_around_a_token() -> None:
    sana, video = CASES["sana"].build(), CASES["sana_video"].build()
    assert grid_radius(sana.transformer_blocks[0], "Sana") == 1  # one 3 x 3 depthwise convolution
    assert grid_radius(video.transformer_blocks[0], "Sana-Video") == 2  # 3 x 3 in each frame, then 3 over frames
    pointwise = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.Linear(8, 8))
    assert grid_radius(pointwise, "pointwise") == 0


@pytest.mark.parametrize(("layer", "message"), [
    (torch.nn.GroupNorm(2, 8), r"'0' is a GroupNorm, whose statistics run over every token"),
    (torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), r"stride \(2, 2\).*changes the grid's size"),
    (torch.nn.Conv2d(8, 8, 3), r"padding \(0, 0\).*changes the grid's size"),
    (torch.nn.ConvTranspose2d(8, 8, 3, padding=1), r"ConvTranspose2d.*changes the grid's size"),
])
def test_layers_a_split_grid_cannot_follow_are_refused_saying_why(layer: torch.nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        grid_radius(torch.nn.Sequential(layer), "block 'blocks.0'")
    assert "ring_degree=1, ulysses_degree=1" in str(err.value)
