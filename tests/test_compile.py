"""``torch.compile`` of transformer blocks composes with context parallelism.

Context-parallel attention is a compile boundary (the ring's point-to-point exchange is not
traceable): each compiled block graph-breaks around it and compiles everything else. Loss and
gradients must equal an uncompiled single-process model.
"""

from __future__ import annotations

import pytest

from exact import assert_close_rel
from launcher import run_distributed


def compiled_blocks_step(layout: dict[str, int]) -> dict[str, object]:
    """Rank body: one forward+backward of tiny Flux with compiled blocks under ``layout``; mean gradients."""
    import torch.distributed as dist
    from torch.utils.data import default_collate

    from cp_plugin import ParallelConfig, ParallelMesh
    from cp_plugin.model import apply_context_parallel
    from exact import FlowMatchingModule, SyntheticFlowData

    module = FlowMatchingModule("flux")
    apply_context_parallel(module, ParallelMesh.build(ParallelConfig(**layout), "cpu"))
    for block in [*module.transformer.transformer_blocks, *module.transformer.single_transformer_blocks]:
        block.compile()
    batch = default_collate([SyntheticFlowData("flux", seq_tokens=63)[i] for i in range(2)])  # padded too
    loss = module.loss(batch)
    loss.backward()
    grads = {}
    for name, param in module.transformer.named_parameters():
        dist.all_reduce(param.grad)  # what DDP does: the mean over ranks is the full gradient
        grads[name] = param.grad / dist.get_world_size()
    return {"loss": loss.item(), "grads": grads}


@pytest.mark.timeout(300)
def test_compiled_blocks_under_ring_match_one_uncompiled_process() -> None:
    from torch.utils.data import default_collate

    from exact import FlowMatchingModule, SyntheticFlowData

    results = run_distributed(compiled_blocks_step, 2, {"ring_degree": 2})
    reference = FlowMatchingModule("flux")
    loss = reference.loss(default_collate([SyntheticFlowData("flux", seq_tokens=63)[i] for i in range(2)]))
    loss.backward()
    for r in results:
        assert abs(r["loss"] - loss.item()) <= 1e-6 * abs(loss.item())
        for name, param in reference.transformer.named_parameters():
            assert_close_rel(r["grads"][name], param.grad, 1e-5, f"compiled grad {name}")
