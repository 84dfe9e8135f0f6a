"""``"auto"`` degrees: Ulysses inside a node, ring across nodes, the least estimated communication time.

A layout is chosen once, from what every rank already knows (the models' attention layers, the
process counts, the link bandwidths), so ``choose_layout`` is a pure function: every rank makes
the same choice, and an impossible setting raises the same error everywhere, before any collective.

Rules. ``cp = world / dp_degree`` (``dp_degree`` defaults to 1 under ``"auto"``: every process shares
the sequence). A Ulysses degree must divide every head count of every context-parallel model (it
splits heads) and the processes per node: Ulysses groups are the innermost mesh dimension, so they
are then whole nodes' neighbours and their all-to-alls never leave a node. The ring takes the rest
of ``cp`` and so spans nodes. Of the layouts left, the one with the lowest estimated communication
time per step wins, bytes from :func:`ulysses_bytes_sent` / :func:`ring_bytes_sent` (the formulas
``benchmarks.run`` checks against the bytes ``cp_plugin.comm`` counts) over the bandwidth of the
slowest link a group uses.

What the estimate leaves out, on purpose: compute (a ring overlaps its sends with attention, which
favours the ring at long sequences; not credited here), latency, and DDP's gradient all-reduce (the
same bytes in every layout). Every term is linear in the sequence length and the models' widths,
so neither changes the choice; they only scale the logged estimates.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from cp_plugin.config import AUTO, ParallelConfig, divisors, format_choices

DEFAULT_SEQUENCE_LENGTH = 4096  # Flux at 1024 x 1024: 4096 image tokens
# GB/s one process sends (intra-node, inter-node). GPUs: NVLink 4 (900 GB/s both ways per H100) and
# one 400 Gb/s InfiniBand NIC per GPU (DGX H100). CPU: gloo moves every message through TCP, in a
# node (loopback: 0.4 GB/s measured on a 2-core host) as across nodes (10 GbE: 1.25 GB/s): alike.
DEFAULT_BANDWIDTHS = {"cpu": (1.0, 1.0)}
GPU_BANDWIDTHS = (450.0, 50.0)


# the byte formulas (benchmarks.run checks them against cp_plugin.comm's counts) ------------------
def _shard_bytes(tokens: float, width: int, ring: int, ulysses: int, element_size: int) -> float:
    """X: bytes of one rank's q, k or v shard before attention (``tokens / cp`` tokens x ``width``)."""
    return tokens / (ring * ulysses) * width * element_size


def ulysses_bytes_sent(tokens: float, width: int, ring: int, ulysses: int, element_size: int = 4) -> float:
    """Bytes one rank sends in the all-to-alls of one attention layer, forward + backward: ``8 X (u-1)/u``.

    Ulysses exchanges q, k, v and the output forward and their gradients backward, keeping ``1/u``
    of each. ``width`` is heads x head_dim of the layer's q/k/v.
    """
    return 8 * _shard_bytes(tokens, width, ring, ulysses, element_size) * (ulysses - 1) / ulysses


def ring_bytes_sent(tokens: float, width: int, ring: int, ulysses: int, element_size: int = 4) -> float:
    """Bytes one rank sends around the ring for one attention layer, forward + backward.

    A KV block (``2 X``: after Ulysses, ``tokens / ring`` tokens of ``heads / ulysses`` heads) makes
    ``r - 1`` hops forward and again backward, and its dK/dV accumulator as many hops in float32
    (or the inputs' dtype if wider): ``(4 X + 4 X wide / element_size) (r - 1)``, ``6 X (r-1)`` in float32.
    """
    wide = max(element_size, 4)
    x = _shard_bytes(tokens, width, ring, ulysses, element_size)
    return (4 * x + 2 * x * wide / element_size) * (ring - 1)


def attention_bytes_sent(tokens: float, width: int, ring: int, ulysses: int, element_size: int = 4) -> float:
    """Minimum bytes one rank sends for one attention layer per forward + backward step (both kinds)."""
    return (ulysses_bytes_sent(tokens, width, ring, ulysses, element_size)
            + ring_bytes_sent(tokens, width, ring, ulysses, element_size))


# what the models ask of a layout -------------------------------------------------------------------
@dataclass(frozen=True)
class ModelAttention:
    """The attention layers context parallelism routes in one model: heads and q/k/v width of each."""

    name: str
    heads: tuple[int, ...]
    widths: tuple[int, ...]
    element_size: int = 4


