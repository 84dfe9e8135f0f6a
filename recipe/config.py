"""Hydra wiring of the training recipe: schemas, the ``cp_devices`` resolver, ``resume``, ``--multirun``.

Each config group (``parallel``, ``model``, ``data``, ``optimizer``) has a dataclass schema in
Hydra's ConfigStore, so a typo or a wrong type in an override fails at composition with Hydra's
own error, and values are validated again when the dataclass is built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd
from omegaconf import OmegaConf

from cp_plugin.config import register_configs as register_parallel_config
from recipe.data import DataConfig
from recipe.flow_matching import OptimizerConfig
from recipe.latents import LatentsConfig
from recipe.models import ModelConfig


def cp_devices(ring_degree: int, ulysses_degree: int, dp_degree: int | None) -> int:
    """Processes per node: torchrun's when launched by it, else what the layout needs."""
    launched = os.environ.get("LOCAL_WORLD_SIZE")
    return int(launched) if launched else ring_degree * ulysses_degree * (dp_degree or 1)


def register_configs() -> None:
    """Schemas for every group and the ``${cp_devices:...}`` resolver (idempotent)."""
    register_parallel_config()
    store = ConfigStore.instance()
    store.store(group="model", name="schema", node=ModelConfig)
    store.store(group="data", name="schema", node=DataConfig)
    store.store(group="data", name="latents_schema", node=LatentsConfig)
    store.store(group="optimizer", name="schema", node=OptimizerConfig)
    OmegaConf.register_new_resolver("cp_devices", cp_devices, replace=True)


def resolve_checkpoint(resume: str | None, runs_root: Path) -> str | None:
    """``resume`` as a checkpoint file: a file, a run directory (its ``checkpoints/last.ckpt``), or
    ``"last"``, the newest ``last.ckpt`` under ``runs_root``."""
    if resume is None:
        return None
    if resume == "last":
        candidates = sorted(runs_root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"resume=last: no checkpoints/last.ckpt under {runs_root}; train first or pass a path")
        return str(candidates[-1])
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"resume={resume!r}: {path} does not exist; pass a .ckpt file or a run directory")
    return str(path)


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
