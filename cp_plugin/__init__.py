"""cp_plugin: exact context-parallel training of diffusion transformers."""

from cp_plugin.compat import check_versions
from cp_plugin.config import ParallelConfig
from cp_plugin.lightning import ContextParallelStrategy
from cp_plugin.mesh import ParallelMesh

__all__ = ["ContextParallelStrategy", "ParallelConfig", "ParallelMesh"]

check_versions()
