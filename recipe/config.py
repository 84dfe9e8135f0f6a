"""Hydra wiring of the training recipe: schemas, the ``cp_devices`` resolver, ``resume``, ``--multirun``.

Each config group (``parallel``, ``model``, ``data``, ``optimizer``) has a dataclass schema in
Hydra's ConfigStore, so a typo or a wrong type in an override fails at composition with Hydra's
own error, and values are validated again when the dataclass is built.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd
from omegaconf import OmegaConf

from cp_plugin.checkpoint import is_complete
from cp_plugin.config import register_configs as register_parallel_config
from recipe.data import DataConfig
from recipe.flow_matching import OptimizerConfig
from recipe.latents import LatentsConfig
from recipe.models import ModelConfig


def cp_devices(ring_degree: int | str, ulysses_degree: int | str, dp_degree: int | None) -> int:
    """Processes per node: torchrun's when launched by it, else what the layout needs.

    An ``"auto"`` degree is chosen from these processes later, so it asks for 2 (the fewest that give
    it a choice): ``parallel=auto`` runs 2 processes unless ``trainer.devices`` says more.
    """
    launched = os.environ.get("LOCAL_WORLD_SIZE")
    if launched:
        return int(launched)
    fixed = [d for d in (ring_degree, ulysses_degree) if d != "auto"]
    return (fixed[0] * fixed[1] if len(fixed) == 2 else 2 * (fixed or [1])[0]) * (dp_degree or 1)


def register_configs() -> None:
    """Schemas for every group and the ``${cp_devices:...}`` resolver (idempotent)."""
    register_parallel_config()
    store = ConfigStore.instance()
    store.store(group="model", name="schema", node=ModelConfig)
    store.store(group="data", name="schema", node=DataConfig)
    store.store(group="data", name="latents_schema", node=LatentsConfig)
    store.store(group="optimizer", name="schema", node=OptimizerConfig)
    OmegaConf.register_new_resolver("cp_devices", cp_devices, replace=True)


def resolve_checkpoint(resume: str | None, runs_root: Path, run_dir: Path) -> str | None:
    """``resume`` as a checkpoint to load, or ``None`` to start fresh.

    ``"auto"``: the newest complete checkpoint in this run's own ``checkpoints/`` if there is one (a run
    that ``torchrun --max-restarts`` restarted after a lost rank), else none; ``"last"``: the newest
    ``last.ckpt`` under ``runs_root``; a run directory: its ``checkpoints/last.ckpt``; or a file.
    """
    if resume is None:
        return None
    if resume == "auto":
        found = newest_complete(run_dir / "checkpoints")
        if found is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
            warnings.warn(f"resume=auto: this is restart {os.environ['TORCHELASTIC_RESTART_COUNT']} but "
                          f"{run_dir}/checkpoints holds no complete checkpoint; training starts over. Give the run "
                          "a fixed hydra.run.dir so that restarts find the checkpoints of the attempt before")
        return found
    if resume == "last":
        candidates = sorted(runs_root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"resume=last: no checkpoints/last.ckpt under {runs_root}; train first or pass a path")
        return str(candidates[-1])
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise FileNotFoundError(f"resume={resume!r}: {path} does not exist; pass a checkpoint or a run directory")
    return str(path)


def newest_complete(folder: Path) -> str | None:
    """The most recently written checkpoint (file or sharded folder) in ``folder`` whose save finished:
    a kill can cut one short, and ``is_complete`` tells (``cp_plugin.checkpoint``)."""
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    return next((str(path) for path in candidates if is_complete(path)), None)


def in_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def run_sweep_job_as_single_run() -> None:
    """Run the current ``--multirun`` job as a plain ``python train.py <its overrides>`` in a new process.

    Lightning's launcher starts ranks 1.. with this process's command line, which under
    ``--multirun`` is the whole sweep, and keeps the process group alive after ``fit``, so the next
    job would inherit the last job's world size. A fresh single run per job has neither problem and
    writes into the job's own directory.
    """
    if "LOCAL_WORLD_SIZE" in os.environ:
        raise RuntimeError(
            "--multirun under torchrun is not supported (every rank would run the whole sweep); "
            "run `python train.py --multirun ...` and let Lightning start each job's processes"
        )
    hydra = HydraConfig.get()
    command = [sys.executable, sys.argv[0], *hydra.overrides.task, f"hydra.run.dir={hydra.runtime.output_dir}"]
    subprocess.run(command, cwd=get_original_cwd(), check=True)
