"""The examples the README points to run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


TRAINED = re.compile(r"trained (\d+) steps, loss (\S+), update norm (\S+)")


def run_example(tmp_path: Path, *command: str) -> tuple[int, float, float]:
    """Run an example; its steps, last loss and the norm of its weights' update."""
    result = subprocess.run([sys.executable, *command], cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps, loss, update = TRAINED.search(result.stdout).groups()
    return int(steps), float(loss), float(update)


def assert_as_on_one_process(ring: tuple[int, float, float], one: tuple[int, float, float]) -> None:
    """The last loss and the size of the weights' update agree to float rounding (measured: the loss to 1e-9, the
    update to 1e-7); a sequence whose halves did not attend to each other, or a step that did not run, moves both far
    more."""
    (steps, loss, update), (one_steps, one_loss, one_update) = ring, one
    assert steps == one_steps == 4  # one epoch of 8 samples, batch 2, on the one CP group
    assert abs(loss - one_loss) <= 1e-5 * abs(one_loss), (loss, one_loss)
    assert abs(update - one_update) <= 1e-5 * one_update, (update, one_update)


@pytest.mark.timeout(600)
def test_your_own_lightning_module_trains_under_the_strategy_as_on_one_process(tmp_path: Path) -> None:
    """examples/own_module.py: ring 2 against the same script on one process."""
    script = str(ROOT / "examples" / "own_module.py")
    assert_as_on_one_process(run_example(tmp_path, script), run_example(tmp_path, script, "1"))


@pytest.mark.timeout(600)
def test_your_own_accelerate_loop_trains_under_the_plugin_as_on_one_process(tmp_path: Path) -> None:
    """examples/own_loop.py: under torchrun with ring 2 against ``python`` on one process (no process group: the
    plugin makes one of one rank)."""
    script = str(ROOT / "examples" / "own_loop.py")
    ring = run_example(tmp_path, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script)
    assert_as_on_one_process(ring, run_example(tmp_path, script))
