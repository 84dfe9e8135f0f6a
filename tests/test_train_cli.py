"""``train.py`` end to end, launched the ways users launch it (Lightning's launcher and torchrun)."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.image_size=16", "data.crops=16", "sample_steps=2", "sample_every_n_steps=0", "timeout_s=60",
        "trainer.log_every_n_steps=1"]
WANDB_KEYS = [b"train/loss", b"perf/tokens_per_s", b"perf/step_time_s", b"comm/bytes_sent_per_step",
              b"memory/peak_mb_rank0", b"memory/peak_mb_rank1", b"lr-AdamW", b"samples", b"rotate_method"]


def train(run_dir: Path, *overrides: str, torchrun: bool = False, timeout: float = 240) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if torchrun \
        else [sys.executable]
    cmd = [*launcher, str(ROOT / "train.py"), *TINY, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def wandb_record(run_dir: Path) -> bytes:
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")  # exactly one run: only rank 0 creates it
    return run_file.read_bytes()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["ulysses", "ring"])
def test_two_process_training_writes_a_wandb_offline_run(tmp_path: Path, layout: str) -> None:
    run = tmp_path / "run"
    assert_ok(train(run, f"parallel={layout}", "trainer.max_steps=2"))
    record = wandb_record(run)
    for key in WANDB_KEYS:
        assert key in record, key
    assert (run / "samples.png").is_file() and (run / "loss_curve.png").is_file()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.timeout(300)
def test_torchrun_launch_and_resume_continue_at_the_right_step(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["parallel=usp", "parallel.ring_degree=1", "logger=csv", "trainer.log_every_n_steps=1",
              "checkpoint_every_n_steps=1"]
    assert_ok(train(first, *common, "trainer.max_steps=2", torchrun=True))
    assert_ok(train(second, *common, "trainer.max_steps=4", f"resume={first}", torchrun=True))
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    with (second / "csv" / "version_0" / "metrics.csv").open() as f:
        steps = sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")})
    assert steps == [2, 3], steps  # the resumed run trained steps 2 and 3 only


@pytest.mark.timeout(120)
def test_bad_override_fails_fast_naming_the_setting(tmp_path: Path) -> None:
    start = time.monotonic()
    result = train(tmp_path / "bad", "parallel.ring_degree=3", "trainer.devices=2", timeout=60)
    assert result.returncode != 0
    assert "ring_degree=3 x ulysses_degree=1 = 3 does not divide world_size=2" in result.stderr
    assert time.monotonic() - start < 30
    typo = train(tmp_path / "typo", "parallel.ring_degree=two", timeout=60)
    assert typo.returncode != 0 and "parallel.ring_degree" in typo.stderr
