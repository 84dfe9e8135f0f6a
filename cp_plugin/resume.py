"""Random-number states for exact resume, whichever framework saves them.

Starting an epoch's data iterator draws from the global RNG, which the uninterrupted run did before
its first step, not after the saved one: a resumed run sets the saved states again when its first
batch arrives (``ContextParallelCore.restore_rng_at_next_batch``). The states are those of every
generator a training step draws from (torch, CUDA, numpy, Python), in the layout Lightning's
``_collect_rng_states`` uses, with numpy's key array as a list so ``torch.load(weights_only=True)``
reads it. The Lightning adapter also saves them per rank (``cp_plugin.lightning_resume``).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch, CUDA (every device), numpy and Python."""
    kind, keys, *rest = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), *rest),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every RNG this process draws from to ``state`` (from :func:`rng_state`)."""
    torch.set_rng_state(state["torch"])
    if "torch.cuda" in state:
        torch.cuda.set_rng_state_all(state["torch.cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
