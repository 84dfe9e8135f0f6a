"""A failing rank never leaves the others hanging: every rank exits, promptly, saying which rank failed.

Real launchers: Lightning's own (``python script.py``, it starts the other ranks) and ``torchrun``.
Rank 1 raises, is SIGKILLed, or hangs at step 2 of ring-attention training (``scripts/fail_rank.py``).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

SCRIPT = Path(__file__).resolve().parent / "scripts" / "fail_rank.py"
PG_TIMEOUT_S = 10.0


def run(mode: str, torchrun: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    """Run the script to its end; return the result and seconds from the injected failure to the exit."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if torchrun \
        else [sys.executable]
    cmd = [*launcher, str(SCRIPT), "--mode", mode, "--timeout", str(PG_TIMEOUT_S)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    ended = time.time()
    injected = float(re.search(r"injecting '\w+' at step 2 at ([\d.]+)", result.stdout + result.stderr).group(1))
    return result, ended - injected


def leftover_ranks() -> list[int]:
    time.sleep(0.5)
    return [p.pid for p in psutil.process_iter(["cmdline"]) if str(SCRIPT) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    ("mode", "message", "limit_s"),
    [
        ("raise", r"\[cp_plugin\] rank 1 failed: ValueError: injected failure", 5.0),
        ("kill", r"terminated with code -9", 10.0),  # Lightning's child-process observer polls every 5 s
        ("hang", r"Timed out .*\n.*\[cp_plugin\] no other rank reported an error", PG_TIMEOUT_S + 5.0),
    ],
)
def test_lightning_launcher_exits_every_rank(mode: str, message: str, limit_s: float) -> None:
    result, seconds = run(mode)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert seconds < limit_s, f"{mode}: {seconds:.1f}s from failure to exit"
    assert leftover_ranks() == []


@pytest.mark.timeout(200)
def test_torchrun_names_the_killed_rank() -> None:
    result, seconds = run("kill", torchrun=True)
    assert result.returncode != 0
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9", result.stderr), result.stderr[-3000:]
    assert seconds < 10.0
    assert leftover_ranks() == []
