"""What the failure scripts share: their command line, and the failure injected into one rank (also as a callback)."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback


def parse_args() -> argparse.Namespace:
    """``--mode raise|kill|hang --rank R --step S --timeout SECONDS --ckpt-dir DIR``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["raise", "kill", "hang"], required=True)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--step", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    return parser.parse_args()


def inject(mode: str, rank: int, step: int) -> None:
    """Announce the failure (with its time, which the test measures from), then raise, die, or hang."""
    print(f"rank {rank} injecting '{mode}' at step {step} at {time.time()}", flush=True)
    if mode == "raise":
        raise ValueError("injected failure")
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(3600)  # hang: the peers must give up after the process-group timeout



class FailAt(Callback):
    """Inject the failure at the start of ``step`` on ``rank`` (``train.py callbacks=[{_target_: injection.FailAt,
    ...}]``), in the first attempt only: a run ``torchrun --max-restarts`` restarted must not fail again there."""

    def __init__(self, mode: str, rank: int, step: int) -> None:
        self.mode, self.rank, self.step = mode, rank, step

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0
        if first_attempt and trainer.global_rank == self.rank and trainer.global_step == self.step:
            inject(self.mode, self.rank, self.step)
