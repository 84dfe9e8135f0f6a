"""``ContextParallelCore``: everything context parallelism needs at run time, once, for both adapters.

A training run asks the same things of context parallelism whichever framework drives it: a layout
validated before any collective, the same settings on every rank, a mesh, RNG streams equal inside
a CP group, models made context parallel, every batch checked across the group (and sharded, if
asked), sequence shards and gathers, gradients guarded against non-finite values, and the RNG
states of a resumed run set again at its first batch. This object holds those and the options that
steer them; ``ContextParallelStrategy`` (Lightning) and ``ContextParallelPlugin`` (Accelerate) only
translate their framework's hooks into calls on it, the way torchtitan's ``ParallelDims`` is the
one description of a layout its trainers share.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from cp_plugin.batch import BatchCheck
from cp_plugin.config import ParallelConfig
from cp_plugin.guard import (
    StepGuard,
    check_nonfinite_option,
    check_same_config,
    describe_failures,
    is_transport_error,
    record_failure,
)
from cp_plugin.layout import LayoutChoice, choose_layout, model_attention, ulysses_placement_warning
from cp_plugin.memory import apply_memory_options
from cp_plugin.mesh import ParallelMesh
from cp_plugin.model import Conversion, Plan, apply_context_parallel
from cp_plugin.resume import restore_rng_state
from cp_plugin.rng import seed_per_dp_rank, shared_base_seed
from cp_plugin.sequence import gather_sequence, local_shard, shard_batch

log = logging.getLogger(__name__)

class ContextParallelCore:
    """The layout, its options, and the run-time state of context parallelism for one training run.

    Args:
        parallel_config: the layout (``ParallelConfig``, a diffusers config, or a dict).
        cp_plan: ``{attribute path: plan}`` to supply or override plans.
        shard_batch: ``{batch key: sequence dim}`` to shard each (dict) batch after transfer; the
            models then receive ``presharded_inputs`` sharded and, unless ``gather_outputs``, return
            local shards.
        presharded_inputs: model forward arguments that arrive sharded when ``shard_batch`` is set.
        gather_outputs: gather model outputs over the CP group (default: unless ``shard_batch``).
        check_batches: compare a fingerprint of each batch across the CP group.
        on_nonfinite: on NaN/Inf gradients ``"raise"`` naming the step and rank, or ``"skip"`` the step.
    """

    def __init__(
        self,
        parallel_config: Any = None,
        *,
        cp_plan: Mapping[str, Plan] | None = None,
        shard_batch: Mapping[str, int] | None = None,
        presharded_inputs: Sequence[str] = ("hidden_states",),
        gather_outputs: bool | None = None,
        check_batches: bool = True,
        on_nonfinite: str = "raise",
    ) -> None:
        check_nonfinite_option(on_nonfinite)
        self.parallel_config = ParallelConfig.from_any(parallel_config)
        self.cp_plan = cp_plan
        self.shard_batch_dims = dict(shard_batch) if shard_batch else None
        self.presharded_inputs = tuple(presharded_inputs) if self.shard_batch_dims else ()
        self.gather_outputs = (self.shard_batch_dims is None) if gather_outputs is None else gather_outputs
        self.check_batches = check_batches
        self.on_nonfinite = on_nonfinite
        self.device: torch.device | None = None
        self._mesh: ParallelMesh | None = None
        self._conversions: dict[int, list[Conversion]] = {}  # id of a module -> what applying options changed
        self._rng_to_restore: dict[str, Any] | None = None
        self._batch_check = BatchCheck()
        self._step_guard = StepGuard()  # the batch, loss and gradient checks of a step: one host read
        self.layout: LayoutChoice | None = None  # how "auto" degrees were chosen, once validate has
        self._placement_warning: str | None = None

    # start-up --------------------------------------------------------------------------------
    def validate(
        self,
        world_size: int,
        *,
        modules: Sequence[torch.nn.Module | None] = (),
        processes_per_node: int | None = None,
        device_type: str = "cuda",
    ) -> None:
        """Check the layout against the world size, and choose ``"auto"`` degrees from ``modules``' models.

        The same result or error on every rank, before any collective: the choice is a pure function
        of the models, ``processes_per_node`` (default: torchrun's ``LOCAL_WORLD_SIZE``, else one
        node) and ``device_type`` (default bandwidths). ``start`` logs it and warns, on rank 0.
        """
        per_node = processes_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if self.parallel_config.auto:
            models = [m for module in modules if module is not None for m in model_attention(module, self.cp_plan)]
            self.layout = choose_layout(self.parallel_config, models, world_size, per_node, device_type)
            self.parallel_config = self.layout.config
        self.parallel_config.resolve(world_size)
        if self.layout is None:  # a layout set by hand: say if its Ulysses groups cross nodes
            self._placement_warning = ulysses_placement_warning(self.parallel_config, world_size, per_node)

    def start(self, device: torch.device) -> ParallelMesh:
        """Once the process group exists: the same settings everywhere, the mesh, RNG streams per dp rank."""
        check_same_config(
            parallel=self.parallel_config, shard_batch=self.shard_batch_dims, gather_outputs=self.gather_outputs,
            cp_plan=sorted(self.cp_plan or {}), on_nonfinite=self.on_nonfinite, check_batches=self.check_batches,
            torch=torch.__version__,
        )
        if torch.distributed.get_rank() == 0:
            if self.layout is not None:
                log.info(self.layout.describe())
            if self._placement_warning:
                warnings.warn(self._placement_warning, stacklevel=2)
        self.device = device
        self._mesh = ParallelMesh.build(self.parallel_config, device.type)
        seed_per_dp_rank(self._mesh, shared_base_seed(device))
        return self._mesh

    @property
    def mesh(self) -> ParallelMesh:
        if self._mesh is None:
            raise RuntimeError("the context-parallel mesh exists once training has started (the strategy's setup, "
                               "or ContextParallelPlugin.prepare)")
        return self._mesh

    @property
    def started(self) -> bool:
        return self._mesh is not None

    def apply(self, module: torch.nn.Module) -> None:
        """Make the diffusers models in ``module`` context parallel (at cp > 1) and apply the memory options
        (``cp_plugin.memory``), once per module."""
        if id(module) in self._conversions:
            return
        config = self.mesh.config
        conversions = [apply_memory_options(module, gradient_checkpointing=config.gradient_checkpointing,
                                            checkpoint_policy=config.checkpoint_policy,
                                            tiling=config.tile_feed_forward, tile_tokens=config.tile_tokens,
                                            shards=config.cp_degree)]
        if self.mesh.cp_enabled:
            conversions.append(apply_context_parallel(
                module, self.mesh, cp_plan=self.cp_plan, presharded_inputs=self.presharded_inputs,
                gather_outputs=self.gather_outputs,
            ))
        self._conversions[id(module)] = conversions

    def remove(self) -> None:
        """Turn every module ``apply`` changed back into a plain one (after training: sampling, export)."""
        for conversions in self._conversions.values():
            for conversion in reversed(conversions):
                conversion.remove()
        self._conversions.clear()

    # every step ------------------------------------------------------------------------------
    def process_batch(self, batch: Any) -> Any:
        """What every batch goes through on its device: a resumed run's RNG states, the CP-group check, sharding."""
        if self._rng_to_restore is not None:  # resumed: continue each rank's random stream where it was saved
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        if not self.mesh.cp_enabled:
            return batch
        if self.check_batches:
            self._batch_check(batch, self.mesh, self.device)
        return shard_batch(batch, self.shard_batch_dims, self.mesh) if self.shard_batch_dims else batch

    def restore_rng_at_next_batch(self, state: dict[str, Any] | None) -> None:
        """Set these RNG states again when the next batch arrives (starting an epoch's iterator draws from them)."""
        self._rng_to_restore = state

    def shard(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of a full-sequence tensor (same on every CP rank) along ``dim``."""
        return local_shard(tensor, dim, self.mesh)

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The full sequence from every CP rank's shard along ``dim`` (differentiable, exact adjoint)."""
        return gather_sequence(tensor, dim, self.mesh)

    def report_failure(self, exception: BaseException) -> None:
        """On an error that ends training: leave it for the peers to name, or, if a peer went away, say which.

        A rank that fails records its error in the process group's store; a rank whose collective
        broke because a peer vanished appends what the failed ranks recorded (or that none did).
        """
        if not torch.distributed.is_initialized():
            return
        if is_transport_error(exception):
            exception.args = (f"{exception.args[0] if exception.args else ''}\n[cp_plugin] {describe_failures()}",
                              *exception.args[1:])
        else:
            record_failure(exception)

    def note_loss(self, loss: torch.Tensor) -> None:
        """Check this rank's loss with the step's guard (whose one host read says if it was not finite)."""
        self._step_guard.note_loss(loss)

    def guard(self, optimizer: Any, where: Callable[[], str], skip_option: str) -> None:
        """Before a step, one host read for all of the step's checks: raise if the CP group's batches differed;
        on non-finite gradients raise, or drop them so the step changes nothing (``on_nonfinite``)."""
        self._step_guard.check(optimizer, self.on_nonfinite, where, skip_option, self._batch_check.take())


class FirstBackwardSynced:
    """Skip gradient sync on accumulation micro-batches, except in DDP's first static-graph step.

    Both adapters run DDP with a static graph by default, so that parameters a model leaves unused
    (QwenImage, HunyuanVideo 1.5) train as on one process. DDP learns that graph in its first
    backward, which must be synchronised (under ``no_sync`` its reducer asserts); syncing every
    micro-batch of that first accumulation step gives the same gradient, since the mean is linear.
    A plain object (no closure), so a strategy holding it still pickles for Lightning's spawn launcher.
    """

    def __init__(self) -> None:
        self.learned = False

    @contextmanager
    def skip_sync(
        self, no_sync: Callable[..., AbstractContextManager[Any]], *args: Any, **kwargs: Any
    ) -> Iterator[None]:
        """``no_sync(*args, **kwargs)`` (the framework's skip-sync context), except the first time."""
        if not self.learned:
            self.learned = True
            yield
            return
        with no_sync(*args, **kwargs):
            yield


class SequenceShards:
    """What both adapters offer a training step, from their ``core``: ``shard`` and ``gather`` along a sequence dim."""

    core: ContextParallelCore

    def shard(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of a full-sequence tensor (same on every CP rank) along ``dim``."""
        return self.core.shard(tensor, dim)

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The full sequence from every CP rank's shard along ``dim`` (differentiable, exact adjoint)."""
        return self.core.gather(tensor, dim)
