"""Train the tiny DiTs of ``fixtures.dits`` for a few steps, on one process or under a context-parallel layout.

The loop is what a data-parallel trainer does, written out: each dp rank takes its slice of the
global batch, the model (made context parallel by ``apply_context_parallel``, its derived or own
plan) runs on it whole, the loss is a plain MSE on the gathered output, and gradients are averaged
over every rank (DDP's mean, CP ranks included). Inputs and targets are drawn from per-step seeds,
so every rank and the one-process reference see the same global batch. Losses, first-step
gradients and the weights before and after are returned for comparison. :class:`DiTModule` is the
same training as a plain LightningModule, for the strategy's own run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from exact import quiet_trainer
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from fixtures.dits import BATCH, CASES

STEPS = 3
SGD_LR = 0.05
_MESHES: dict[tuple, Any] = {}  # one mesh per layout in a process: each mesh's process groups hold threads


def _slice(value: Any, dp_rank: int, dp: int) -> Any:
    """This dp rank's samples of a batch input (tensors and per-sample lists with the batch first)."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == BATCH:
        return value.chunk(dp)[dp_rank]
    if isinstance(value, list) and len(value) == BATCH:
        return value[dp_rank * BATCH // dp : (dp_rank + 1) * BATCH // dp]
    return value


def _dense_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                scale: float | None = None, **_: Any) -> torch.Tensor:
    """diffusers' flex backend (``(B, S, H, D)`` layout) as SDPA with the BlockMask's ``mask_mod`` evaluated for every
    (query, key) of the blocks it lists; a query that attends no key gets zeros, as flex attention gives it. (The
    masks of the models here either list every block they reach as partial, or list full blocks where ``mask_mod`` is
    true throughout, as ``create_block_mask`` does, or have no ``mask_mod``: NABLA's.)"""
    from torch.nn.attention.flex_attention import create_mask

    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    rows, cols = attn_mask.BLOCK_SIZE
    listed = attn_mask.to_dense().bool().repeat_interleave(rows, -2).repeat_interleave(cols, -1)
    mask = create_mask(attn_mask.mask_mod, q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
    mask = mask & listed[..., : q.shape[2], : k.shape[2]]
    rows = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~rows, scale=scale)
    return (out * rows).transpose(1, 2)


@contextlib.contextmanager
def flex_as_sdpa() -> Iterator[None]:
    """One process's reference for a model that attends through flex attention, which has no backward on CPU: the
    same attention through SDPA (``_dense_flex``). ``tests/test_every_dit.py`` checks it against flex's forward."""
    from cp_plugin.compat import attention_backends

    backends = attention_backends()
    flex = backends["flex"]
    backends["flex"] = _dense_flex
    try:
        yield
    finally:
        backends["flex"] = flex


def optimizer_for(name: str, params: Any) -> torch.optim.Optimizer:
    # SGD exposes a wrong gradient scale (AdamW normalises it away); eps keeps Adam's rounding small.
    if name == "sgd":
        return torch.optim.SGD(params, lr=SGD_LR)
    return torch.optim.AdamW(params, lr=1e-3, eps=1e-4, weight_decay=0.01)