def model_attention(module: torch.nn.Module, cp_plan: Mapping[str, Any] | None = None) -> list[ModelAttention]:
    """Every context-parallel model in ``module`` (the plans ``apply`` will use) and its routed attention layers."""
    from cp_plugin.model import routed_attention_modules  # model.py builds on mesh.py; this module need not
    from cp_plugin.plans import attention_heads, resolve_plans

    submodules = dict(module.named_modules())
    found = []
    for path, plan in resolve_plans(module, cp_plan).items():
        model = submodules[path]
        layers = [attn for _, attn in routed_attention_modules(model, plan)]
        heads = tuple(attention_heads(attn) or 1 for attn in layers)  # no head count: no Ulysses
        widths = tuple(int(getattr(attn, "inner_dim", 0) or getattr(getattr(attn, "to_q", None), "out_features", 0))
                       for attn in layers)
        element_size = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
        found.append(ModelAttention(f"{type(model).__name__} ('{path}')", heads, widths, element_size))
    return found


# where the processes are -------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """Processes and links: ranks fill nodes in order (``node = rank // processes_per_node``)."""

    world_size: int
    processes_per_node: int
    intra_node_bandwidth: float  # GB/s
    inter_node_bandwidth: float  # GB/s
    defaults_of: str = ""  # the device type whose default bandwidths were taken, for the log

    @classmethod
    def of(cls, config: ParallelConfig, world_size: int, processes_per_node: int, device_type: str) -> Machine:
        """The machine a config runs on; bandwidths left ``None`` take ``device_type`` 's defaults."""
        if processes_per_node < 1 or world_size % processes_per_node:
            raise ValueError(
                f"processes_per_node={processes_per_node} (LOCAL_WORLD_SIZE, or Lightning's devices) does not divide "
                f"world_size={world_size}; launch the same number of processes on every node"
            )
        intra, inter = DEFAULT_BANDWIDTHS.get(device_type, GPU_BANDWIDTHS)
        defaulted = config.intra_node_bandwidth is None or config.inter_node_bandwidth is None
        return cls(world_size, processes_per_node, config.intra_node_bandwidth or intra,
                   config.inter_node_bandwidth or inter, device_type if defaulted else "")

    @property
    def nodes(self) -> int:
        return self.world_size // self.processes_per_node


def groups(dim: str, dp: int, ring: int, ulysses: int) -> Iterator[range]:
    """The ranks of every ``"ring"`` or ``"ulysses"`` group of the ``("dp", "ring", "ulysses")`` mesh."""
    cp = ring * ulysses
    if dim == "ulysses":
        yield from (range(start, start + ulysses) for start in range(0, dp * cp, ulysses))
    else:
        yield from (range(d * cp + u, (d + 1) * cp, ulysses) for d in range(dp) for u in range(ulysses))


