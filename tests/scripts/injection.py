"""What the failure scripts share: their command line, and the failure injected into one rank."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path


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
