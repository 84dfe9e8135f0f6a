"""The test launcher (``tests/launcher.py``) reports every rank that failed, not only the first.

The first rank to report an error is not always the cause: a rank whose peer failed may report only
a reset connection. So when one rank fails, the others' errors (those that come within the launcher's
grace period) are reported with it.
"""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist
from launcher import run_distributed


def _fail_in_turn() -> None:
    """Rank 1 fails at once; rank 0 a moment later, with its own error."""
    if dist.get_rank() == 1:
        raise ValueError("the cause, on rank 1")
    time.sleep(0.5)
    raise ConnectionResetError("a peer went away, on rank 0")


def test_every_failing_rank_is_reported() -> None:
    with pytest.raises(RuntimeError) as failure:
        run_distributed(_fail_in_turn, 2, timeout=60)
    message = str(failure.value)
    assert "rank 0 failed" in message and "a peer went away, on rank 0" in message
    assert "rank 1 failed" in message and "the cause, on rank 1" in message
