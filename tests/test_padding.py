"""Mixed resolutions: every batch its own length, none of them a multiple of the CP size, still exact.

Users bucket samples by resolution or duration, so consecutive batches (and the batches of the dp
ranks in one step) have different sequence lengths. Each batch is padded on its own; the weights
after 3 steps must equal one process trained on the same unpadded batches. Odd lengths of every
model and layout are covered in ``test_strategy_exact.py``; the unit tests below pin the mask.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from exact import FlowMatchingModule, SyntheticFlowData, assert_close_rel, quiet_trainer
from launcher import run_distributed
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cp_plugin.padding import SequencePadding

LENGTHS = [1001, 1024, 998, 961, 1003, 1000]  # one bucket per batch; cp 2 and 4 pad all but 1024 and 1000
STEPS, PER_BATCH, OPTIMIZER = 3, 2, "sgd"


class BucketedFlowData(Dataset):
    """Each item is a whole batch of one bucket (a loader with ``batch_size=None``), lengths differ.

    Lightning's DistributedSampler deals the batches to dp ranks, so the ranks of one step differ too.
    """

    def __init__(self) -> None:
        self.batches = [SyntheticFlowData("flux", size=PER_BATCH, seed=i, seq_tokens=n)[:] for i, n in enumerate(LENGTHS)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


def bucketed_run(layout: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rank body: Lightning fit on bucketed batches; the final weights."""
    from cp_plugin import ContextParallelStrategy

    module = FlowMatchingModule("flux", OPTIMIZER)
    trainer = quiet_trainer(ContextParallelStrategy(**layout), STEPS)
    trainer.fit(module, DataLoader(BucketedFlowData(), batch_size=None, shuffle=True))
    return module.transformer.state_dict()


def bucketed_runs(layouts: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    return [bucketed_run(layout) for layout in layouts]


def reference_weights(dp: int) -> dict[str, torch.Tensor]:
    """One process: each step averages the loss of the batches the dp ranks drew, as DDP averages gradients."""
    data = BucketedFlowData()
    orders = [list(DistributedSampler(data, num_replicas=dp, rank=r, shuffle=True, seed=0)) for r in range(dp)]
    module = FlowMatchingModule("flux", OPTIMIZER)
    opt = module.configure_optimizers()
    for step in range(STEPS):
        loss = sum(module.loss(data[order[step]]) for order in orders) / dp
        loss.backward()
        opt.step()
        opt.zero_grad()
    return module.transformer.state_dict()


@pytest.mark.timeout(300)
def test_batches_of_mixed_lengths_match_one_process() -> None:
    layouts = [{"ring_degree": 2}, {"ring_degree": 2, "ulysses_degree": 2}]  # dp 2 x ring 2; ring 2 x ulysses 2
    results = run_distributed(bucketed_runs, 4, layouts, init_process_group=False)
    for i, (layout, dp) in enumerate(zip(layouts, (2, 1))):
        expected = reference_weights(dp)
        for rank, states in enumerate(results):
            for name, value in expected.items():
                assert_close_rel(states[i][name], value, 1e-5, f"{layout} rank {rank} weight {name}")


def test_key_mask_marks_this_ranks_padding_in_image_text_and_joint_keys() -> None:
    cpu = torch.device("cpu")
    last = SequencePadding(cp_size=4, cp_rank=3, joints=[("text", "image")])
    x = last.pad(torch.ones(1, 1001, 2), 1, "hidden_states", "test")
    assert x.shape == (1, 1004, 2) and x[:, 1001:].abs().sum() == 0
    mask = last.key_mask(251, batch=2, device=cpu)  # self-attention: 251 local image tokens, 3 of them padding
    assert mask.shape == (2, 251) and mask[:, :248].all() and not mask[:, 248:].any()
    last.pad(torch.ones(1, 7, 2), 1, "encoder_hidden_states", "test")  # 7 text tokens -> 8: 2 per rank, 1 real here
    joint = last.key_mask(2 + 251, batch=1, device=cpu)  # text first, then image
    assert joint.tolist() == [[True, False] + [True] * 248 + [False] * 3]
    assert last.key_mask(2, batch=1, device=cpu).tolist() == [[True, False]]  # cross-attention to split text
    first = SequencePadding(4, 0)
    first.pad(torch.ones(1, 1001, 2), 1, "hidden_states", "test")
    assert first.key_mask(251, 1, cpu).all()
    assert last.trim(torch.zeros(1, 1004), 1).shape == (1, 1001)
    assert last.trim(torch.zeros(1, 8), 1).shape == (1, 7)
    last.reset()
    assert last.key_mask(251, 1, cpu) is None
    with pytest.raises(ValueError, match=r"got 5 keys per rank, which is neither one stream's local tokens"):
        first.key_mask(5, 1, cpu)


def test_a_stream_that_would_tie_with_an_earlier_one_gets_one_more_token_per_rank() -> None:
    padding = SequencePadding(cp_size=2, cp_rank=1)
    padding.pad(torch.ones(1, 8, 2), 1, "hidden_states", "test")  # 4 image tokens per rank, all real
    text = padding.pad(torch.ones(1, 7, 2), 1, "encoder_hidden_states", "test")  # 8 would tie: 10, 5 per rank
    assert text.shape == (1, 10, 2) and padding.local_length(7) == 5
    assert padding.key_mask(4, 1, torch.device("cpu")) is None  # the image keys hold no padding: no mask
    assert padding.key_mask(5, 1, torch.device("cpu")).tolist() == [[True, True, False, False, False]]
    assert padding.trim(torch.zeros(1, 10), 1).shape == (1, 7) and padding.trim(torch.zeros(1, 8), 1).shape == (1, 8)


def test_whichever_stream_comes_second_is_the_one_padded_further() -> None:
    padding = SequencePadding(cp_size=2, cp_rank=1)
    padding.pad(torch.ones(1, 7, 2), 1, "encoder_hidden_states", "test")  # text first: 8, 4 per rank
    padding.pad(torch.ones(1, 8, 2), 1, "hidden_states", "test")  # the image would tie at 4: 10, 5 per rank
    assert padding.composition(4) == ("text",) and padding.composition(5) == ("image",)
    assert padding.key_mask(4, 1, torch.device("cpu")).tolist() == [[True, True, True, False]]
    assert padding.key_mask(5, 1, torch.device("cpu")).tolist() == [[True, True, True, False, False]]


def test_streams_of_equal_length_share_their_padding_and_a_third_avoids_their_sum() -> None:
    padding = SequencePadding(cp_size=2, cp_rank=0)
    padding.register("a", 8, "test")
    padding.register("b", 8, "test")  # the same length: the same mask, no extra token
    padding.register("c", 16, "test")  # 8 per rank would equal a + b: 10 per rank
    assert [padding.local_stream(s) for s in "abc"] == [4, 4, 9]


def test_two_sequences_split_under_one_name_are_kept_apart() -> None:
    """Helios splits history + chunk tokens for self-attention and the chunk alone for cross-attention."""
    padding = SequencePadding(cp_size=2, cp_rank=1)
    padding.pad(torch.zeros(1, 7, 4), 1, "hidden_states", "Model.blocks.0.attn1")
    padding.pad(torch.zeros(1, 5, 4), 1, "hidden_states", "Model.blocks.0.attn2")
    assert padding.composition(4) == ("image",) and padding.composition(3) == ("image (Model.blocks.0.attn2)",)
    assert padding.key_mask(3, 1, torch.device("cpu")).tolist() == [[True, True, False]]  # tokens 3, 4 and padding
