"""``ParallelMesh``: the device mesh of a run and everything derived from it, on one screen.

Layout ``("dp", "ring", "ulysses")`` with context parallelism innermost, so the ranks that share a
sequence are neighbours (one node, fastest links), and Ulysses innermost of all, because its
all-to-all moves the most bytes. The flattened ``"cp"`` dimension is the group that splits one
sequence; diffusers' hooks shard and gather over it.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cp_plugin.compat import flatten_mesh
from cp_plugin.config import ParallelConfig

MESH_DIMS = ("dp", "ring", "ulysses")


def _destroy_process_groups() -> None:
    """Tear the process groups down before the interpreter does.

    Each process group runs gloo worker threads (``pt_gloo_runloop``) that drop an op's tensors
    after the op has returned; dropping a tensor Python no longer holds takes the GIL. If the
    interpreter is already finalizing, that thread cannot, and the rank ends a finished run in
    ``terminate called without an active exception`` (SIGABRT): a spawn or torchrun launcher then
    reports a failed rank. Lightning registers the same teardown only for NCCL.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelMesh:
    """A built mesh plus the resolved config it came from (``config.dp_degree`` is set).

    ``cp_mesh`` is the flattened ``("ring", "ulysses")`` mesh, kept here because torch deprecates
    slicing a flattened dimension back out of the root mesh. ``kernel_lanes`` is what an attention
    kernel call needs to keep a device busy, the least over every rank, so that every ring rank
    sends its heads in the same groups (``cp_plugin.attention.ring.heads_per_pass``).
    """

    config: ParallelConfig
    device_mesh: DeviceMesh
    cp_mesh: DeviceMesh
    kernel_lanes: int

    @classmethod
    def build(cls, config: ParallelConfig, device_type: str) -> ParallelMesh:
        """Build the mesh over the default process group (which must exist)."""
        if config.auto:
            raise ValueError(
                f"ring_degree={config.ring_degree!r}, ulysses_degree={config.ulysses_degree!r}: 'auto' is chosen from "
                "the models before the mesh is built; let ContextParallelCore.validate(world_size, modules=...) resolve "
                "it, or build the mesh from cp_plugin.layout.choose_layout(...).config"
            )
        resolved = config.resolve(dist.get_world_size())
        atexit.unregister(_destroy_process_groups)  # once per process, however many meshes are built
        atexit.register(_destroy_process_groups)
        mesh = init_device_mesh(
            device_type,
            (resolved.dp_degree, resolved.ring_degree, resolved.ulysses_degree),
            mesh_dim_names=MESH_DIMS,
        )
        from cp_plugin.attention.kernels import kernel_lanes  # here: the attention package imports this module

        lanes = torch.tensor([kernel_lanes(device_type)], device=device_type)
        dist.all_reduce(lanes, op=dist.ReduceOp.MIN)
        return cls(resolved, mesh, flatten_mesh(mesh["ring", "ulysses"], "cp"), int(lanes))

    # sizes -----------------------------------------------------------------------------------
    @property
    def dp_size(self) -> int:
        return self.config.dp_degree

    @property
    def cp_size(self) -> int:
        return self.config.cp_degree

    @property
    def ring_size(self) -> int:
        return self.config.ring_degree

    @property
    def ulysses_size(self) -> int:
        return self.config.ulysses_degree

    @property
    def cp_enabled(self) -> bool:
        return self.cp_size > 1

    # ranks -----------------------------------------------------------------------------------
    @cached_property
    def dp_rank(self) -> int:
        return self.device_mesh.get_local_rank("dp")

    @cached_property
    def cp_rank(self) -> int:
        """Position of this rank's shard in the sequence: ``ring_rank * ulysses_size + ulysses_rank``."""
        return self.cp_mesh.get_local_rank()

    @cached_property
    def ring_rank(self) -> int:
        return self.device_mesh.get_local_rank("ring")

    @cached_property
    def ulysses_rank(self) -> int:
        return self.device_mesh.get_local_rank("ulysses")

    # groups ----------------------------------------------------------------------------------
    @cached_property
    def dp_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("dp")

    @cached_property
    def cp_group(self) -> dist.ProcessGroup:
        return self.cp_mesh.get_group()

    @cached_property
    def shard_mesh(self) -> DeviceMesh:
        """Every rank as one flattened ``"dp_cp"`` dimension, over which FSDP2 shards the weights; with
        ``hsdp``, ``("replicate", "shard")``: shards inside each node (``LOCAL_WORLD_SIZE`` consecutive ranks,
        as torchrun and Lightning number them), replicas across nodes, which FSDP2 runs as HSDP.

        Built on first use (creating its group is a collective: every rank must ask for it).
        """
        if not self.config.hsdp:
            return flatten_mesh(self.device_mesh, "dp_cp")
        world = dist.get_world_size()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if world % local:
            raise ValueError(f"hsdp=True needs the same number of processes on every node; {world} processes "
                             f"do not split into nodes of LOCAL_WORLD_SIZE={local}")
        return init_device_mesh(self.device_mesh.device_type, (world // local, local),
                                mesh_dim_names=("replicate", "shard"))

    @cached_property
    def ring_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("ring")

    @cached_property
    def ulysses_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("ulysses")

    # derived settings ------------------------------------------------------------------------
    @property
    def sampler_kwargs(self) -> dict[str, Any]:
        """``DistributedSampler`` arguments: every rank of a CP group must read the same samples."""
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    def seed(self, base_seed: int) -> int:
        """Per-rank RNG seed: equal inside a CP group (same noise for one sequence), distinct across dp."""
        return base_seed + self.dp_rank
