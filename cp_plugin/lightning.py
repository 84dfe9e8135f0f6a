"""``ContextParallelStrategy``: Lightning's DDP strategy, plus a context-parallel mesh and model hooks.

Everything Lightning already does well (launching, process groups, DDP's bucketed all-reduce,
gradient accumulation and clipping, precision, checkpoints written by rank 0) is inherited from
``DDPStrategy``. This adapter adds only what context parallelism changes:

- the ``("dp", "ring", "ulysses")`` mesh, validated against the world size before any collective;
- diffusers models made context parallel during ``setup`` (``cp_plugin.model``);
- samplers over dp ranks only and RNG streams equal inside a CP group, so every rank of a group
  sees the same samples and draws the same noise;
- optional batch sharding after transfer and a cheap per-step check that a CP group's ranks hold
  the same batch.

Gradients need no special reduction: the collectives' backwards are exact adjoints
(``cp_plugin.sequence``), so DDP's mean over all ranks gives the single-process gradient. Unless
told otherwise (``find_unused_parameters`` / ``static_graph``), DDP runs with a static graph: some
DiTs leave parameters unused in every step (QwenImage's and HunyuanVideo 1.5's last text branch),
which plain DDP refuses, while one process trains them as is. DDP finds them in the first step and
leaves their gradients ``None`` (as one process does), and after that first step a model that uses
every parameter runs exactly as under plain DDP. With
``ParallelConfig(fsdp=True)`` FSDP2 replaces DDP (``cp_plugin.fsdp``): the same mean, reduce-scattered
so each rank keeps a shard of the weights, gradients and optimizer state. FSDP2 runs save as
Lightning's ``ModelParallelStrategy`` does (``save_distributed_checkpoint``, ``cp_plugin.checkpoint``):
a directory in which each rank writes its own shards with torch.distributed.checkpoint, no rank
gathering a full copy; ``save_distributed_checkpoint=False`` (and DDP runs) write one file in the
one-process layout. Either resumes under any layout, FSDP2 or DDP.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import timedelta
from functools import cached_property, partial
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.data import DataLoader
from typing_extensions import override

from cp_plugin.checkpoint import CheckpointFormat, reading_format, saving_format
from cp_plugin.compat import (
    ddp_comm_options,
    ddp_ignore_parameters,
    ddp_kwargs,
    process_group_backend,
    process_group_timeout,
    start_method,
    unwrap_optimizer,
)
from cp_plugin.config import ParallelConfig
from cp_plugin.core import ContextParallelCore, FirstBackwardSynced, SequenceShards
from cp_plugin.elastic import init_for_restarts
from cp_plugin.fsdp import check_compatible, shard_module
from cp_plugin.lightning_resume import KEY as RESUME_KEY
from cp_plugin.lightning_resume import layout_state, resumable, rng_state_to_restore
from cp_plugin.mesh import ParallelMesh
from cp_plugin.model import Plan

# LightningModule methods Lightning calls instead of ``forward``: under FSDP2 they gather the root's weights.
STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


class ContextParallelStrategy(SequenceShards, DDPStrategy):
    """Train a diffusers DiT with context parallelism (Ulysses, ring, or both) times data parallelism.

    Args:
        parallel_config: the layout: ``cp_plugin.ParallelConfig``, a diffusers ``ParallelConfig`` or
            ``ContextParallelConfig``, or a dict. Keyword degrees and memory options (``fsdp``,
            ``gradient_checkpointing``, ``checkpoint_policy``, ``tile_feed_forward``, ``tile_tokens``,
            ``ring_heads_per_pass``) override its fields.
        cp_plan: ``{attribute path: plan}`` to supply or override diffusers ``_cp_plan`` s, e.g.
            ``{"transformer": {...}}``. By default every diffusers model with a ``_cp_plan`` is used.
        shard_batch: ``{batch key: sequence dim}``: shard these entries of each (dict) batch after
            transfer, so no rank holds the full sequence. The models then receive
            ``presharded_inputs`` already sharded and, unless ``gather_outputs=True``, return local
            shards: take the loss on local tokens, or ``strategy.gather`` what you need.
        presharded_inputs: model forward arguments that arrive sharded when ``shard_batch`` is set.
        gather_outputs: gather model outputs over the CP group (default: unless ``shard_batch``).
        check_batches: compare a fingerprint of each batch across the CP group (one tiny
            all-gather per step) and raise if ranks of a group were fed different data.
        on_nonfinite: on NaN/Inf gradients (a non-finite loss on any rank), ``"raise"`` naming the
            step and rank, or ``"skip"`` the optimizer step with a warning.
        save_distributed_checkpoint: save a directory in which each rank writes its own shards
            (``cp_plugin.checkpoint``, as Lightning's ``ModelParallelStrategy``) instead of one file
            rank 0 writes. Default: ``True`` under FSDP2 (no rank gathers the model), ``False`` under DDP.
            Loading reads both kinds, whatever this is set to.

    The remaining arguments are ``DDPStrategy`` 's (accelerator, parallel_devices,
    cluster_environment, checkpoint_io, precision_plugin, process_group_backend, timeout,
    start_method, DDP keyword arguments).
    """

    strategy_name = "context_parallel"

    def __init__(
        self,
        parallel_config: Any = None,
        *,
        ring_degree: int | None = None,
        ulysses_degree: int | None = None,
        dp_degree: int | None = None,
        rotate_method: str | None = None,
        convert_to_fp32: bool | None = None,
        fsdp: bool | None = None,
        hsdp: bool | None = None,
        gradient_checkpointing: bool | None = None,
        checkpoint_policy: str | None = None,
        tile_feed_forward: bool | str | None = None,
        tile_tokens: int | None = None,
        ring_heads_per_pass: int | None = None,
        cp_plan: Mapping[str, Plan] | None = None,
        shard_batch: Mapping[str, int] | None = None,
        presharded_inputs: Sequence[str] = ("hidden_states",),
        gather_outputs: bool | None = None,
        check_batches: bool = True,
        on_nonfinite: str = "raise",
        save_distributed_checkpoint: bool | None = None,
        timeout: timedelta | None = default_pg_timeout,
        **kwargs: Any,
    ) -> None:
        super().__init__(timeout=timeout, **kwargs)
        overrides = {
            "ring_degree": ring_degree,
            "ulysses_degree": ulysses_degree,
            "dp_degree": dp_degree,
            "rotate_method": rotate_method,
            "convert_to_fp32": convert_to_fp32,
            "fsdp": fsdp,
            "hsdp": hsdp,
            "gradient_checkpointing": gradient_checkpointing,
            "checkpoint_policy": checkpoint_policy,
            "tile_feed_forward": tile_feed_forward,
            "tile_tokens": tile_tokens,
            "ring_heads_per_pass": ring_heads_per_pass,
        }
        base = ParallelConfig.from_any(parallel_config)
        self.core = ContextParallelCore(
            ParallelConfig(**{**vars(base), **{k: v for k, v in overrides.items() if v is not None}}),
            cp_plan=cp_plan, shard_batch=shard_batch, presharded_inputs=presharded_inputs,
            gather_outputs=gather_outputs, check_batches=check_batches, on_nonfinite=on_nonfinite,
        )
        if not self.parallel_config.fsdp and not {"find_unused_parameters", "static_graph"} & set(ddp_kwargs(self)):
            ddp_kwargs(self)["static_graph"] = True  # unused parameters train as on one process (module docstring)
        self._first_backward = FirstBackwardSynced()
        self._save_distributed_checkpoint = save_distributed_checkpoint
        self._loaded_format: CheckpointFormat | None = None  # what read the checkpoint being resumed from

    @property
    def save_distributed_checkpoint(self) -> bool:
        """Whether checkpoints are sharded directories (the option, else ``True`` exactly under FSDP2)."""
        option = self._save_distributed_checkpoint
        return self.parallel_config.fsdp if option is None else option

    @cached_property
    def checkpoint_format(self) -> CheckpointFormat:
        """How this run writes checkpoints (``cp_plugin.checkpoint``), chosen at the first save, once Lightning
        has given the strategy its ``CheckpointIO``."""
        return saving_format(fsdp=self.parallel_config.fsdp, sharded=self.save_distributed_checkpoint,
                             io=self.checkpoint_io)

    # layout -----------------------------------------------------------------------------------
    @property
    def parallel_config(self) -> ParallelConfig:
        return self.core.parallel_config

    @property
    def parallel_mesh(self) -> ParallelMesh:
        return self.core.mesh

    @property
    def device_mesh(self) -> DeviceMesh:
        """torch ``DeviceMesh`` with dims ``("dp", "ring", "ulysses")``; ``parallel_mesh.cp_mesh`` is ``"cp"``."""
        return self.parallel_mesh.device_mesh

    @property
    def dp_rank(self) -> int:
        return self.parallel_mesh.dp_rank

    @property
    def dp_size(self) -> int:
        return self.parallel_mesh.dp_size

    @property
    def cp_rank(self) -> int:
        return self.parallel_mesh.cp_rank

    @property
    def cp_size(self) -> int:
        return self.parallel_mesh.cp_size

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return self.parallel_mesh.sampler_kwargs

    @override
    def setup_distributed(self) -> None:
        # under torchrun, join through a per-attempt store prefix so a restarted run connects (cp_plugin.elastic)
        init_for_restarts(process_group_backend(self), self.cluster_environment.global_rank(),
                          self.cluster_environment.world_size(), process_group_timeout(self) or default_pg_timeout,
                          self.root_device)
        super().setup_distributed()

    # Lightning hooks (shard / gather for training steps come from SequenceShards)  -------------------------------------------------------------------------
    @override
    def setup_environment(self) -> None:
        # Validate the layout against the world size before the process group exists, so every
        # rank raises the same error and none waits in a collective ("auto" degrees: from the connected model).
        self.core.validate(self.num_nodes * self.num_processes, modules=[self.model],
                           processes_per_node=self.num_processes, device_type=self.root_device.type)
        if self.parallel_config.fsdp:
            check_compatible({**ddp_kwargs(self), **ddp_comm_options(self)}, start_method(self),
                             grad_scaler=getattr(self.precision_plugin, "scaler", None) is not None)
        super().setup_environment()
        if "PL_GLOBAL_SEED" not in os.environ:
            rank_zero_warn("no seed set (lightning.seed_everything); ContextParallelStrategy draws one on rank 0")
        self.core.start(self.root_device)

    @override
    def setup(self, trainer: Any) -> None:
        self.core.apply(self.model)
        super().setup(trainer)

    @override
    def teardown(self) -> None:
        """After fit/validate/test: the module's models are plain again (sampling with the pipeline, export);
        the next ``setup`` converts them anew."""
        self.core.remove()
        super().teardown()

    @override
    def configure_ddp(self) -> None:
        if not self.parallel_config.fsdp:
            super().configure_ddp()
            return
        # Sharded in place: DDPStrategy.setup then builds the optimizers on the DTensor parameters.
        shard_module(self.model, self.parallel_mesh.shard_mesh, forward_methods=STEP_METHODS)
        # A later validate/test/predict broadcasts rank 0's parameters (DDPStrategy.setup); shards differ by design.
        ddp_ignore_parameters(self.model, [name for name, _ in self.model.named_parameters()])

    @override
    def block_backward_sync(self) -> AbstractContextManager[None]:
        """Skip gradient sync on accumulation micro-batches, except in DDP's first static-graph backward."""
        if getattr(self.model, "static_graph", False):
            return self._first_backward.skip_sync(super().block_backward_sync)
        return super().block_backward_sync()

    @override
    def process_dataloader(self, dataloader: object) -> object:
        # Lightning seeds data workers by *global* rank; a CP group must draw the same augmentations.
        if int(os.environ.get("PL_SEED_WORKERS", 0)) and getattr(dataloader, "worker_init_fn", 0) is None:
            dataloader.worker_init_fn = partial(pl_worker_init_function, rank=self.dp_rank)
        return resumable(dataloader) if isinstance(dataloader, DataLoader) else dataloader

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        return self.core.process_batch(super().batch_to_device(batch, device, dataloader_idx))

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().training_step(*args, **kwargs)
        loss = output["loss"] if isinstance(output, Mapping) else output
        if loss is not None:  # checked by the guard, with the step's other checks, in its one host read
            self.core.note_loss(loss)
        return output

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        def guarded_closure() -> Any:
            result = closure()
            self.core.guard(optimizer, self._describe_step, "ContextParallelStrategy(on_nonfinite='skip')")
            return result

        return super().optimizer_step(optimizer, guarded_closure, model, **kwargs)

    def _describe_step(self) -> str:
        """The step and this rank, for the guard's message (which adds whose loss was not finite)."""
        return f"step {self.lightning_module.trainer.global_step}, rank {self.global_rank}"

    # checkpoints: each hook hands over to the format (cp_plugin.checkpoint) ---------------------------------
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self.checkpoint_format.model_state(self.lightning_module)

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return self.checkpoint_format.optimizer_state(self.lightning_module, unwrap_optimizer(optimizer))

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        checkpoint[RESUME_KEY] = layout_state(self.world_size, self.dp_size, checkpoint, self.dp_rank)
        target = self.broadcast(filepath)  # every rank writes into rank 0's path
        self.checkpoint_format.save(self.lightning_module, checkpoint, target, storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        target = self.broadcast(checkpoint_path)
        self._loaded_format = reading_format(target, fsdp=self.parallel_config.fsdp, io=self.checkpoint_io)
        checkpoint = self._loaded_format.load(target, weights_only=weights_only)
        self.core.restore_rng_at_next_batch(
            rng_state_to_restore(checkpoint, self.world_size, self.dp_size, self.global_rank, self.dp_rank)
        )
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self._loaded_format is not None  # Lightning loads states from what load_checkpoint read
        self._loaded_format.load_model_state(self.lightning_module, checkpoint, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        assert self._loaded_format is not None
        optimizers = [unwrap_optimizer(optimizer) for optimizer in self.optimizers]
        self._loaded_format.load_optimizer_state(self.lightning_module, optimizers, checkpoint)

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        self.core.report_failure(exception)
        if torch.distributed.is_initialized() and self.launcher is not None:  # Lightning kills the ranks it started only on Ctrl-C; no orphans here
            self.launcher.kill(signal.SIGKILL)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="Context parallelism (Ulysses/ring) x data parallelism for DiTs"
        )
        strategy_registry.register(
            f"{cls.strategy_name}_spawn",
            cls,
            description="Context parallelism, processes started with torch.multiprocessing spawn",
            start_method="spawn",
        )


ContextParallelStrategy.register_strategies(StrategyRegistry)
