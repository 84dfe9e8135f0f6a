"""A run that survives a lost rank: ``torchrun --max-restarts 1 train.py resume=auto`` with rank 1 killed at step 5.

Checkpoints every 2 steps; torchrun restarts the whole group, ``resume=auto`` finds the run's newest
complete checkpoint (step 4) and training ends where an uninterrupted run ends. A checkpoint cut
short by the kill is not taken for one: ``resume=auto`` skips it for the newest complete one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cp_plugin.checkpoint import is_complete
from recipe.config import resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
COMMON = ["data.image_size=16", "data.crops=16", "sample_steps=2", "sample_every_n_steps=0", "timeout_s=30",
          "logger=csv", "trainer.max_steps=8", "checkpoint_every_n_steps=2", "resume=auto"]


def torchrun(run_dir: Path, *overrides: str, restarts: int = 0) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               f"--max-restarts={restarts}", str(ROOT / "train.py"), *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, cwd=run_dir.parent, capture_output=True, text=True, timeout=400, env=env)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True)["state_dict"]


EVERY_STEP = "{_target_:lightning.pytorch.callbacks.ModelCheckpoint,dirpath:%s,every_n_train_steps:1,save_top_k:-1," \
             "filename:'{step}'}"
KILL = "{_target_:injection.FailAt,mode:kill,rank:1,step:5}"


@pytest.mark.timeout(600)
def test_a_killed_rank_restarts_the_group_and_the_run_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    whole = torchrun(tmp_path / "whole", f"+callbacks=[{EVERY_STEP % (tmp_path / 'whole_steps')}]")
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    steps = tmp_path / "killed_steps"
    killed = torchrun(tmp_path / "killed", f"+callbacks=[{KILL},{EVERY_STEP % steps}]", restarts=1)
    log = killed.stdout + killed.stderr
    assert killed.returncode == 0, log[-5000:]
    injected = re.search(r"rank 1 injecting 'kill' at step 5 at ([\d.]+)", log)
    assert injected, "the failure was not injected: the test cannot fail"
    assert "Restoring states from the checkpoint path" in log, "the restarted run did not resume"
    # what was written before the kill is still there, whole, and was not written again: the run resumed at step 4
    for step in range(1, 5):
        written = steps / f"step={step}.ckpt"
        assert is_complete(written) and written.stat().st_mtime < float(injected.group(1)), written
    final = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    expected = weights(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    start = weights(tmp_path / "whole_steps" / "step=1.ckpt")
    assert final["global_step"] == 8
    for name, value in expected.items():  # the update since step 1, to 2e-5
        if value.is_floating_point():
            update = float((value - start[name]).abs().max())
            assert float((final["state_dict"][name] - value).abs().max()) <= 2e-5 * update + 1e-7, name


def test_resume_auto_starts_fresh_then_takes_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert resolve_checkpoint("auto", tmp_path, run) is None
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(4)}}, run / "checkpoints" / "step=2.ckpt")
    shutil.copy(run / "checkpoints" / "step=2.ckpt", run / "checkpoints" / "step=4.ckpt")
    with open(run / "checkpoints" / "step=4.ckpt", "r+b") as cut:  # a write the kill interrupted
        cut.truncate(os.path.getsize(run / "checkpoints" / "step=4.ckpt") // 2)
    assert resolve_checkpoint("auto", tmp_path, run) == str(run / "checkpoints" / "step=2.ckpt")
