"""Failure injection: how fast every rank exits when one rank raises, is killed, or hangs.

    python -m benchmarks.failures            # writes benchmarks/results/failures.md

Runs ``tests/scripts/fail_rank.py`` (ring-2 training; rank 1 fails at step 2) under Lightning's own
launcher and under ``torchrun``, and reports what each launcher said, the seconds from the
injected failure to the last process's exit, and whether any rank outlived the run.
``tests/test_failures.py`` asserts the same measurements against their limits.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "scripts" / "fail_rank.py"
PG_TIMEOUT_S = 10.0
CASES = [  # (mode, launched by torchrun, message that must name the failure)
    ("raise", False, r"\[cp_plugin\] rank 1 failed: ValueError: injected failure"),
    ("kill", False, r"terminated with code -9"),  # Lightning's child-process observer polls every 5 s
    ("hang", False, r"Timed out .*\n.*\[cp_plugin\] no other rank reported an error"),
    ("kill", True, r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9"),
]


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
    """PIDs of processes still running the failure script (orphans)."""
    time.sleep(0.5)
    return [p.pid for p in psutil.process_iter(["cmdline"]) if str(SCRIPT) in " ".join(p.info["cmdline"] or [])]


def main() -> None:
    lines = [
        "# Failure injection: rank 1 of a ring-2 training fails at step 2",
        "",
        f"`python -m benchmarks.failures`; process-group timeout {PG_TIMEOUT_S:g} s.",
        "",
        "| launcher | failure injected | what every rank reported | seconds to exit | ranks left running |",
        "|---|---|---|---|---|",
    ]
    for mode, torchrun, message in CASES:
        result, seconds = run(mode, torchrun)
        found = re.search(message, result.stderr)
        said = found.group(0).replace("\n", " / ") if found else f"(expected message missing; exit {result.returncode})"
        lines.append(f"| {'torchrun' if torchrun else 'Lightning'} | {mode} | `{said}` | {seconds:.1f} | "
                     f"{len(leftover_ranks())} |")
    report = "\n".join(lines) + "\n"
    out = Path("benchmarks/results/failures.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
