"""Activation checkpointing under context parallelism redoes only the communication it must.

A checkpointed block is run again in the backward. Its inputs were split (and, where a block takes
split tokens as keys only, gathered) in the forward; those results are kept for the recompute, so
the recompute sends nothing for them. Its attention runs again, so the attention's forward
exchanges (Ulysses all-to-alls, ring KV rotations, key-mask gathers) happen twice: those, and only
those, may grow. Measured by the bytes cp_plugin's collectives count, per kind, for one training
step with and without the model's gradient checkpointing. With ``checkpoint_policy="save_attention"``
the recompute runs no attention kernel at all (counted as ATen calls in the backward) and sends what
the full recompute sends: the kernels' queries and keys are still needed by their backward.
Exactness of checkpointed training is in ``tests/test_every_dit.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from launcher import run_distributed

# what an attention call sends in its forward: what a recompute repeats
ATTENTION_FORWARD = {"all_to_all", "ring_p2p", "ring_mask", "mask_all_gather"}
# own plan (Flux), derived with refiners (Z-Image), derived with text split then gathered as keys (Kandinsky 5)
CASES = [("flux", {"ulysses_degree": 2}), ("flux", {"ring_degree": 2}), ("zimage", {"ulysses_degree": 2}),
         ("zimage", {"ring_degree": 2}), ("kandinsky5", {"ulysses_degree": 2})]


def sent_by_kind(cases: list[tuple[str, dict[str, int]]]) -> list[dict[str, dict[str, int]]]:
    """Rank body, per case: bytes sent per kind in one training step, plain, with gradient checkpointing and with
    the ``save_attention`` policy, and the attention forward kernels the backward ran (``"kernels in backward"``)."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from cp_plugin import ParallelConfig
    from cp_plugin.comm import COMM_STATS
    from cp_plugin.compat import ATTENTION_FORWARD_KERNELS
    from cp_plugin.memory import apply_memory_options
    from cp_plugin.mesh import ParallelMesh
    from cp_plugin.model import apply_context_parallel
    from fixtures.dits import CASES as DITS

    class KernelCount(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            self.calls += func.overloadpacket in ATTENTION_FORWARD_KERNELS
            return func(*args, **(kwargs or {}))

    meshes: dict[tuple, Any] = {}
    results = []
    for name, layout in cases:
        key = tuple(sorted(layout.items()))
        mesh = meshes.setdefault(key, ParallelMesh.build(ParallelConfig(**layout), "cpu"))
        sent = {}
        kernels = {}
        # save_attention first: a derived plan's blocks are probed (once per process) inside its checkpointed forward
        for variant in ("save_attention", "plain", "checkpointed"):
            model = DITS[name].build(seed=0)
            if variant == "checkpointed":
                model.enable_gradient_checkpointing()  # the model's own call, as a user writes it
            elif variant == "save_attention":
                apply_memory_options(model, gradient_checkpointing=True, tiling=False, tile_tokens=None,
                                     checkpoint_policy="save_attention")
            apply_context_parallel(model, mesh)
            inputs = DITS[name].inputs(torch.Generator().manual_seed(0))
            COMM_STATS.reset()
            out = model(**inputs, return_dict=False)[0]
            with KernelCount() as count:
                F.mse_loss(out, torch.zeros_like(out)).backward()
            sent[variant], kernels[variant] = dict(COMM_STATS.by_kind), count.calls
        results.append({**sent, "kernels in backward": kernels})
    return results


@pytest.mark.timeout(300)
def test_a_recompute_repeats_the_attention_exchanges_and_nothing_else() -> None:
    results = run_distributed(sent_by_kind, 2, CASES, timeout=240)
    for rank, rank_results in enumerate(results):
        for (name, layout), sent in zip(CASES, rank_results, strict=True):
            plain, checkpointed = sent["plain"], sent["checkpointed"]
            what = f"{name} {layout} rank {rank}"
            assert set(plain) & ATTENTION_FORWARD, f"{what}: no attention exchange counted: {plain}"
            assert set(checkpointed) == set(plain), f"{what}: {plain} vs {checkpointed}"
            for kind, nbytes in plain.items():
                expected = 2 * nbytes if kind in ATTENTION_FORWARD else nbytes
                assert checkpointed[kind] == expected, f"{what}: {kind} sent {checkpointed[kind]} bytes, not {expected}"
            assert sent["save_attention"] == checkpointed, f"{what}: save_attention sent {sent['save_attention']}"
            kernels = sent["kernels in backward"]
            # a full recompute runs every attention kernel again; save_attention none, like no checkpointing
            assert kernels["checkpointed"] > 0 and kernels["plain"] == kernels["save_attention"] == 0, f"{what}: {kernels}"
