"""Hydra wiring of the training recipe: structured schemas, the ``cp_devices`` resolver, ``resume``.

Each config group (``parallel``, ``model``, ``data``, ``optimizer``) has a dataclass schema in
Hydra's ConfigStore, so a typo or a wrong type in an override fails at composition with Hydra's
own error, and values are validated again when the dataclass is built.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from cp_plugin.config import register_configs as register_parallel_config
from cp_plugin.recipes.data import DataConfig
from cp_plugin.recipes.flow_matching import OptimizerConfig
from cp_plugin.recipes.models import ModelConfig


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
