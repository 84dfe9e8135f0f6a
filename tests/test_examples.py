"""The examples the README points to run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


TRAINED = re.compile(r"trained (\d+) steps, loss (\S+), update norm (\S+)")


def own_module(tmp_path: Path, *processes: str) -> tuple[int, float, float]:
    """Run the example; its steps, last loss and the norm of its weights' update."""
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "own_module.py"), *processes], cwd=tmp_path,
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps, loss, update = TRAINED.search(result.stdout).groups()
    return int(steps), float(loss), float(update)


@pytest.mark.timeout(600)
def test_your_own_lightning_module_trains_under_the_strategy_as_on_one_process(tmp_path: Path) -> None:
    """Ring 2 against the same script on one process: the last loss and the size of the weights' update agree to
    float rounding (measured: the loss to 1e-9, the update to 1e-8); a sequence whose halves did not attend to each
    other, or a step that did not run, moves both far more."""
    steps, loss, update = own_module(tmp_path)
    assert steps == 4  # one epoch of 8 samples, batch 2, on the one CP group
    one_steps, one_loss, one_update = own_module(tmp_path, "1")
    assert one_steps == steps
    assert abs(loss - one_loss) <= 1e-5 * abs(one_loss), (loss, one_loss)
    assert abs(update - one_update) <= 1e-5 * one_update, (update, one_update)
