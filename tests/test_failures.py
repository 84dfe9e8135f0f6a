"""A failing rank never leaves the others hanging: every rank exits, promptly, saying which rank failed.

Real launchers: Lightning's own (``python script.py``, it starts the other ranks) and ``torchrun``.
Rank 1 raises, is SIGKILLed, or hangs at step 2 of ring-attention training (``scripts/fail_rank.py``),
which writes a checkpoint after every step. What is asserted is behaviour: a non-zero exit, within
the case's bound, no rank left running, a message that names the failed rank or says that a peer
vanished (any of the correct wordings: which process notices first is a race), and every checkpoint
written before the failure still loads.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.failures import CASES, Case, leftover_ranks, loads, run


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_rank_exits_promptly_naming_the_failure(case: Case, tmp_path: Path) -> None:
    outcome = run(case, tmp_path)
    assert outcome.seconds is not None, f"rank 1 never reached step 2:\n{outcome.output[-3000:]}"
    assert outcome.returncode != 0
    assert outcome.message(case), f"no message names the failure ({case.messages}):\n{outcome.output[-3000:]}"
    assert outcome.seconds < case.limit_s, f"{case.name}: {outcome.seconds:.1f}s from failure to exit"
    assert leftover_ranks() == []
    written = [c.name for c in outcome.checkpoints]
    assert len(written) >= 2 and all(loads(c) for c in outcome.checkpoints), written  # steps 1 and 2


@pytest.mark.timeout(120)
def test_a_finished_run_exits_zero() -> None:
    """Gloo's worker threads free each op's tensors after the op returns; if that happens during
    interpreter shutdown the rank aborts ("terminate called without an active exception") and the
    launcher reports a failed run. Eight rank exits: without the teardown, one four-rank launch in six aborted
    (torch 2.13, 2 cores), so this catches a lost teardown some of the time, not every time."""
    script = Path(__file__).parent / "scripts" / "clean_exit.py"
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(script)],
            capture_output=True, text=True, timeout=100,
        )
        assert result.returncode == 0, result.stderr[-3000:]
