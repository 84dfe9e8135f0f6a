"""``python -m benchmarks.<name>`` relaunching itself under ``torchrun``, for the benchmarks whose every rank
measures: the same module then runs unchanged under your own launcher (``torchrun -m benchmarks.<name>``)."""

from __future__ import annotations

import os
import subprocess
import sys


def relaunch_under_torchrun(module: str, world: int) -> None:
    """Run ``python -m module`` 's own arguments on ``world`` torchrun processes, passing ``--command`` (how it
    was invoked) for the report."""
    command = f"python -m {module} " + " ".join(sys.argv[1:])
    subprocess.run(
        ["torchrun", "--standalone", f"--nproc-per-node={world}", "-m", module, *sys.argv[1:],
         "--command", command.strip()],
        check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
