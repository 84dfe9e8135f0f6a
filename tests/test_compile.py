"""``torch.compile`` of transformer blocks composes with context parallelism.

Context-parallel attention is a compile boundary (the ring's point-to-point exchange is not
traceable): each compiled block graph-breaks around it and compiles everything else. Loss and
gradients must equal an uncompiled single-process model, and dynamo's own counters must show that
the blocks did compile, breaking nowhere but at the attention calls: equal numbers alone would also
come from blocks that silently ran eagerly.
"""

from __future__ import annotations

from typing import Any

import pytest
from exact import assert_close_rel
from launcher import run_distributed

# A block's attention call sits two frames deep, in the block's forward and in the attention
# processor's __call__ (Attention.forward only passes it on); the call splits each of them into the
# graph before it and the graph after it: 4 graphs per block.
GRAPHS_PER_BLOCK = 4
CP_ATTENTION = "_routed_attention"  # cp_plugin.attention.dispatch: the torch.compiler.disable'd entry point


def compiled_blocks_step(layout: dict[str, int]) -> dict[str, Any]:
    """Rank body: one forward+backward of tiny Flux with compiled blocks under ``layout``.

    Returns the loss, the mean gradients, and dynamo's counters: graphs compiled, graph-break
    reasons, frames traced and frames that compiled.
    """
    import torch.distributed as dist
    from exact import FlowMatchingModule, SyntheticFlowData
    from torch._dynamo.utils import counters
    from torch.utils.data import default_collate

    from cp_plugin import ParallelConfig, ParallelMesh
    from cp_plugin.model import apply_context_parallel

    module = FlowMatchingModule("flux")
    apply_context_parallel(module, ParallelMesh.build(ParallelConfig(**layout), "cpu"))
    blocks = [*module.transformer.transformer_blocks, *module.transformer.single_transformer_blocks]
    for block in blocks:
        block.compile()
    counters.clear()
    batch = default_collate([SyntheticFlowData("flux", seq_tokens=63)[i] for i in range(2)])  # padded too
    loss = module.loss(batch)
    loss.backward()
    grads = {}
    for name, param in module.transformer.named_parameters():
        dist.all_reduce(param.grad)  # what DDP does: the mean over ranks is the full gradient
        grads[name] = param.grad / dist.get_world_size()
    return {"loss": loss.item(), "grads": grads, "blocks": len(blocks), "graphs": counters["stats"]["unique_graphs"],
            "breaks": dict(counters["graph_break"]), "frames": dict(counters["frames"])}


def check_compiled(result: dict[str, Any]) -> None:
    """Every block compiled, in the graphs its attention call splits it into, breaking only there."""
    graphs, blocks, frames = result["graphs"], result["blocks"], result["frames"]
    assert graphs == GRAPHS_PER_BLOCK * blocks, f"{graphs} graphs for {blocks} compiled blocks"
    assert frames["total"] == frames["ok"] > 0, f"frames that fell back to eager: {frames}"
    assert result["breaks"], "no graph break: context-parallel attention was traced into a graph"
    elsewhere = [reason[:300] for reason in result["breaks"] if CP_ATTENTION not in reason]
    assert not elsewhere, f"graph breaks outside context-parallel attention: {elsewhere}"


@pytest.mark.timeout(300)
def test_compiled_blocks_under_ring_match_one_uncompiled_process() -> None:
    from exact import FlowMatchingModule, SyntheticFlowData
    from torch.utils.data import default_collate

    results = run_distributed(compiled_blocks_step, 2, {"ring_degree": 2})
    reference = FlowMatchingModule("flux")
    loss = reference.loss(default_collate([SyntheticFlowData("flux", seq_tokens=63)[i] for i in range(2)]))
    loss.backward()
    for r in results:
        check_compiled(r)
        assert abs(r["loss"] - loss.item()) <= 1e-6 * abs(loss.item())
        for name, param in reference.transformer.named_parameters():
            assert_close_rel(r["grads"][name], param.grad, 1e-5, f"compiled grad {name}")
