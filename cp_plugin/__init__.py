"""cp_plugin: exact context-parallel training of diffusion transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cp_plugin.compat import check_versions
from cp_plugin.config import ParallelConfig
from cp_plugin.mesh import ParallelMesh
from cp_plugin.model import Conversion, apply_context_parallel, remove_context_parallel

if TYPE_CHECKING:
    from cp_plugin.lightning import ContextParallelStrategy

__all__ = [
    "ContextParallelStrategy", "Conversion", "ParallelConfig", "ParallelMesh", "apply_context_parallel",
    "remove_context_parallel",
]


def __getattr__(name: str) -> Any:
    """``ContextParallelStrategy`` on first use: it imports Lightning, which an Accelerate run never loads."""
    if name == "ContextParallelStrategy":
        from cp_plugin.lightning import ContextParallelStrategy

        return ContextParallelStrategy
    raise AttributeError(f"module 'cp_plugin' has no attribute {name!r}")


check_versions()
