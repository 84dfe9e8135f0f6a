"""The README's main job, measured: ``python train.py`` with no arguments, from start to exit.

    python -m benchmarks.default_run        # writes benchmarks/results/default_run.md

Runs the default training (tiny Flux, ring 2 on 2 processes, 300 steps, W&B offline) into a
temporary run directory and reports the wall time of the whole command, the time spent in
training steps, tokens/s after the first step (``throughput.json``, written by the recipe's
``TrainingMonitor``) and the loss at the start and the end (the moving average of
``loss_curve.json``). These figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.provenance import describe

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        subprocess.run([sys.executable, "train.py", f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        throughput = json.loads((Path(run_dir) / "throughput.json").read_text())
        curve = json.loads((Path(run_dir) / "loss_curve.json").read_text())
    report = "\n".join([
        "# The default run: `python train.py`",
        "",
        f"{describe('python -m benchmarks.default_run')} Tiny Flux, ring attention over 2 processes, 300 steps, W&B "
        "offline; the figures depend on the machine and on its load.",
        "",
        "| wall time of the command | seconds in training steps | image tokens/s (after step 1) | steps | "
        "loss, mean of the first / last 20 steps |",
        "|---|---|---|---|---|",
        f"| {wall:.0f} s | {throughput['train_step_seconds']:.0f} s | {throughput['tokens_per_s_after_first_step']:.0f} | "
        f"{throughput['steps']} | {curve['mean'][0]:.2f} / {curve['mean'][-1]:.2f} |",
        "",
    ])
    out = ROOT / "benchmarks" / "results" / "default_run.md"
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
