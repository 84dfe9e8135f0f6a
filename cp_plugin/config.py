"""The one description of a parallel layout: ``ParallelConfig``.

Everything downstream (mesh, attention, reduction, adapters) reads the layout from here, so every
setting is validated once, in one place, with an error that names the setting and a fix. It is a
plain dataclass so Hydra can use it as a structured config (group ``parallel``) and a user can
build it in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

ROTATE_METHODS = ("p2p", "allgather")
CHECKPOINT_POLICIES = ("full", "save_attention")  # what a gradient-checkpointing recompute redoes (cp_plugin.memory)
AUTO = "auto"  # a degree chosen from the models and the machine (``cp_plugin.layout``)


def check_checkpoint_policy(policy: str) -> None:
    """Raise, naming the choices, for a ``checkpoint_policy`` that ``cp_plugin.memory`` does not have (the config
    checks it at construction; ``apply_memory_options`` is also called without one)."""
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"checkpoint_policy={policy!r} is not supported; use one of "
                         f"{', '.join(map(repr, CHECKPOINT_POLICIES))} (Hydra: parallel.checkpoint_policy=save_attention)")


def divisors(n: int) -> list[int]:
    """Divisors of ``n``, used to suggest valid degrees in error messages."""
    return [d for d in range(1, n + 1) if n % d == 0]


def format_choices(values: list[int]) -> str:
    """``[1, 2, 3, 6]`` -> ``"1, 2, 3 or 6"`` for error messages."""
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


@dataclass
class ParallelConfig:
    """Context-parallel layout of a training run: ``world = dp_degree * ring_degree * ulysses_degree``.

    Args:
        ring_degree: ranks that pass KV blocks around a ring (memory per rank falls as 1/ring), or
            ``"auto"``.
        ulysses_degree: ranks that exchange heads for sequence with all-to-all (must divide the
            attention head count), or ``"auto"``. With either degree ``"auto"`` the layout is chosen
            once the models are known, before the mesh is built (``cp_plugin.layout``): Ulysses inside
            a node, ring across nodes, the least estimated communication time. Every process then
            shares one sequence unless ``dp_degree`` is set (``cp = world / dp_degree``).
        convert_to_fp32: merge ring partial outputs and log-sum-exps in float32 (exact for
            bf16/fp16 inputs).
        rotate_method: how ring KV blocks travel: ``"p2p"`` (double-buffered point-to-point,
            at most two KV blocks per rank) or ``"allgather"`` (all KV at once, for comparison).
        dp_degree: data-parallel replicas; ``None`` means ``world_size // (ring * ulysses)``.
        fsdp: shard parameters, gradients and optimizer state over all ``dp x ring x ulysses`` ranks
            with FSDP2 instead of replicating them under DDP (memory per rank for them falls as
            1/world; CP ranks hold the same weights, so they can share them just as dp ranks do).
        hsdp: with ``fsdp``, shard inside a node and replicate across nodes (FSDP2 on a 2-D
            ``("replicate", "shard")`` mesh): the all-gathers of weights stay on the fast links,
            only the gradient all-reduce crosses nodes.
        sequence_length: tokens per sample, for the ``"auto"`` estimates only (``None``: 4096). It
            scales every estimate alike, so it never changes the choice.
        intra_node_bandwidth: GB/s one process sends to another in its node, for ``"auto"``
            (``None``: 450 on GPUs, NVLink 4; 1 on CPU, gloo).
        inter_node_bandwidth: GB/s one process sends to another node, for ``"auto"`` (``None``: 50
            on GPUs, one 400 Gb/s InfiniBand NIC per GPU; 1 on CPU, gloo over TCP).
        gradient_checkpointing: turn on the trained diffusers models' own gradient checkpointing
            (``cp_plugin.memory``): each block keeps only its input and is recomputed in the backward.
        checkpoint_policy: with ``gradient_checkpointing``, what a recompute redoes: ``"full"``, the
            whole block; ``"save_attention"``, all but the attention kernels, whose outputs are kept
            (one more tensor of the block's width per attention call, for no attention recompute).
        tile_feed_forward: run every feed-forward network (found by structure, ``cp_plugin.tiling``)
            over its tokens a chunk at a time, forward and backward: its hidden layer exists for one
            chunk only; an MLP a block writes inline (Flux's single-stream blocks) is computed with
            the projection of it and the attention's output a chunk of tokens at a time too, its
            hidden layer and that concatenation never whole; normalization layers are recomputed in
            the backward instead of keeping their output, and an attention's projections of a norm's
            output (and the norms of its query and key projections) keep what that output was made of,
            made again in the backward (``cp_plugin.norms``). ``True`` does it for every call of at
            least 2048 tokens (a rank's share), for the most memory saved; ``"auto"`` (the default) only
            where the whole sequence is at least 64 times the model's width, where what it makes again
            costs at most about 5% of a step (``cp_plugin.memory.auto_tiles``); ``False`` never.
        tile_tokens: tokens per chunk of ``tile_feed_forward``; ``None`` chooses per call (chunks whose
            hidden layer is a quarter of the size of the block's input).
        ring_heads_per_pass: at most this many heads go round the ring together (the largest divisor
            of a layer's head count not above it); ``None`` chooses per call the fewest that keep the
            kernels busy (``cp_plugin.attention.ring.heads_per_pass``). The KV blocks in flight, the
            dK/dV accumulators and the kernels' outputs are one group's, so fewer heads hold less.
    """

    ring_degree: int | str = 1
    ulysses_degree: int | str = 1
    convert_to_fp32: bool = True
    rotate_method: str = "p2p"
    dp_degree: int | None = None
    fsdp: bool = False
    hsdp: bool = False
    sequence_length: int | None = None
    intra_node_bandwidth: float | None = None
    inter_node_bandwidth: float | None = None
    gradient_checkpointing: bool = False
    checkpoint_policy: str = "full"
    tile_feed_forward: bool | str = AUTO
    tile_tokens: int | None = None
    ring_heads_per_pass: int | None = None

    def __post_init__(self) -> None:
        optional = ("dp_degree", "sequence_length", "tile_tokens", "ring_heads_per_pass")
        for name in ("ring_degree", "ulysses_degree", *optional):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if value == AUTO and name in ("ring_degree", "ulysses_degree"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                also = " or 'auto'" if name in ("ring_degree", "ulysses_degree") else ""
                raise ValueError(f"{name}={value!r} must be an integer >= 1{also}; use e.g. {name}=1 or {name}=2 "
                                 f"(Hydra: parallel.{name}=2)")
        for name in ("intra_node_bandwidth", "inter_node_bandwidth"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a number of GB/s > 0, or None for the device's default; "
                                 f"use e.g. parallel.{name}=25")
        for name in ("fsdp", "hsdp", "gradient_checkpointing", "tile_feed_forward"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "tile_feed_forward" and value == AUTO):
                also = ", or 'auto'" if name == "tile_feed_forward" else ""
                raise ValueError(f"{name}={value!r} must be True or False{also} (Hydra: parallel.{name}=true)")
        check_checkpoint_policy(self.checkpoint_policy)
        if self.checkpoint_policy != "full" and not self.gradient_checkpointing:
            raise ValueError(f"checkpoint_policy={self.checkpoint_policy!r} chooses what gradient checkpointing "
                             "recomputes: it needs gradient_checkpointing=True (Hydra: parallel.gradient_checkpointing=true)")
        if self.hsdp and not self.fsdp:
            raise ValueError("hsdp=True shards with FSDP2 inside each node: it needs fsdp=True (Hydra: parallel.fsdp=true)")
        if self.rotate_method not in ROTATE_METHODS:
            raise ValueError(
                f"rotate_method={self.rotate_method!r} is not supported; use one of {', '.join(map(repr, ROTATE_METHODS))}"
            )

    @property
    def auto(self) -> bool:
        """Whether a degree is still ``"auto"`` (chosen by ``cp_plugin.layout`` once the models are known)."""
        return AUTO in (self.ring_degree, self.ulysses_degree)

    @property
    def cp_degree(self) -> int:
        """Ranks that share one sequence (ring x ulysses)."""
        if self.auto:
            raise ValueError(
                f"ring_degree={self.ring_degree!r}, ulysses_degree={self.ulysses_degree!r}: the cp size is known once "
                "'auto' is resolved from the models (ContextParallelCore.validate, or cp_plugin.layout.choose_layout)"
            )
        return self.ring_degree * self.ulysses_degree

    def resolve(self, world_size: int) -> ParallelConfig:
        """Return a copy with ``dp_degree`` filled in, or raise if the layout cannot fill ``world_size``.

        With ``"auto"`` degrees the copy keeps them (they need the models) and ``dp_degree`` defaults to
        1; what is fixed (``dp_degree``, a fixed degree) is checked against ``world_size`` already.
        """
        if self.auto:
            return self._resolve_auto(world_size)
        cp = self.cp_degree
        if world_size % cp != 0:
            raise ValueError(
                f"ring_degree={self.ring_degree} x ulysses_degree={self.ulysses_degree} = {cp} does not divide "
                f"world_size={world_size}; use degrees whose product is {format_choices(divisors(world_size))}, "
                f"or launch a multiple of {cp} processes (e.g. devices={cp})"
            )
        dp = world_size // cp
        if self.dp_degree is not None and self.dp_degree != dp:
            raise ValueError(
                f"dp_degree={self.dp_degree} x ring_degree={self.ring_degree} x ulysses_degree={self.ulysses_degree} "
                f"= {self.dp_degree * cp} != world_size={world_size}; use dp_degree={dp} or dp_degree=null "
                f"(derived), or launch {self.dp_degree * cp} processes"
            )
        return replace(self, dp_degree=dp)

    def _resolve_auto(self, world_size: int) -> ParallelConfig:
        dp = self.dp_degree or 1
        if world_size % dp:
            raise ValueError(
                f"dp_degree={dp} does not divide world_size={world_size}; use dp_degree "
                f"{format_choices(divisors(world_size))} (or null: every process shares the sequence), or launch "
                f"a multiple of {dp} processes"
            )
        cp = world_size // dp
        for name in ("ring_degree", "ulysses_degree"):
            value = getattr(self, name)
            if value != AUTO and cp % value:
                raise ValueError(
                    f"{name}={value} does not divide the cp size {cp} (world_size={world_size} / dp_degree={dp}) "
                    f"that 'auto' fills; use {name} {format_choices(divisors(cp))} or {name}=auto"
                )
        return replace(self, dp_degree=dp)

    def to_diffusers(self) -> Any:
        """The equivalent ``diffusers.ParallelConfig`` (context parallelism only).

        diffusers only knows ``rotate_method="allgather"``; the rotate method is ours to honour
        (cp_plugin's attention backend runs the ring), so it is not passed on.
        """
        from diffusers import ContextParallelConfig
        from diffusers import ParallelConfig as DiffusersParallelConfig

        if self.cp_degree == 1:
            raise ValueError(
                "to_diffusers() needs context parallelism: ring_degree=1 and ulysses_degree=1 describe plain data "
                "parallelism; set ring_degree or ulysses_degree > 1"
            )
        return DiffusersParallelConfig(
            context_parallel_config=ContextParallelConfig(
                ring_degree=self.ring_degree,
                ulysses_degree=self.ulysses_degree,
                convert_to_fp32=self.convert_to_fp32,
            )
        )

    @classmethod
    def from_any(cls, config: Any) -> ParallelConfig:
        """Accept our config, a diffusers ``ParallelConfig``/``ContextParallelConfig``, a mapping or ``None``."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls(**config)
        cp_config = getattr(config, "context_parallel_config", config)
        if cp_config is None or not hasattr(cp_config, "ring_degree"):
            raise TypeError(
                f"parallel_config of type {type(config).__name__} is not understood; pass cp_plugin.ParallelConfig, "
                "diffusers.ParallelConfig(context_parallel_config=...) or diffusers.ContextParallelConfig"
            )
        if getattr(cp_config, "ulysses_anything", False) or getattr(cp_config, "ring_anything", False):
            raise ValueError(
                "ulysses_anything/ring_anything are not supported by cp_plugin; leave them False and use a "
                "sequence length divisible by ring_degree * ulysses_degree"
            )
        return cls(
            ring_degree=cp_config.ring_degree or 1,
            ulysses_degree=cp_config.ulysses_degree or 1,
            convert_to_fp32=cp_config.convert_to_fp32,
            rotate_method=cp_config.rotate_method,
        )


def register_configs() -> None:
    """Register ``ParallelConfig`` as the Hydra structured-config schema of group ``parallel``."""
    from hydra.core.config_store import ConfigStore  # here, not at the top: the library runs without Hydra

    ConfigStore.instance().store(group="parallel", name="schema", node=ParallelConfig)
