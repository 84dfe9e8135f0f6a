"""A failing rank never leaves the others hanging: every rank exits, promptly, saying which rank failed.

Real launchers: Lightning's own (``python script.py``, it starts the other ranks) and ``torchrun``.
Rank 1 raises, is SIGKILLed, or hangs at step 2 of ring-attention training (``scripts/fail_rank.py``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.failures import CASES, PG_TIMEOUT_S, leftover_ranks, run

LIMITS_S = {  # seconds from the injected failure to the last exit
    ("raise", False): 5.0,
    ("kill", False): 10.0,  # Lightning's child-process observer polls every 5 s
    ("hang", False): PG_TIMEOUT_S + 5.0,  # the peers give up at the process-group timeout
    ("kill", True): 10.0,
}


@pytest.mark.timeout(200)
@pytest.mark.parametrize(("mode", "torchrun", "message"), CASES, ids=[f"{m}-{'torchrun' if t else 'lightning'}" for m, t, _ in CASES])
def test_every_rank_exits_promptly_naming_the_failure(mode: str, torchrun: bool, message: str) -> None:
    result, seconds = run(mode, torchrun)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert seconds < LIMITS_S[(mode, torchrun)], f"{mode}: {seconds:.1f}s from failure to exit"
    assert leftover_ranks() == []


@pytest.mark.timeout(120)
def test_a_finished_run_exits_zero() -> None:
    """Gloo's worker threads free each op's tensors after the op returns; if that happens during
    interpreter shutdown the rank aborts ("terminate called without an active exception") and the
    launcher reports a failed run. Twelve rank exits: without the teardown most runs abort."""
    script = Path(__file__).parent / "scripts" / "clean_exit.py"
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(script)],
            capture_output=True, text=True, timeout=100,
        )
        assert result.returncode == 0, result.stderr[-3000:]
