"""``python -m benchmarks.<name>`` relaunching itself under ``torchrun``, for the benchmarks whose every rank
measures: the same module then runs unchanged under your own launcher (``torchrun -m benchmarks.<name>``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable


def relaunch_under_torchrun(module: str, world: int) -> None:
    """Run ``python -m module`` 's own arguments on ``world`` torchrun processes, passing ``--command`` (how it
    was invoked) for the report."""
    command = f"python -m {module} " + " ".join(sys.argv[1:])
    subprocess.run(
        ["torchrun", "--standalone", f"--nproc-per-node={world}", "-m", module, *sys.argv[1:],
         "--command", command.strip()],
        check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def driver_parser(description: str, world: int) -> argparse.ArgumentParser:
    """A benchmark's parser with the two arguments every such driver takes: ``--world`` (how many processes it
    launches) and the hidden ``--command`` (how the driver was invoked, passed on for the report)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--world", type=int, default=world, help="processes the driver launches (ignored under torchrun)")
    parser.add_argument("--command", help=argparse.SUPPRESS)
    return parser


def run_or_relaunch(module: str, args: argparse.Namespace, run_rank: Callable[[argparse.Namespace], None]) -> None:
    """Under torchrun (``RANK`` set), run this rank's body; otherwise relaunch ``module`` on ``args.world`` processes."""
    if "RANK" in os.environ:
        run_rank(args)
    else:
        relaunch_under_torchrun(module, args.world)