def train(case_name: str, optimizer: str, layout: dict[str, int] | None = None,
          memory: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``case_name`` for ``STEPS`` steps; ``layout`` (ParallelConfig fields) makes it context parallel,
    ``memory`` (``cp_plugin.memory.apply_memory_options`` arguments) turns memory options on."""
    case = CASES[case_name]
    model = case.build(seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if memory or layout is not None:  # context parallel with no options named: the strategy's defaults
        from cp_plugin.memory import apply_memory_options

        default = "auto" if layout is not None else False  # its hooks in place, taking no call this short
        cp = 1 if layout is None else layout.get("ring_degree", 1) * layout.get("ulysses_degree", 1)
        options = apply_memory_options(model, **{"gradient_checkpointing": False, "tiling": default,
                                                 "tile_tokens": None, "shards": cp, **(memory or {})})
        tiled = memory is not None and memory.get("tiling")
        assert options.paths or not tiled, f"{case_name}: no feed-forward network was tiled"
    dp, dp_rank, world = 1, 0, 1
    if layout is not None:
        from cp_plugin import ParallelConfig
        from cp_plugin.mesh import ParallelMesh
        from cp_plugin.model import apply_context_parallel

        key = tuple(sorted(layout.items()))
        if key not in _MESHES:
            _MESHES[key] = ParallelMesh.build(ParallelConfig(**layout), "cpu")
        mesh = _MESHES[key]
        apply_context_parallel(model, mesh)
        dp, dp_rank, world = mesh.dp_size, mesh.dp_rank, dist.get_world_size()
    opt = optimizer_for(optimizer, model.parameters())
    with flex_as_sdpa() if layout is None else contextlib.nullcontext():
        return _steps(model, case, opt, dp, dp_rank, world, layout is not None and dp > 1, before)


def _steps(model: torch.nn.Module, case: Any, opt: torch.optim.Optimizer, dp: int, dp_rank: int, world: int,
           global_loss: bool, before: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``STEPS`` steps of training ``model`` on this dp rank's share of each step's batch."""
    losses, first_grads = [], None
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        inputs = {k: _slice(v, dp_rank, dp) for k, v in case.inputs(g).items()}
        out = model(**inputs, return_dict=False)[0]
        target = torch.randn(BATCH, *out.shape[1:], generator=g).chunk(dp)[dp_rank]
        loss = F.mse_loss(out, target)
        loss.backward()
        for p in model.parameters():
            if p.grad is not None and world > 1:
                dist.all_reduce(p.grad)
                p.grad /= world
        if global_loss:  # the loss of the global batch, as one process computes it
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss.detach()))
        if first_grads is None:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "grads": first_grads, "before": before, "after": after}


def train_many(cases: list[tuple[str, str, dict[str, int]]]) -> list[dict[str, Any]]:
    """Rank body: several (case, optimizer, layout) runs in one launch, one after another."""
    return [train(*case) for case in cases]


def try_train_many(cases: list[tuple[str, str, dict[str, int]]]) -> list[dict[str, Any]]:
    """Rank body for a sweep: like :func:`train_many`, but a case that raises gives ``{"error": ...}``.

    A case's error comes from the same check on every rank (nothing is communicated before it), so the
    ranks go on to the next case together.
    """
    results = []
    for case in cases:
        try:
            results.append(train(*case))
        except Exception as err:  # noqa: BLE001 - reported per case
            results.append({"error": f"{type(err).__name__}: {err}"})
    return results


def memory_options_on(model: torch.nn.Module) -> dict[str, bool]:
    """Which memory options a model runs with now: its gradient checkpointing, and tiled feed-forward networks."""
    from cp_plugin.tiling import TiledFeedForward

    registries = [m.__dict__["_diffusers_hook"] for m in model.modules() if "_diffusers_hook" in m.__dict__]
    return {"gradient_checkpointing": model.is_gradient_checkpointing,
            "tile_feed_forward": any(isinstance(h, TiledFeedForward) for r in registries for h in r.hooks.values())}


class DiTModule(L.LightningModule):
    """The same training, written for one process as a Lightning user would: step ``i`` draws step ``i``'s inputs."""

    def __init__(self, case_name: str, optimizer: str) -> None:
        super().__init__()
        self.case, self.optimizer_name = CASES[case_name], optimizer
        self.model = self.case.build(seed=0)
        self.losses: list[float] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + self.global_step)  # Lightning shuffles the (dummy) batches
        out = self.model(**self.case.inputs(g), return_dict=False)[0]
        loss = F.mse_loss(out, torch.randn(out.shape, generator=g))
        self.losses.append(float(loss.detach()))
        self.memory = memory_options_on(self.model)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return optimizer_for(self.optimizer_name, self.parameters())


def lightning_train(case_name: str, optimizer: str, layout: dict[str, int]) -> dict[str, Any]:
    """Rank body: fit ``DiTModule`` under ``ContextParallelStrategy(**layout)`` with no other option."""
    from cp_plugin import ContextParallelStrategy

    module = DiTModule(case_name, optimizer)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = quiet_trainer(ContextParallelStrategy(**layout), STEPS)
    trainer.fit(module, DataLoader(torch.arange(STEPS), batch_size=1))
    after = {n: p.full_tensor() if isinstance(p, DTensor) else p.detach().clone() for n, p in module.model.named_parameters()}
    return {"losses": module.losses, "before": before, "after": after, "memory": module.memory,
            "memory_after": memory_options_on(module.model)}


def lightning_train_many(cases: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rank body: several ``lightning_train`` runs in one launch."""
    return [lightning_train(*case) for case in cases]
