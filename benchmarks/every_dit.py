"""How exact every verified DiT is under context parallelism: measured errors against one process.

    python -m benchmarks.every_dit        # writes benchmarks/results/every_dit.md

Runs the cases ``tests/test_every_dit.py`` asserts (every model of ``fixtures/dits.py`` under
ulysses 2 and ring 2 on 2 processes; two of them under ring 2 x ulysses 2 and dp 2 x ring 2 on 4;
3 SGD and 3 AdamW steps each) and reports, per case, the largest relative loss error over the
steps, the largest first-step gradient error relative to the largest gradient, and the largest
weight-update error relative to the largest update (the test's bounds are 1e-5 each, with the
update's resolution on top).
"""

from __future__ import annotations

import sys
from pathlib import Path

import diffusers
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from dits_exact import train, train_many  # noqa: E402
from fixtures.dits import CASES  # noqa: E402
from launcher import run_distributed  # noqa: E402
from test_every_dit import FOUR_RANK_MODELS, FOUR_RANKS, OPTIMIZERS, TWO_RANKS  # noqa: E402


def errors(result: dict, reference: dict) -> tuple[float, float, float]:
    """(loss, gradient, update) errors of one rank's run, each relative to the reference's largest value."""
    loss = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference["losses"]))
    largest_grad = max(float(g.abs().max()) for g in reference["grads"].values())
    grad = max(float((result["grads"][n] - g).abs().max()) for n, g in reference["grads"].items()) / largest_grad
    updates = {n: reference["after"][n] - before for n, before in reference["before"].items()}
    largest_update = max(float(u.abs().max()) for u in updates.values())
    update = max(float((result["after"][n] - reference["after"][n]).abs().max()) for n in updates) / largest_update
    return loss, grad, update


def main() -> None:
    rows = []
    for world, layouts, models in ((2, TWO_RANKS, tuple(CASES)), (4, FOUR_RANKS, FOUR_RANK_MODELS)):
        cases = [(model, opt, layout) for model in models for opt in OPTIMIZERS for layout in layouts]
        results = run_distributed(train_many, world, cases, timeout=900)
        references = {(model, opt): train(model, opt) for model in models for opt in OPTIMIZERS}
        for i, (model, opt, layout) in enumerate(cases):
            worst = [max(e) for e in zip(*(errors(r[i], references[model, opt]) for r in results))]
            plan = "own" if CASES[model].has_plan else "derived"
            degrees = " x ".join(f"{k[:-7]} {v}" for k, v in layout.items())
            rows.append(f"| {CASES[model].cls} | {plan} | {degrees} | {opt} | "
                        + " | ".join(f"{e:.1e}" for e in worst) + " |")
    report = "\n".join([
        "# Every verified DiT under context parallelism vs one process",
        "",
        f"`python -m benchmarks.every_dit`; torch {torch.__version__}, diffusers {diffusers.__version__}, fp32, "
        "gloo on CPU; 3 steps, 7-token prompts (padded and masked), part of one sample's text masked where the "
        "model takes a mask. Errors are the worst over ranks: loss (relative, worst step), first-step gradient "
        "(relative to the largest gradient), weight update after 3 steps (relative to the largest update).",
        "",
        "| class | plan | layout | optimizer | loss | gradient | update |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    out = ROOT / "benchmarks" / "results" / "every_dit.md"
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
