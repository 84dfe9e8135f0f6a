"""Train under ContextParallelStrategy and make one rank fail at a given step (for tests/test_failures.py).

    python fail_rank.py --mode raise|kill|hang --rank 1 --step 2 --ckpt-dir DIR   # Lightning starts the processes
    torchrun --nproc-per-node 2 fail_rank.py --mode kill --rank 1 --step 2 --ckpt-dir DIR

A checkpoint is written after every step (``DIR/step=N.ckpt``), so the test can check that the
ones written before the failure survive it.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

sys.path[:0] = [str(Path(__file__).resolve().parents[i]) for i in (1, 2)]  # tests/ (exact.py), the checkout (fixtures/)

from exact import FlowMatchingModule, SyntheticFlowData, quiet_trainer  # noqa: E402
from injection import inject, parse_args  # noqa: E402

from cp_plugin import ContextParallelStrategy  # noqa: E402


class FailingModule(FlowMatchingModule):
    def __init__(self, mode: str, rank: int, step: int) -> None:
        super().__init__("flux")
        self.mode, self.fail_rank, self.fail_step = mode, rank, step

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_rank == self.fail_rank and self.global_step == self.fail_step:
            inject(self.mode, self.global_rank, self.global_step)
        return super().training_step(batch, batch_idx)


def main() -> None:
    args = parse_args()
    L.seed_everything(0, verbose=False)
    every_step = ModelCheckpoint(args.ckpt_dir, "{step}", every_n_train_steps=1, save_top_k=-1)
    strategy = ContextParallelStrategy(ring_degree=2, timeout=timedelta(seconds=args.timeout))
    trainer = quiet_trainer(strategy, args.step + 3, 2, enable_checkpointing=True, callbacks=[every_step])
    trainer.fit(FailingModule(args.mode, args.rank, args.step), DataLoader(SyntheticFlowData("flux"), batch_size=2))


if __name__ == "__main__":
    main()
