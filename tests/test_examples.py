"""The examples the README points to run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_your_own_lightning_module_trains_under_the_strategy(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "own_module.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "trained 4 steps, loss" in result.stdout  # one epoch of 8 samples, batch 2, on the one CP group
