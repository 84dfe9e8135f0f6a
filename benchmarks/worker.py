"""One benchmark rank, launched by ``torchrun`` (so you can rerun it unchanged on your own cluster).

For every sequence length and layout it builds the same seeded wide-ish Flux DiT, runs a
forward+backward step on the same global tokens and records, per rank: step time (median of
repeats, every step bounded by barriers so it is the slowest rank's), bytes of saved activations,
peak bytes allocated during the step, bytes sent at cp_plugin's collectives, and the error of
outputs and gradients against the single-process reference (written by the ``single`` layout,
which must run first, on one process; by ``single+lora`` for layouts with adapters).

Each layout runs one of two paths, named in its record:

- ``module``: what a LightningModule written for one process does: full inputs in, the output
  gathered, the same loss on the full output on every rank (diffusers' CP only runs this path);
- ``sharded``: the batch arrives sharded (``shard_batch``), the model returns local shards and the
  loss is taken on local tokens: no rank ever holds the full sequence.

A layout name may end in ``+ckpt`` (the model's own gradient checkpointing), ``+sac`` (checkpointing
that keeps the attention kernels' outputs: ``checkpoint_policy="save_attention"``) and/or ``+tile``
(tiled feed-forward networks, ``cp_plugin.tiling``: ``tile_feed_forward=True``) or ``+autotile`` (the
default, ``tile_feed_forward="auto"``; every other layout turns tiling off) and/or ``+lora`` (a frozen
base with trained rank-4 LoRA adapters on the attention and MLP layers, as a fine-tune has: ``LORA``);
``--blocks N`` gives the model N double-stream and N single-stream blocks, so that the inputs each block
keeps for the backward count.

``--search-mib B`` instead searches, per layout, the longest sequence whose measured step peak
stays within ``B`` MiB on every rank (probing lengths and measuring each; see :func:`search`).

    torchrun --nproc-per-node 2 -m benchmarks.worker --layouts ulysses ring_p2p --seq 1024 4096 --out raw.jsonl
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.measure import PeakMemory, count_saved_activations, phase, time_steps
from cp_plugin import ParallelConfig, ParallelMesh
from cp_plugin.comm import COMM_STATS
from cp_plugin.memory import apply_memory_options, apply_tiling, tiles_for
from cp_plugin.model import apply_context_parallel
from cp_plugin.tiling import MIN_TILED_TOKENS
from fixtures.models import tiny_flux
from recipe.lora import LoraSettings, add_lora

WIDE_FLUX = {"num_attention_heads": 4, "attention_head_dim": 64, "in_channels": 64, "joint_attention_dim": 64,
             "pooled_projection_dim": 64, "axes_dims_rope": (16, 24, 24)}
TEXT_TOKENS = 64
PRESHARDED = ("hidden_states", "encoder_hidden_states", "img_ids", "txt_ids")


@dataclass(frozen=True)
class Layout:
    """How one sequence is split (cp_plugin's ring x ulysses and rotate method, or diffusers' own
    hooks) and which path the step takes (``module`` or ``sharded``, see the module docstring)."""

    name: str
    ring: int
    ulysses: int
    rotate_method: str = "p2p"
    diffusers: bool = False
    path: str = "module"
    checkpointing: bool = False  # the model's own gradient checkpointing (name suffix "+ckpt")
    checkpoint_policy: str = "full"  # "save_attention" with the name suffix "+sac" (which implies checkpointing)
    # cp_plugin's tiled feed-forward networks, chunks chosen per call: True (name suffix "+tile"), "auto" ("+autotile")
    tiling: bool | str = False
    blocks: int = 1  # double-stream and single-stream blocks each
    lora: bool = False  # a frozen base with LoRA adapters (name suffix "+lora")


def layout_named(layouts: dict[str, Layout], name: str, blocks: int = 1) -> Layout:
    """``layouts[base]`` for a name ``base[+ckpt|+sac][+tile|+autotile][+lora]``, with those options and ``blocks``
    blocks."""
    base, *options = name.split("+")
    unknown = set(options) - {"ckpt", "sac", "tile", "autotile", "lora"}
    if base not in layouts or unknown:
        raise ValueError(f"layout {name!r}: use one of {', '.join(layouts)}, optionally with +ckpt or +sac, "
                         "and/or +tile or +autotile, and/or +lora")
    tiling = "auto" if "autotile" in options else "tile" in options
    return replace(layouts[base], name=name, checkpointing=bool({"ckpt", "sac"} & set(options)),
                   checkpoint_policy="save_attention" if "sac" in options else "full", tiling=tiling,
                   blocks=blocks, lora="lora" in options)


def layouts_for(world: int) -> dict[str, Layout]:
    """Layouts by name; ``<layout>/module`` and ``<layout>/sharded`` run cp_plugin's two paths."""
    splits = {"ulysses": (1, world, "p2p"), "ring_p2p": (world, 1, "p2p"), "ring_allgather": (world, 1, "allgather"),
              "ring_x_ulysses": (2, max(world // 2, 1), "p2p")}
    layouts = {"single": Layout("single", 1, 1),
               "diffusers_ulysses": Layout("diffusers_ulysses", 1, world, diffusers=True),
               "diffusers_ring": Layout("diffusers_ring", world, 1, diffusers=True)}
    for split, (ring, ulysses, rotate) in splits.items():
        for path in ("module", "sharded"):
            layouts[f"{split}/{path}"] = Layout(f"{split}/{path}", ring, ulysses, rotate, path=path)
    return layouts


def flux_inputs(seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-sequence inputs and target, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    side = int(seq**0.5)
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    text = torch.randn(1, TEXT_TOKENS, WIDE_FLUX["joint_attention_dim"], generator=g)
    return {
        "hidden_states": torch.randn(1, seq, WIDE_FLUX["in_channels"], generator=g),
        "encoder_hidden_states": text,
        "pooled_projections": text.mean(1),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.stack([torch.zeros_like(y), y, x], -1).reshape(-1, 3).float(),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "target": torch.randn(1, seq, WIDE_FLUX["in_channels"], generator=g),
    }


def shard_inputs(inputs: dict[str, torch.Tensor], mesh: ParallelMesh) -> dict[str, torch.Tensor]:
    """What a sharded dataloader hands each rank: its own copy of its slice of every sequence tensor."""
    dims = {"hidden_states": 1, "encoder_hidden_states": 1, "img_ids": 0, "txt_ids": 0, "target": 1}
    return {k: v.chunk(mesh.cp_size, dims[k])[mesh.cp_rank].clone() if k in dims else v for k, v in inputs.items()}


def apply_diffusers_cp(model: torch.nn.Module, layout: Layout) -> None:
    """diffusers' own context parallelism, by the manual path (``enable_parallelism`` fails on CPU)."""
    from diffusers import ContextParallelConfig
    from diffusers import ParallelConfig as DiffusersParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel as diffusers_apply
    from torch.distributed.device_mesh import init_device_mesh

    from cp_plugin.plans import attention_modules

    config = DiffusersParallelConfig(
        context_parallel_config=ContextParallelConfig(ring_degree=layout.ring, ulysses_degree=layout.ulysses)
    )
    mesh = init_device_mesh("cpu", (layout.ring, layout.ulysses), mesh_dim_names=("ring", "ulysses"))
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    for _, attn in attention_modules(model):
        attn.processor._parallel_config = config
    diffusers_apply(model, config.context_parallel_config, model._cp_plan)


# The adapters of ``+lora`` layouts: the attention's layers and the MLPs' (Flux's inline MLP: proj_mlp, proj_out).
LORA = LoraSettings(rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out",
                                                     "ff.net.0.proj", "ff.net.2"])


def build(layout: Layout) -> tuple[torch.nn.Module, ParallelMesh | None]:
    """The seeded model, made context parallel as ``layout`` says; the mesh for cp_plugin layouts."""
    model = tiny_flux(**WIDE_FLUX, num_layers=layout.blocks, num_single_layers=layout.blocks)
    if layout.lora:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            add_lora(model, LORA)
            with torch.no_grad():  # trained adapters: non-zero, so every adapter has a gradient to compare
                for name, weight in model.named_parameters():
                    if "lora_B" in name:
                        weight.normal_(0, 0.02)
    apply_memory_options(model, gradient_checkpointing=layout.checkpointing, checkpoint_policy=layout.checkpoint_policy,
                         tiling=layout.tiling, tile_tokens=None, shards=layout.ring * layout.ulysses)
    if layout.ring * layout.ulysses == 1:
        return model, None
    if layout.diffusers:
        apply_diffusers_cp(model, layout)
        return model, None
    mesh = ParallelMesh.build(
        ParallelConfig(ring_degree=layout.ring, ulysses_degree=layout.ulysses, rotate_method=layout.rotate_method), "cpu"
    )
    if layout.path == "sharded":
        apply_context_parallel(model, mesh, presharded_inputs=PRESHARDED, gather_outputs=False)
    else:
        apply_context_parallel(model, mesh)
    return model, mesh


def inputs_for(layout: Layout, seq: int, mesh: ParallelMesh | None) -> dict[str, torch.Tensor]:
    """Full inputs on every rank (``module`` path), or this rank's shards of them (``sharded``)."""
    inputs = flux_inputs(seq)
    return shard_inputs(inputs, mesh) if layout.path == "sharded" and mesh is not None else inputs


def step_fn(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    kwargs = {k: v for k, v in inputs.items() if k != "target"}

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        out = model(**kwargs, return_dict=False)[0]
        F.mse_loss(out, inputs["target"]).backward()
        return out.detach()

    return step


def reference_path(out_dir: Path, seq: int, lora: bool = False) -> Path:
    return out_dir / f"reference_flux{'_lora' if lora else ''}_{seq}.pt"


def exactness(model: torch.nn.Module, out: torch.Tensor, layout: Layout, mesh: ParallelMesh | None, ref: dict) -> dict:
    """Max relative error of this rank's output and of the assembled gradient vs one process."""
    if mesh is not None:  # cp_plugin: the sum over the CP group is the gradient of cp x the global loss
        sharded = layout.path == "sharded"
        expected_out = ref["out"].chunk(mesh.cp_size, 1)[mesh.cp_rank] if sharded else ref["out"]
        group, scale = mesh.cp_group, 1 / mesh.cp_size
    else:  # diffusers: loss on the gathered output, gradients are partial sums over ranks
        expected_out, group, scale = ref["out"], None, 1.0
    out_err = float((out - expected_out).abs().max() / expected_out.abs().max())
    grad_err = 0.0
    for name, param in model.named_parameters():
        if not param.requires_grad:  # a frozen base
            continue
        grad = param.grad.clone()
        dist.all_reduce(grad, group=group)
        expected = ref["grads"][name]
        grad_err = max(grad_err, float((grad * scale - expected).abs().max() / expected.abs().max().clamp_min(1e-12)))
    return {"out_rel_err": out_err, "grad_rel_err": grad_err}


def measured_step(model: torch.nn.Module, step: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Two untimed steps, instrumented: peak bytes allocated and bytes sent by kind in the first, as training runs
    it; saved activations in the second. Counting them hooks what autograd saves, and the library takes such hooks
    for ones that move saved tensors (tiling then keeps no product beside them: ``cp_plugin.tiling``), so one step
    measuring both would not peak as training does."""
    COMM_STATS.reset()
    with PeakMemory() as peak:
        out = step()
    sent, by_kind = COMM_STATS.bytes_sent, dict(COMM_STATS.by_kind)
    with count_saved_activations(model) as saved:
        step()
    return out, {"saved_bytes": saved.total, "peak_bytes": peak.peak, "bytes_sent": sent, "comm_by_kind": by_kind}


def run_case(layout: Layout, seq: int, repeats: int, out_dir: Path, timed: bool = True) -> dict[str, Any]:
    """One layout's step at ``seq`` tokens: its peak, saved activations and errors, and (``timed``) ``repeats`` steps'
    times."""
    model, mesh = build(layout)
    inputs = inputs_for(layout, seq, mesh)
    step = step_fn(model, inputs)
    out, measured = measured_step(model, step)
    record: dict[str, Any] = {**asdict(layout), "world": dist.get_world_size(), "seq": seq, "rank": dist.get_rank(),
                              **measured}
    if layout.name == ("single+lora" if layout.lora else "single"):
        torch.save({"out": out, "grads": {n: p.grad for n, p in model.named_parameters()}},
                   reference_path(out_dir, seq, layout.lora))
    else:
        record.update(exactness(model, out, layout, mesh, torch.load(reference_path(out_dir, seq, layout.lora))))
    if timed:
        timing = time_steps(step, repeats, warmup=0, barrier=dist.barrier)
        record.update({"time_median_s": timing.median_s, "time_low_s": timing.low_s, "time_high_s": timing.high_s})
    return record


def interleaved_tiling(layout: Layout, seq: int, repeats: int) -> dict[str, Any]:
    """Step times of ``layout`` (a ``+tile`` or ``+autotile`` one) with tiling on and off in turn on one model,
    ``repeats`` pairs: what a machine's speed drifts by over a run falls on both alike, where separate runs of each
    would take it as cost."""
    model, mesh = build(replace(layout, tiling=False))
    step = step_fn(model, inputs_for(layout, seq, mesh))
    times: dict[str, list[float]] = {"untiled": [], "tiled": []}
    for repeat in range(repeats + 1):  # the first pair warms both up
        for kind in times:
            tiles = tiles_for(model, layout.tiling, None, layout.ring * layout.ulysses) if kind == "tiled" else None
            tiling = apply_tiling(model, tiles) if tiles is not None else None
            seconds = time_steps(step, 1, warmup=0, barrier=dist.barrier).median_s
            if tiling is not None:
                tiling.remove()
            if repeat:
                times[kind].append(seconds)
    return {**asdict(layout), "world": dist.get_world_size(), "seq": seq, "rank": dist.get_rank(), "interleaved": True,
            "time_untiled_s": times["untiled"], "time_tiled_s": times["tiled"]}


SIDE_STEP = 4  # search lengths are side x side tokens (Flux's image grid), side a multiple of 4 (every cp size)


def tag_phases() -> None:
    """Name what cp_plugin's attention and collectives allocate, for ``PeakMemory.at_peak`` (this process only).

    Wraps, where they are looked up at call time: the attention every routed call runs, the ring's
    receive buffers, and the collectives of Ulysses, the ring and the sequence gather.
    """
    import cp_plugin.attention.dispatch as dispatch
    import cp_plugin.attention.ring as ring
    import cp_plugin.attention.ulysses as ulysses
    import cp_plugin.sequence as sequence

    def tagged(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return fn(*args, **kwargs)

        run.tagged = True  # type: ignore[attr-defined]
        return run

    targets = [(dispatch, "context_parallel_attention", "attention"), (ring.RingComm, "send_recv", "communication"),
               *((module, name, "communication") for module, names in ((ulysses, ("all_to_all", "all_gather")),
                 (ring, ("all_gather", "reduce_scatter")), (sequence, ("all_gather", "reduce_scatter")))
                 for name in names)]
    for owner, name, kind in targets:
        if not getattr(getattr(owner, name), "tagged", False):
            setattr(owner, name, tagged(getattr(owner, name), kind))


def probe_peak(model: torch.nn.Module, layout: Layout, mesh: ParallelMesh | None, side: int) -> tuple[int, dict]:
    """The largest step peak (bytes) over all ranks at ``side * side`` tokens, the same on every rank, and what
    the rank with that peak held then, by kind (``benchmarks.measure.current_kind``)."""
    step = step_fn(model, inputs_for(layout, side * side, mesh))
    with PeakMemory() as peak:
        step()
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (peak.peak, peak.at_peak))
    return max(ranks, key=lambda r: r[0])


def bracket(peak: Callable[[int], int], side: int, budget: int) -> tuple[int, int]:
    """The longest side whose ``peak`` fits ``budget`` (0 if none does) and the next side step, over it, both measured:
    from ``side``, the side doubled or halved until one length fits and a longer one does not, then the gap between
    them halved until they are one side step apart (``peak`` grows with the side). Geometric steps reach the
    boundary in a few probes however far off ``side`` is."""
    fits, over = (side, None) if peak(side) <= budget else (None, side)
    while over is None:
        if peak(2 * fits) > budget:
            over = 2 * fits
        else:
            fits *= 2
    while fits is None:
        lower = over // 2 // SIDE_STEP * SIDE_STEP
        if lower == 0 or peak(lower) <= budget:
            fits = lower
        else:
            over = lower
    while over - fits > SIDE_STEP:
        middle = (fits + over) // 2 // SIDE_STEP * SIDE_STEP
        if peak(middle) <= budget:
            fits = middle
        else:
            over = middle
    return fits, over


def longest_fitting(peak: Callable[[int], int], side: int, budget: int, first_tiled: int | None) -> tuple[int, int]:
    """:func:`bracket`'s two sides, where ``peak`` may fall where tiling turns on: from ``first_tiled``, the first side
    at which every call is tiled (``None``: tiling is off), a step peaks lower than one just below it, so the peak
    grows with the side below that side and from it, not across it. Where the boundary found lies below it and a step
    of that side fits, the longest that fits is beyond it: bracketed again from there."""
    fits, over = bracket(peak, side, budget)
    if first_tiled is not None and over < first_tiled and peak(first_tiled) <= budget:
        fits, over = bracket(peak, first_tiled, budget)
    return fits, over


def first_tiled_side(layout: Layout) -> int | None:
    """The shortest side at which each rank's share of the image tokens reaches ``MIN_TILED_TOKENS`` (``None`` for a
    layout without ``+tile``): from it every feed-forward call is tiled with chunks chosen per call."""
    if layout.tiling is not True:
        return None
    side = math.isqrt(MIN_TILED_TOKENS * layout.ring * layout.ulysses - 1) + 1
    return -(-side // SIDE_STEP) * SIDE_STEP


def search(layout: Layout, budget: int) -> dict[str, Any]:
    """The longest ``side * side`` sequence whose measured step peak fits ``budget`` bytes on every rank.

    A run, not a fit: two short probes only estimate bytes per token (peaks grow linearly, as flash
    attention keeps no S x S scores) to pick where to start; from there :func:`bracket` measures
    lengths until one fits and the next side step does not, in a few probes however far off the
    estimate is; with tiling, the lengths from where every call is tiled are searched too
    (:func:`longest_fitting`). Both are reported.
    """
    model, mesh = build(layout)
    tag_phases()
    probes: dict[int, int] = {}
    kinds: dict[int, dict[str, int]] = {}

    def peak(side: int) -> int:
        if side not in probes:
            probes[side], kinds[side] = probe_peak(model, layout, mesh, side)
            if dist.get_rank() == 0:  # a search of 4 processes on 2 cores runs for tens of minutes: show where it is
                print(f"{layout.name}: {side * side} tokens peak at {probes[side] / 2**20:.1f} MiB", flush=True)
        return probes[side]

    small, large = 8 * SIDE_STEP, 16 * SIDE_STEP  # 1024 and 4096 tokens: long enough for fixed costs to cancel
    per_token = (peak(large) - peak(small)) / (large**2 - small**2)
    estimate = large**2 + (budget - peak(large)) / per_token
    side = max(SIDE_STEP, int(max(estimate, 0) ** 0.5) // SIDE_STEP * SIDE_STEP)
    fits, over = longest_fitting(peak, side, budget, first_tiled_side(layout))
    return {"budget_bytes": budget, "fits_seq": fits * fits, "fits_peak": probes.get(fits, 0),
            "fits_by_kind": kinds.get(fits, {}),
            "next_seq": over * over, "next_peak": probes[over],
            "probes": [[s * s, p] for s, p in sorted(probes.items())]}


def write(records: list[dict[str, Any]], out: Path) -> None:
    """Append records to the JSON lines file (rank 0 only) and echo the last one."""
    if dist.get_rank() == 0:
        with out.open("a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in records[-1].items() if k not in ("comm_by_kind", "probes")}), flush=True)


def failure(layout: Layout, err: Exception) -> dict[str, Any]:
    """A layout that cannot run is a result ("fails"): its record names the error."""
    return {**asdict(layout), "world": dist.get_world_size(), "rank": dist.get_rank(),
            "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", required=True)
    parser.add_argument("--seq", nargs="+", type=int, default=[])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--search-mib", type=float, help="search the longest sequence within this step peak per rank")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines file; one record per rank and case")
    parser.add_argument("--blocks", type=int, default=1, help="double-stream and single-stream blocks each")
    parser.add_argument("--interleave-tiling", action="store_true",
                        help="also time each +tile layout with tiling on and off in turn (interleaved_tiling)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # same cores for every layout
    layouts = {name: layout_named(layouts_for(world), name, args.blocks) for name in args.layouts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seq in args.seq:
        for name in args.layouts:
            try:
                # tiling's pairs are timed in turn on one model (interleaved_tiling), not in separate runs
                record = run_case(layouts[name], seq, args.repeats, args.out.parent, timed=not args.interleave_tiling)
            except Exception as err:  # noqa: BLE001 - a layout that cannot run is a result ("fails")
                record = {**failure(layouts[name], err), "seq": seq}
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, record)
            write(gathered, args.out)
            if args.interleave_tiling and layouts[name].tiling:
                write([interleaved_tiling(layouts[name], seq, args.repeats)], args.out)  # ranks time alike: rank 0
    if args.search_mib:
        for name in args.layouts:
            try:  # the search's figures are all-reduced: rank 0's record speaks for every rank
                record = {**asdict(layouts[name]), "world": world, **search(layouts[name], int(args.search_mib * 2**20))}
            except Exception as err:  # noqa: BLE001
                record = failure(layouts[name], err)
            write([{**record, "search": True}], args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
