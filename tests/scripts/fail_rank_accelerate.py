"""An Accelerate loop under ContextParallelPlugin in which one rank fails at a given step (tests/test_failures.py).

    torchrun --nproc-per-node 2 fail_rank_accelerate.py --mode raise|kill --rank 1 --step 2 --ckpt-dir DIR

``accelerator.save_state`` after every step (``DIR/step=N``), so the test can check that the states
written before the failure survive it.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from torch.utils.data import DataLoader

sys.path[:0] = [str(Path(__file__).resolve().parents[i]) for i in (1, 2)]  # tests/ (exact.py), the checkout (fixtures/)

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import InitProcessGroupKwargs  # noqa: E402
from exact import FlowMatchingModule, SyntheticFlowData  # noqa: E402
from injection import inject, parse_args  # noqa: E402

from cp_plugin import ParallelConfig  # noqa: E402
from cp_plugin.accelerate import ContextParallelPlugin  # noqa: E402


def main() -> None:
    args = parse_args()
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.timeout))])
    module = FlowMatchingModule("flux", "sgd")
    cp = ContextParallelPlugin(ParallelConfig(ring_degree=2))
    model, optimizer, loader = cp.prepare(accelerator, module, module.configure_optimizers(),
                                          DataLoader(SyntheticFlowData("flux"), batch_size=2))
    for step, batch in enumerate(loader):
        if step == args.step + 3:
            break
        if accelerator.process_index == args.rank and step == args.step:
            inject(args.mode, args.rank, step)
        accelerator.backward(model(batch))
        optimizer.step()
        optimizer.zero_grad()
        accelerator.save_state(str(args.ckpt_dir / f"step={step}"))


if __name__ == "__main__":
    main()
