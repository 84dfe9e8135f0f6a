"""``ContextParallelPlugin``: the same context parallelism for Hugging Face Accelerate training loops.

``cp.prepare(accelerator, *objects)`` stands in for ``accelerator.prepare(*objects)`` and adds only
what context parallelism changes, reusing the core the Lightning strategy uses:

- the mesh over the accelerator's processes, validated before any collective;
- diffusers models made context parallel (``cp_plugin.model``) before Accelerate wraps them in DDP;
- dataloaders sharded over *dp* ranks only (Accelerate's own ``prepare_data_loader`` with
  ``num_processes=dp``), every batch checked across the CP group and optionally sequence-sharded;
- RNG streams equal inside a CP group, distinct across dp;
- ``accelerator.gather`` (and so ``gather_for_metrics``) over dp ranks only, so CP replicas are not
  counted twice and metrics equal a single process's;
- exact mid-epoch resume with Accelerate's own calls: ``accelerator.skip_first_batches`` keeps the
  loader context parallel, and after ``accelerator.load_state`` the RNG states a loop finds when it
  starts the resumed epoch (those ``load_state`` restored) are set again at the first batch, because
  starting an epoch's iterator draws from the global RNG (as the uninterrupted run did before its
  first step, not after the saved one).

The plugin hooks into the user's ``Accelerator`` through its public hooks (``register_save_state_pre_hook``,
``register_load_state_pre_hook``) and torch's (``Optimizer.register_step_pre_hook``). Accelerate has
none for ``gather``, ``skip_first_batches`` and ``no_sync``: those are wrapped on that accelerator
only, through ``cp_plugin.compat.wrap_accelerator``, which records their signatures.

Gradient reduction, accumulation, clipping and mixed precision stay Accelerate's: collectives'
backwards are exact adjoints (``cp_plugin.sequence``), so DDP's plain mean is already right.
With ``ParallelConfig(fsdp=True)`` the models are sharded with FSDP2 over every rank instead
(``cp_plugin.fsdp``, as the Lightning strategy does; Accelerate's own FSDP does not run on CPU), the
optimizers are pointed at the sharded weights, and those models are left out of
``accelerator.prepare`` (which would wrap them in DDP, and save rank 0's optimizer shards as whole
states); FSDP2's reduce-scatter mean is DDP's mean, so training stays exact. Accumulation then
reduces every micro-batch (the mean is linear). ``accelerator.save_state`` then writes those models'
and optimizers' shards, each rank its own, with torch.distributed.checkpoint into ``<state dir>/sharded``
(``cp_plugin.checkpoint.ShardedFormat``; Accelerate writes the rest: schedulers, RNG, samplers), and
``load_state`` reads them into whatever layout loads them.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

try:
    from accelerate import Accelerator
    from accelerate.data_loader import prepare_data_loader
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.utils import DistributedDataParallelKwargs, recursively_apply
except ImportError as err:  # an optional extra: say which
    raise ImportError('cp_plugin.accelerate needs Accelerate: pip install "cp_plugin[accelerate]"') from err
from torch.utils.data import DataLoader

from cp_plugin.checkpoint import MODEL_KEY, OPTIMIZERS_KEY, ShardedFormat
from cp_plugin.compat import all_gather_tensor, mark_prepared, wrap_accelerator
from cp_plugin.core import ContextParallelCore, FirstBackwardSynced, SequenceShards
from cp_plugin.fsdp import shard_module
from cp_plugin.mesh import ParallelMesh
from cp_plugin.resume import rng_state

SHARDED_DIR = "sharded"  # inside a save_state folder: the DCP checkpoint of FSDP2 modules and optimizers


class ContextParallelDataLoader:
    """An Accelerate-prepared loader whose batches are checked across the CP group (and sharded)."""

    def __init__(self, loader: Any, plugin: ContextParallelPlugin) -> None:
        self.loader, self.plugin = loader, plugin

    def __iter__(self) -> Iterator[Any]:
        self.plugin._starting_epoch()
        for batch in self.loader:
            yield self.plugin.core.process_batch(batch)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # sampler, dataset, set_epoch, ... of the wrapped loader
        return getattr(self.loader, name)


class ContextParallelPlugin(SequenceShards):
    """Context parallelism (Ulysses/ring) x data parallelism for an ``Accelerator``'s training loop.

    ``parallel_config`` is the layout (``ParallelConfig``, a diffusers config, or a dict); the other
    options are ``ContextParallelCore`` 's, the same the Lightning strategy takes: ``cp_plan`` to
    supply or override plans, ``shard_batch`` / ``presharded_inputs`` / ``gather_outputs`` for
    loaders that shard sequences, ``check_batches`` for the per-batch CP-group consistency check, and
    ``on_nonfinite``: on NaN/Inf gradients the prepared optimizers ``"raise"`` naming the step and
    rank, or ``"skip"`` the step. Every rank checks at start-up that all ranks were given the same settings.
    """

    def __init__(self, parallel_config: Any = None, **options: Any) -> None:
        self.core = ContextParallelCore(parallel_config, **options)
        self._sharded: list[torch.nn.Module] = []  # FSDP2 modules and their optimizers, saved with DCP
        self._sharded_optimizers: list[torch.optim.Optimizer] = []
        self._format = ShardedFormat()
        self._static_graph = False  # DDP with a static graph for the models prepared (see _setup)
        self._resumed = False  # load_state ran since a loop last started an epoch

    @property
    def mesh(self) -> ParallelMesh | None:
        return self.core.mesh if self.core.started else None

    # the one-line change ----------------------------------------------------------------------
    def prepare(self, accelerator: Accelerator, *objects: Any) -> Any:
        """Like ``accelerator.prepare(*objects)``: the same objects, prepared, in the order given."""
        self._setup(accelerator, [obj for obj in objects if isinstance(obj, torch.nn.Module)])
        fsdp = self.core.parallel_config.fsdp
        staged, renamed = [], {}
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                self.core.apply(obj)
                if fsdp:
                    renamed.update(self._shard_weights(obj))
                    self._sharded.append(obj)
            staged.append(self._shard_over_dp(accelerator, obj) if isinstance(obj, DataLoader) else obj)
        sharded_params = {id(p) for module in self._sharded for p in module.parameters()}
        for obj in objects:
            if isinstance(obj, torch.optim.Optimizer) and renamed:  # built on the weights before sharding
                for group in obj.param_groups:
                    group["params"] = [renamed.get(p, p) for p in group["params"]]
            if isinstance(obj, torch.optim.Optimizer) and all(
                id(p) in sharded_params for group in obj.param_groups for p in group["params"]
            ) and sharded_params:
                self._sharded_optimizers.append(obj)  # saved with its modules' shards (save_state)
        # Sharded modules and their optimizers stay out of accelerator.prepare: on a MULTI_CPU/MULTI_GPU run it
        # would wrap the modules in DDP, and save_state would write rank 0's optimizer shards as whole states.
        handed = [i for i, obj in enumerate(staged) if not (fsdp and isinstance(obj, torch.nn.Module))
                  and not any(obj is o for o in self._sharded_optimizers)]
        prepared = list(staged)
        if handed:
            with self._ddp_options(accelerator):
                result = accelerator.prepare(*(staged[i] for i in handed))
            for i, obj in zip(handed, result if len(handed) > 1 else [result]):
                prepared[i] = obj
        for i, obj in enumerate(objects):
            if isinstance(obj, DataLoader):
                prepared[i] = ContextParallelDataLoader(prepared[i], self)
            elif isinstance(obj, torch.optim.Optimizer):
                if i not in handed:  # Accelerate's step / zero_grad under accumulation, unregistered
                    prepared[i] = AcceleratedOptimizer(obj, device_placement=accelerator.device_placement,
                                                       scaler=accelerator.scaler)
                self._guard(accelerator, prepared[i])
        return prepared[0] if len(prepared) == 1 else tuple(prepared)

    # internals --------------------------------------------------------------------------------
    def _setup(self, accelerator: Accelerator, modules: list[torch.nn.Module] | tuple[()] = ()) -> None:
        if self.core.started:
            return
        own_cp = getattr(getattr(accelerator, "parallelism_config", None), "cp_size", 1) or 1
        if own_cp > 1:
            raise ValueError(
                f"Accelerator(parallelism_config=ParallelismConfig(cp_size={own_cp})) is Accelerate's own context "
                "parallelism (causal LLMs, FSDP2); it cannot be combined with ContextParallelPlugin. Leave cp_size=1 "
                "and set ring_degree/ulysses_degree on the plugin's ParallelConfig"
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if accelerator.num_processes == 1 and launched > 1:
            raise ValueError(
                f"Accelerator sees num_processes={accelerator.num_processes} but {launched} processes were launched "
                "(WORLD_SIZE); on CPU create Accelerator(cpu=True) (or set ACCELERATE_USE_CPU=1) so it joins them"
            )
        # raises on every rank before any collective; "auto" degrees come from the models prepared first
        self.core.validate(accelerator.num_processes, modules=modules, device_type=accelerator.device.type)
        if accelerator.num_processes == 1 and not torch.distributed.is_initialized():
            # `python loop.py`: Accelerate makes no process group for one process; the mesh needs one, of one rank
            backend = "cpu:gloo,cuda:nccl" if accelerator.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        mesh = self.core.start(accelerator.device)
        wrap_accelerator(accelerator, "gather", lambda _: functools.partial(gather_over_dp, mesh))
        wrap_accelerator(accelerator, "skip_first_batches", self._skip_first_batches)
        accelerator.register_save_state_pre_hook(self._save_sharded)
        accelerator.register_load_state_pre_hook(self._load_sharded)
        self._report_failures()
        # As the Lightning strategy: DDP with a static graph unless the user set DDP options, whose first
        # backward must sync.
        self._static_graph = accelerator.ddp_handler is None and not self.core.parallel_config.fsdp
        if self._static_graph:
            first_backward = FirstBackwardSynced()
            wrap_accelerator(accelerator, "no_sync", lambda no_sync: functools.partial(first_backward.skip_sync, no_sync))

    @contextmanager
    def _ddp_options(self, accelerator: Accelerator) -> Iterator[None]:
        """The DDP options for the models ``accelerator.prepare`` wraps in this block (Accelerate reads its
        ``ddp_handler`` then): a static graph, unless the user gave their own; put back afterwards."""
        if not self._static_graph:
            yield
            return
        accelerator.ddp_handler = DistributedDataParallelKwargs(static_graph=True)
        try:
            yield
        finally:
            accelerator.ddp_handler = None

    def _shard_weights(self, module: torch.nn.Module) -> dict[torch.nn.Parameter, torch.nn.Parameter]:
        """FSDP2 over every rank (``cp_plugin.fsdp``); returns each old parameter's sharded replacement."""
        before = dict(module.named_parameters())
        shard_module(module, self.core.mesh.shard_mesh)
        after = dict(module.named_parameters())
        return {param: after[name] for name, param in before.items() if after[name] is not param}

    def _report_failures(self) -> None:
        """An error that ends the script is reported as under Lightning (``ContextParallelCore.report_failure``).

        Accelerate loops have no exception hook, so the plugin chains one onto ``sys.excepthook`` (Python's
        hook for an uncaught error; the previous one still runs): the failing rank records its error, and a
        rank whose collective broke names the failed rank. The launcher (torchrun) then ends every rank.
        """
        previous = sys.excepthook

        def report(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
            self.core.report_failure(error)
            previous(kind, error, traceback)

        sys.excepthook = report

    def _guard(self, accelerator: Accelerator, optimizer: AcceleratedOptimizer) -> None:
        """Check the gradients before each real step of a prepared optimizer (``on_nonfinite``), in a step pre-hook
        of the torch optimizer inside: Accelerate steps it only when gradients sync (not on accumulation micro-steps)."""
        steps_taken = [0]

        def guard(inner: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            where = lambda: f"step {steps_taken[0]}, rank {accelerator.process_index}"  # noqa: E731
            self.core.guard(optimizer, where, "ContextParallelPlugin(on_nonfinite='skip')")
            steps_taken[0] += 1

        optimizer.optimizer.register_step_pre_hook(guard)

    def _skip_first_batches(self, skip: Any) -> Any:
        """``accelerator.skip_first_batches`` that returns a loader still checked (and sharded) over CP."""

        def skip_first_batches(dataloader: Any, num_batches: int = 0) -> Any:
            if isinstance(dataloader, ContextParallelDataLoader):
                return ContextParallelDataLoader(skip(dataloader.loader, num_batches), self)
            return skip(dataloader, num_batches)

        return skip_first_batches

    def _sharded_root(self) -> torch.nn.Module:
        """The FSDP2 modules as one module (parameter names prefixed ``0.``, ``1.``, ... when several)."""
        return self._sharded[0] if len(self._sharded) == 1 else torch.nn.ModuleList(self._sharded)

    def _save_sharded(self, models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
        """``save_state`` pre-hook: the FSDP2 modules and their optimizers as DCP shards (no gather) in
        ``<output_dir>/sharded``, every rank writing its own; Accelerate saves the rest."""
        if self._sharded:
            root = self._sharded_root()
            states = {MODEL_KEY: self._format.model_state(root),
                      OPTIMIZERS_KEY: [self._format.optimizer_state(root, o) for o in self._sharded_optimizers]}
            self._format.save(root, states, Path(output_dir) / SHARDED_DIR)

    def _load_sharded(self, models: list[torch.nn.Module], input_dir: str) -> None:
        """``load_state`` pre-hook: the FSDP2 modules' and optimizers' shards, resharded to this layout; and a note
        that a loop's next epoch is the resumed one (:meth:`_starting_epoch`)."""
        self._resumed = True
        if self._sharded:
            root = self._sharded_root()
            checkpoint = self._format.load(Path(input_dir) / SHARDED_DIR)
            self._format.load_model_state(root, checkpoint)
            self._format.load_optimizer_state(root, self._sharded_optimizers, checkpoint)

    def _starting_epoch(self) -> None:
        """A loop starts iterating a loader: after ``load_state``, set the RNG states it finds (those ``load_state``
        restored) again at the first batch, since starting the iterator draws from them."""
        if self._resumed:
            self._resumed = False
            self.core.restore_rng_at_next_batch(rng_state())

    def _shard_over_dp(self, accelerator: Accelerator, loader: DataLoader) -> Any:
        """Accelerate's own sharding, over dp ranks: the ranks of a CP group get the same batches."""
        mesh = self.core.mesh
        prepared = prepare_data_loader(
            loader,
            accelerator.device,
            num_processes=mesh.dp_size,
            process_index=mesh.dp_rank,
            split_batches=accelerator.split_batches,
            put_on_device=accelerator.device_placement,
            rng_types=accelerator.rng_types.copy(),
            dispatch_batches=False,  # dispatching from rank 0 would slice by global rank
            even_batches=accelerator.even_batches,
            use_seedable_sampler=accelerator.use_seedable_sampler,
            data_seed=accelerator.dataloader_config.data_seed,
            non_blocking=accelerator.non_blocking,
            use_stateful_dataloader=accelerator.use_stateful_dataloader,
        )
        return mark_prepared(prepared)  # accelerator.prepare then registers it as is, unsharded again


def gather_over_dp(mesh: ParallelMesh, tensor: Any) -> Any:
    """``Accelerator.gather`` over the dp group: one copy per data-parallel replica, in dp order."""

    def one(t: torch.Tensor) -> torch.Tensor:
        t = t[None] if t.dim() == 0 else t
        return all_gather_tensor(t.contiguous(), 0, mesh.dp_group)

    return recursively_apply(one, tensor, error_on_other_type=True)
