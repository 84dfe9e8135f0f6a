"""The benchmark instruments measure what they claim: a benchmark that computes the wrong thing is worse than none.

Only correctness here (tiny sizes, one process); timings and ratios live in ``benchmarks/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from benchmarks import blockwise


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("ring", [2, 4])
def test_blockwise_step_equals_fused_sdpa(dtype: torch.dtype, tol: float, ring: int) -> None:
    """One ring rank's blockwise compute gives the fused SDPA's output and q/k/v gradients."""
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 2, 256, 32, generator=g).to(dtype) for _ in range(2))
    q, grad_out = (torch.randn(1, 2, 256 // ring, 32, generator=g).to(dtype) for _ in range(2))
    got = blockwise.blockwise_step(q, k, v, grad_out, ring)
    want = blockwise.fused_step(q, k, v, grad_out)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert blockwise.max_rel_error(got, want) < tol
    # teeth: the error measure sees a wrong gradient (dk zeroed)
    truncated = (got[0], got[1], torch.zeros_like(got[2]), got[3])
    assert blockwise.max_rel_error(truncated, want) > 0.5


@pytest.mark.timeout(120)
def test_blockwise_benchmark_writes_its_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["blockwise", "--device", "cpu", "--dtype", "fp32", "--seq", "256", "--ring", "2", "--heads", "2",
            "--head-dim", "32", "--repeats", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    blockwise.main()
    table = (tmp_path / "blockwise_cpu.md").read_text()
    row = [line for line in table.splitlines() if line.startswith("| 256 | 2 |")]
    assert len(row) == 1 and float(row[0].split("|")[-2]) < 1e-5  # the error column