def crosses_nodes(dim: str, dp: int, ring: int, ulysses: int, processes_per_node: int) -> bool:
    """Whether some group of mesh dimension ``dim`` has ranks on two nodes (its links are then inter-node).

    For ``"ulysses"`` this is ``nodes > 1 and processes_per_node % ulysses != 0``: groups are
    ``ulysses`` neighbouring ranks starting at multiples of ``ulysses``, so they tile the nodes
    exactly when ``ulysses`` divides the node size; otherwise the group holding rank
    ``processes_per_node`` also holds rank ``processes_per_node - 1``.
    """
    return any(g[0] // processes_per_node != g[-1] // processes_per_node for g in groups(dim, dp, ring, ulysses))


def ulysses_placement_warning(config: ParallelConfig, world_size: int, processes_per_node: int) -> str | None:
    """A warning for a fixed layout whose Ulysses groups span nodes (its all-to-alls then cross the slow links)."""
    resolved = config.resolve(world_size)
    if processes_per_node < 1 or world_size % processes_per_node or not crosses_nodes(
        "ulysses", resolved.dp_degree, resolved.ring_degree, resolved.ulysses_degree, processes_per_node
    ):
        return None
    fits = [d for d in divisors(processes_per_node) if resolved.cp_degree % d == 0]
    return (
        f"ulysses_degree={resolved.ulysses_degree} with {processes_per_node} processes per node puts Ulysses groups "
        f"across nodes ({world_size // processes_per_node} nodes): their all-to-alls, which move the most bytes, run "
        f"over inter-node links; use ulysses_degree {format_choices(fits)} (dividing the node) with ring_degree for "
        "the rest of the cp size, or ulysses_degree=auto"
    )


# the choice --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """Estimated communication of one layout per training step (forward + backward), per rank."""

    ring: int
    ulysses: int
    ulysses_bytes: float
    ring_bytes: float
    seconds: float

    @property
    def label(self) -> str:
        return f"ring_degree={self.ring} x ulysses_degree={self.ulysses}"


def estimate(ring: int, ulysses: int, dp: int, models: list[ModelAttention], machine: Machine,
             sequence_length: int) -> Estimate:
    """Bytes each kind sends per step over every routed layer, each over the slowest link its groups use."""
    ulysses_bytes = sum(ulysses_bytes_sent(sequence_length, w, ring, ulysses, m.element_size)
                        for m in models for w in m.widths)
    ring_bytes = sum(ring_bytes_sent(sequence_length, w, ring, ulysses, m.element_size)
                     for m in models for w in m.widths)

    def bandwidth(dim: str) -> float:
        slow = crosses_nodes(dim, dp, ring, ulysses, machine.processes_per_node)
        return 1e9 * (machine.inter_node_bandwidth if slow else machine.intra_node_bandwidth)

    return Estimate(ring, ulysses, ulysses_bytes, ring_bytes,
                    ulysses_bytes / bandwidth("ulysses") + ring_bytes / bandwidth("ring"))


@dataclass(frozen=True)
class LayoutChoice:
    """The resolved config (no ``"auto"`` left, ``dp_degree`` set) and the estimates it was chosen by."""

    config: ParallelConfig
    estimates: tuple[Estimate, ...]  # best first: estimates[0] is the choice
    machine: Machine
    models: tuple[ModelAttention, ...]
    sequence_length: int

    def describe(self) -> str:
        """One log line: the choice, the alternatives' estimates, and what they were estimated from."""
        best, *others = self.estimates
        m = self.machine
        alternatives = "; ".join(f"{e.label} {e.seconds * 1e3:.3g} ms" for e in others) or "none"
        models = ", ".join(f"{a.name} {'/'.join(map(str, sorted(set(a.heads))))} heads x {len(a.heads)} layers"
                           for a in self.models)
        defaults = f" ({m.defaults_of} defaults)" if m.defaults_of else ""
        return (
            f"automatic layout: {best.label} x dp_degree={self.config.dp_degree} on {m.world_size} processes "
            f"({m.processes_per_node} per node, {m.nodes} node{'s' if m.nodes > 1 else ''}), estimated communication "
            f"{best.seconds * 1e3:.3g} ms/step; alternatives: {alternatives}. Estimated for {models}, "
            f"{self.sequence_length} tokens, {m.intra_node_bandwidth:g} GB/s in a node and {m.inter_node_bandwidth:g} "
            f"GB/s across nodes{defaults}"
        )


def choose_layout(config: ParallelConfig, models: list[ModelAttention], world_size: int, processes_per_node: int,
                  device_type: str) -> LayoutChoice:
    """Resolve the ``"auto"`` degrees of ``config`` (see the module docstring); raise naming the setting if none fits."""
    base = config.resolve(world_size)  # dp_degree (default 1) and fixed degrees against the world
    machine = Machine.of(config, world_size, processes_per_node, device_type)
    if not models:
        raise ValueError(
            f"ring_degree={config.ring_degree!r}, ulysses_degree={config.ulysses_degree!r}: 'auto' is chosen from the "
            "attention head counts of the context-parallel models, but none were found when the layout was resolved "
            "(Lightning: the LightningModule's diffusers models must exist before fit starts, not in configure_model; "
            "Accelerate: pass them to the first ContextParallelPlugin.prepare call); or set both degrees"
        )
    cp = world_size // base.dp_degree
    heads = sorted({h for m in models for h in m.heads})
    allowed = [u for u in divisors(cp) if processes_per_node % u == 0 and all(h % u == 0 for h in heads)]
    if config.ulysses_degree != AUTO:
        u = config.ulysses_degree
        bad = [m for m in models if any(h % u for h in m.heads)]
        if bad:
            theirs = sorted(set(bad[0].heads))
            raise ValueError(
                f"ulysses_degree={u} does not divide num_attention_heads={'/'.join(map(str, theirs))} of {bad[0].name}; "
                f"use ulysses_degree {format_choices([d for d in divisors(cp) if all(h % d == 0 for h in heads)])} "
                "or ulysses_degree=auto"
            )
        pairs = [(cp // u, u)]
    elif config.ring_degree != AUTO:
        r = config.ring_degree
        if cp // r not in allowed:
            raise ValueError(
                f"ring_degree={r} leaves ulysses_degree={cp // r} of the cp size {cp}, which must divide the "
                f"processes per node ({processes_per_node}) and every head count ({format_choices(heads)}); use "
                f"ring_degree {format_choices([cp // u for u in allowed])} or ring_degree=auto"
            )
        pairs = [(r, cp // r)]
    else:
        pairs = [(cp // u, u) for u in allowed]
    sequence_length = config.sequence_length or DEFAULT_SEQUENCE_LENGTH
    estimates = sorted((estimate(r, u, base.dp_degree, models, machine, sequence_length) for r, u in pairs),
                       key=lambda e: (e.seconds, e.ring))
    best = estimates[0]
    return LayoutChoice(replace(base, ring_degree=best.ring, ulysses_degree=best.ulysses), tuple(estimates), machine,
                        tuple(models), sequence_length)
