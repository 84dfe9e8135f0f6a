"""Failure injection: how fast every rank exits when one rank raises, is killed, or hangs.

    python -m benchmarks.failures            # writes benchmarks/results/failures.md

Runs ``tests/scripts/fail_rank.py`` (ring-2 training, a checkpoint after every step; rank 1 fails
at step 2) under Lightning's own launcher and under ``torchrun``, and reports what the launcher
and the surviving rank said, the seconds from the injected failure to the last process's exit,
whether any rank outlived the run, and whether every checkpoint written before the failure loads.
``tests/test_failures.py`` asserts the same measurements against their limits.

Which of several correct messages appears depends on which process notices first (the launcher's
child watcher, the peer's broken collective, torchrun's monitor), so each case accepts every
message that names the failed rank or says that a peer vanished.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from benchmarks.provenance import describe
from benchmarks.readme import DOCS, replace_section

SCRIPTS = Path(__file__).resolve().parents[1] / "tests" / "scripts"
SCRIPT = {"lightning": SCRIPTS / "fail_rank.py", "accelerate": SCRIPTS / "fail_rank_accelerate.py"}
# Long enough that a 2-core machine under load starts both ranks within it (process-group set-up
# waits this long for the peer too).
PG_TIMEOUT_S = 60.0
# The hang case exits only at its timeout, so it takes a shorter one: still several times what a rank spends importing
# torch, diffusers and Lightning before it joins the group (5 s on 2 cores).
HANG_TIMEOUT_S = 30.0
FAILED_RANK_RECORD = r"\[cp_plugin\] rank 1 failed: ValueError: injected failure"
PEER_VANISHED = (r"\[cp_plugin\] no other rank reported an error: a rank was killed, ran out of memory, or is stuck"
                 r"|\[cp_plugin\] the failure store is unreachable")
LAUNCHER_SAW_RANK_DIE = r"terminated with code -?\d+"
TORCHRUN_NAMES_RANK_1 = r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9"
# A rank that raised exits by itself: code 1, or an abort (-6) where gloo's threads end during its interpreter's
# shutdown (tests/test_failures.py::test_a_finished_run_exits_zero); any code but the SIGTERM torchrun sends the others.
TORCHRUN_NAMES_FAILED_RANK_1 = r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: (?!-15\b)-?\d+"


@dataclass(frozen=True)
class Case:
    """One injected failure, the launcher, what may be reported, and the bound on seconds to exit."""

    mode: str
    torchrun: bool
    messages: str  # alternatives, any one must appear in the output
    limit_s: float
    adapter: str = "lightning"  # which training loop: the Lightning strategy, or an Accelerate loop (torchrun)
    timeout_s: float = PG_TIMEOUT_S  # the process group's timeout

    @property
    def name(self) -> str:
        return f"{self.mode}-{'torchrun' if self.torchrun else 'lightning'}" + ("-accelerate" if self.adapter == "accelerate" else "")


DOCS_START, DOCS_END = "<!-- failures table: python -m benchmarks.failures -->", "<!-- end of failures table -->"
CASES = [
    Case("raise", False, FAILED_RANK_RECORD, 15.0),
    Case("kill", False, f"{LAUNCHER_SAW_RANK_DIE}|{PEER_VANISHED}", 20.0),  # Lightning's child watcher polls every 5 s
    # peers give up at the timeout
    Case("hang", False, f"{PEER_VANISHED}|{LAUNCHER_SAW_RANK_DIE}", HANG_TIMEOUT_S + 20.0, timeout_s=HANG_TIMEOUT_S),
    Case("kill", True, f"{TORCHRUN_NAMES_RANK_1}|{PEER_VANISHED}", 20.0),
    Case("raise", True, f"{FAILED_RANK_RECORD}|{TORCHRUN_NAMES_FAILED_RANK_1}", 20.0, "accelerate"),
    Case("kill", True, f"{TORCHRUN_NAMES_RANK_1}|{PEER_VANISHED}", 20.0, "accelerate"),
]


@dataclass
class Outcome:
    returncode: int
    output: str
    seconds: float | None  # from the injected failure to the last exit; None: the failure was never injected
    checkpoints: list[Path]

    def message(self, case: Case) -> str | None:
        found = re.search(case.messages, self.output)
        return found.group(0) if found else None


def run(case: Case, ckpt_dir: Path) -> Outcome:
    """Run the script to its end; the output, and seconds from the injected failure to the exit."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if case.torchrun \
        else [sys.executable]
    cmd = [*launcher, str(SCRIPT[case.adapter]), "--mode", case.mode, "--timeout", str(case.timeout_s), "--ckpt-dir", str(ckpt_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=PG_TIMEOUT_S * 3)
    ended = time.time()
    output = result.stdout + result.stderr
    injected = re.search(r"injecting '\w+' at step 2 at ([\d.]+)", output)
    return Outcome(result.returncode, output, ended - float(injected.group(1)) if injected else None,
                   sorted(ckpt_dir.glob("step=*")))


def loads(checkpoint: Path) -> bool:
    """Whether a checkpoint reads back whole: a Lightning file (weights and its step) or an Accelerate state folder."""
    try:
        if checkpoint.is_dir():
            from safetensors.torch import load_file

            return bool(load_file(checkpoint / "model.safetensors"))
        state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - a truncated or corrupt file is the finding
        return False
    return bool(state.get("state_dict")) and "global_step" in state


def leftover_ranks() -> list[int]:
    """PIDs of processes still running the failure script (orphans)."""
    time.sleep(0.5)
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(str(script) in " ".join(p.info["cmdline"] or []) for script in SCRIPT.values())]


def main() -> None:
    lines = [
        "# Failure injection: rank 1 of a ring-2 training fails at step 2",
        "",
        f"{describe('python -m benchmarks.failures')} Process-group timeout {PG_TIMEOUT_S:g} s ({HANG_TIMEOUT_S:g} s where a "
        "rank hangs: the others exit at it); a checkpoint after every step.",
        "",
        "| launcher | failure injected | what was reported | seconds to exit (bound) | ranks left running "
        "| checkpoints written before the failure that load |",
        "|---|---|---|---|---|---|",
    ]
    for case in CASES:
        with tempfile.TemporaryDirectory() as ckpt_dir:
            outcome = run(case, Path(ckpt_dir))
            said = " ".join((outcome.message(case) or f"(no accepted message; exit {outcome.returncode})").split())
            seconds = "not injected" if outcome.seconds is None else f"{outcome.seconds:.1f}"
            loaded = sum(loads(c) for c in outcome.checkpoints)
            launcher = ("torchrun" if case.torchrun else "Lightning") + (" (Accelerate loop)" if case.adapter == "accelerate" else "")
            lines.append(f"| {launcher} | {case.mode} | `{said}` | "
                         f"{seconds} ({case.limit_s:g}) | {len(leftover_ranks())} | {loaded} of {len(outcome.checkpoints)} |")
    report = "\n".join(lines) + "\n"
    out = Path("benchmarks/results/failures.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    replace_section(DOCS_START, DOCS_END, "\n".join(line for line in lines if line.startswith("|")), DOCS / "benchmarks.md")
    print(report)


if __name__ == "__main__":
    main()
