"""Activation checkpointing under context parallelism redoes only the communication it must.

A checkpointed block is run again in the backward. Its inputs were split (and, where a block takes
split tokens as keys only, gathered) in the forward; those results are kept for the recompute, so
the recompute sends nothing for them. Its attention runs again, so the attention's forward
exchanges (Ulysses all-to-alls, ring KV rotations, key-mask gathers) happen twice: those, and only
those, may grow. Measured by the bytes cp_plugin's collectives count, per kind, for one training
step with and without the model's gradient checkpointing. Exactness of checkpointed training is in
``tests/test_every_dit.py``.
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
    """Rank body: bytes sent per kind in one training step, plain and with gradient checkpointing, per case."""
    import torch.nn.functional as F

    from cp_plugin import ParallelConfig
    from cp_plugin.comm import COMM_STATS
    from cp_plugin.mesh import ParallelMesh
    from cp_plugin.model import apply_context_parallel
    from fixtures.dits import CASES as DITS

    meshes: dict[tuple, Any] = {}
    results = []
    for name, layout in cases:
        key = tuple(sorted(layout.items()))
        mesh = meshes.setdefault(key, ParallelMesh.build(ParallelConfig(**layout), "cpu"))
        sent = {}
        for checkpointing in (False, True):
            model = DITS[name].build(seed=0)
            if checkpointing:
                model.enable_gradient_checkpointing()
            apply_context_parallel(model, mesh)
            inputs = DITS[name].inputs(torch.Generator().manual_seed(0))
            COMM_STATS.reset()
            out = model(**inputs, return_dict=False)[0]
            F.mse_loss(out, torch.zeros_like(out)).backward()
            sent["checkpointed" if checkpointing else "plain"] = dict(COMM_STATS.by_kind)
        results.append(sent)
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
