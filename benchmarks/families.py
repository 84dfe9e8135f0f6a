"""Every fine-tuning family, measured: LoRA and full fine-tuning from its cache under CP against one process.

    python -m benchmarks.families                    # writes benchmarks/results/families.{json,md} and the README's table
    python -m benchmarks.families --families ltx,wan # measures these again, keeps the others' rows from the results
    python -m benchmarks.families --parts full       # measures only full fine-tuning (parts: lora, full, train_py, resume)

For each family of ``recipe/families/`` its tiny offline pipeline (``fixtures/pipelines.py``) caches
the fixture's captioned folder (``fixtures/media.py``; with reference images for edit families) with
``prepare.py``, then trains LoRA from the cache for ``tests/test_finetune.py``'s steps, with SGD
and with AdamW, under ring 2 (2 processes) and ulysses 2 x dp 2 (4 processes), and the same training
on one process (``tests/test_finetune.py``'s ``cache_fit`` and ``one_process``). Reported per
optimizer and layout, worst over ranks: the loss's relative error over the steps, the first step's
gradient error relative to the gradient's norm per tensor, and the update's error relative to the
update's norm per tensor. A layout is *verified* when both are within ``tests/test_finetune.py``'s
bound for the family and optimizer, under both optimizers. Full fine-tuning (LoRA rank 0: every weight
trains) is measured the same way under ring 2. Then ``train.py`` trains LoRA from the cache
under ring 2 with validation samples (``tests/test_finetune.py``'s ``train_py_round_trip``): the
samples are logged to the W&B run, and the saved adapters load into the pipeline with the family's
loader and generate what the run's last sample showed, not what the base model generates
(``benchmarks/results/families_train_py.json``). Last, LoRA trains under ring 2 with a checkpoint after
every step, and again from its first step's checkpoint: the resumed run's losses and weights must be
the uninterrupted run's, bit for bit (``benchmarks/results/families_resume.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from launcher import run_distributed  # noqa: E402
from test_finetune import (  # noqa: E402
    LORA,
    MEDIA,
    OPTIMIZERS,
    cache_fit,
    errors_against_one_process,
    media_references,
    one_process,
    prepare,
    round_trip_problems,
    tolerance,
    train_py_round_trip,
)

from benchmarks.provenance import describe  # noqa: E402
from benchmarks.readme import DOCS, replace_section  # noqa: E402
from recipe.families import FAMILIES  # noqa: E402
from recipe.lora import LoraSettings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TRIPS = RESULTS / "families_train_py.json"  # per family: train.py's round trip
RESUMES = RESULTS / "families_resume.json"  # per family: resuming from a mid-run checkpoint
LAYOUTS = {"ring 2": ({"ring_degree": 2}, 2), "ulysses 2 x dp 2": ({"ulysses_degree": 2}, 4)}
TRAIN_PY_LAYOUT = "parallel.ring_degree=2"  # train.py's run: ring 2 (2 processes)
FULL_LAYOUT = "ring 2"  # full fine-tuning: the same path as LoRA with every weight trained, under one layout
RESUME_LAYOUT = "ring 2"
CHECKS = {"train_py": TRIPS, "resume": RESUMES}  # a family's checks beside its rows, each part in its own file
PARTS = ("lora", "full", "train_py", "resume")
START, END = "<!-- families table: python -m benchmarks.families -->", "<!-- end of families table -->"


def compare(name: str, pipeline: Path, cache: Path, optimizer: str, layout: str, training: str) -> dict[str, Any]:
    """One row: ``training`` (LoRA, or full fine-tuning) from the cache under ``layout`` against one process."""
    degrees, world = LAYOUTS[layout]
    lora = LORA if training == "LoRA" else LoraSettings(rank=0)
    results = run_distributed(cache_fit, world, name, str(pipeline), str(cache), degrees, None, None, None,
                              optimizer, lora, init_process_group=False, timeout=600)
    reference = one_process(name, str(pipeline), str(cache), results[0]["dp"], None, optimizer, lora)
    bound = tolerance(name, optimizer)
    worst = errors_against_one_process(results, reference, bound, optimizer)
    errors = {key: worst[key] for key in ("loss", "gradient", "update")}
    verified = errors["gradient"] <= bound["grads"] and errors["update"] <= bound["updates"]
    row = {"family": name, "training": training, "optimizer": optimizer, "layout": layout, **errors, "bound": bound,
           "verified": verified, "worst_update_in": worst["update_in"]}
    print(row, flush=True)
    return row


def resume(name: str, pipeline: Path, cache: Path, folder: Path) -> dict[str, Any]:
    """LoRA (AdamW) under RESUME_LAYOUT with a checkpoint after every step, then from step 1's checkpoint: how far the
    resumed run's losses and weights are from the uninterrupted run's (exact: 0, on every rank)."""
    degrees, world = LAYOUTS[RESUME_LAYOUT]
    checkpoints = folder / f"{name}_checkpoints"
    args = (name, str(pipeline), str(cache), degrees)
    straight = run_distributed(cache_fit, world, *args, str(checkpoints), init_process_group=False, timeout=600)
    resumed = run_distributed(cache_fit, world, *args, None, str(checkpoints / "step=1.ckpt"),
                              init_process_group=False, timeout=600)
    losses = max(abs(mine - theirs) for whole, second in zip(straight, resumed)
                 for mine, theirs in zip(second["losses"], whole["losses"][1:], strict=True))
    weights = max(float((second["after"][n] - w).abs().max()) for whole, second in zip(straight, resumed)
                  for n, w in whole["after"].items())
    result = {"layout": RESUME_LAYOUT, "steps_resumed": len(resumed[0]["losses"]), "loss_difference": losses,
              "weight_difference": weights, "verified": losses == 0 and weights == 0}
    print(name, "resume", result, flush=True)
    return result


def measure(name: str, folder: Path, parts: set[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The family's rows (LoRA: one per optimizer and layout; full fine-tuning: one per optimizer under
    FULL_LAYOUT), and its train.py round trip and resume check by name, of the ``parts`` asked for."""
    from fixtures.media import write_media
    from fixtures.pipelines import build_tiny_pipeline

    pipeline, media, cache = folder / f"{name}_pipeline", folder / f"{name}_media", folder / f"{name}_cache"
    build_tiny_pipeline(name, pipeline)
    files = write_media(media, MEDIA[name], references=media_references(name))
    made = prepare(name, pipeline, media, cache)
    if made.returncode:
        raise RuntimeError(f"prepare.py failed for {name}:\n{made.stderr[-3000:]}")
    checks = {}
    if "resume" in parts:
        checks["resume"] = resume(name, pipeline, cache, folder)
    if "train_py" in parts:
        case = {"pipeline": pipeline, "media": media, "files": files, "cache": cache}
        run = folder / f"{name}_train_py"
        run.mkdir()
        problems = round_trip_problems(train_py_round_trip(name, case, run, TRAIN_PY_LAYOUT), FAMILIES[name].video)
        checks["train_py"] = {"layout": TRAIN_PY_LAYOUT, "problems": problems, "verified": not problems}
        print(name, "train.py", checks["train_py"], flush=True)
    rows = [compare(name, pipeline, cache, optimizer, layout, "LoRA")
            for optimizer in OPTIMIZERS for layout in LAYOUTS if "lora" in parts]
    rows += [compare(name, pipeline, cache, optimizer, FULL_LAYOUT, "full")
             for optimizer in OPTIMIZERS if "full" in parts]
    return rows, checks


def table(rows: list[dict[str, Any]], trips: dict[str, dict[str, Any]], resumes: dict[str, dict[str, Any]]) -> str:
    """The README's families table: one line per family, the layouts LoRA is verified under with both optimizers,
    worst errors, full fine-tuning's update errors, whether a resumed run is the uninterrupted one, and whether
    train.py's samples and adapters did what the pipeline does."""
    lines = ["| `model=` | pipeline | task | layouts verified with SGD and AdamW (LoRA vs one process) | worst gradient "
             "error | worst update error (SGD / AdamW) | full fine-tuning, ring 2: update error (SGD / AdamW) | "
             "resumed mid-run (ring 2): bit for bit | `train.py` (ring 2): samples logged, adapters reload |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted({row["family"] for row in rows}):
        mine = [row for row in rows if row["family"] == name and row["training"] == "LoRA"]
        full = {row["optimizer"]: row for row in rows if row["family"] == name and row["training"] == "full"}
        layouts = [layout for layout in LAYOUTS
                   if all(row["verified"] for row in mine if row["layout"] == layout)
                   and {row["optimizer"] for row in mine if row["layout"] == layout} == set(OPTIMIZERS)]
        updates = " / ".join(f"{max(r['update'] for r in mine if r['optimizer'] == o):.1e}" for o in ("sgd", "adamw"))
        full_updates = " / ".join(f"{full[o]['update']:.1e}" + ("" if full[o]["verified"] else " (over its bound)")
                                  for o in ("sgd", "adamw") if o in full) or "not measured"
        lines.append(f"| `{name}` | {FAMILIES[name].pipeline_class_name} | {FAMILIES[name].task} | "
                     f"{'; '.join(layouts) or 'none'} | {max(r['gradient'] for r in mine):.1e} | {updates} | "
                     f"{full_updates} | {verdict(resumes.get(name))} | {verdict(trips.get(name))} |")
    return "\n".join(lines)


def verdict(check: dict[str, Any] | None) -> str:
    return "not measured" if check is None else "yes" if check["verified"] else "no"


def row_line(r: dict[str, Any]) -> str:
    errors = f"{r['loss']:.1e} | {r['gradient']:.1e} | {r['update']:.1e}"
    bound = f"{r['bound']['grads']:.0e} / {r['bound']['updates']:.0e}"
    return (f"| {r['family']} | {FAMILIES[r['family']].task} | {r['training']} | {r['optimizer']} | {r['layout']} | "
            f"{errors} | {bound} | {'yes' if r['verified'] else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated families to measure (default: every family)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to measure (default: {','.join(PARTS)}); the rest are kept")
    args = parser.parse_args()
    names = sorted(FAMILIES) if args.families is None else sorted(args.families.split(","))
    parts = set(args.parts.split(","))
    unknown = (set(names) - set(FAMILIES)) | (parts - set(PARTS))
    if unknown:
        raise SystemExit(f"{sorted(unknown)} are not families ({', '.join(sorted(FAMILIES))}) or parts ({PARTS})")
    everything = args.families is None and parts == set(PARTS)
    measured_part = {"LoRA": "lora", "full": "full"}
    kept = [] if everything else [row for row in json.loads((RESULTS / "families.json").read_text())
                                  if row["family"] in FAMILIES
                                  and (row["family"] not in names or measured_part[row["training"]] not in parts)]
    checks = {part: {} if everything or not path.exists() else {
        family: check for family, check in json.loads(path.read_text()).items()
        if family in FAMILIES and (family not in names or part not in parts)} for part, path in CHECKS.items()}
    measured = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            family_rows, family_checks = measure(name, Path(folder), parts)
            measured += family_rows
            for part, check in family_checks.items():
                checks[part][name] = check
    # each family's rows: LoRA then full fine-tuning, each in measuring order
    rows = sorted(kept + measured, key=lambda row: (row["family"], row["training"] != "LoRA"))
    write(rows, checks)


def write(rows: list[dict[str, Any]], checks: dict[str, dict[str, dict[str, Any]]]) -> None:
    """The results files, the report and the README's and the fine-tuning page's tables, from ``rows`` and the
    per-family ``checks`` (by part: ``CHECKS``)."""
    trips, resumes = checks["train_py"], checks["resume"]
    (RESULTS / "families.json").write_text(json.dumps(rows, indent=1))
    for part, path in CHECKS.items():
        path.write_text(json.dumps(dict(sorted(checks[part].items())), indent=1))
    report = "\n".join([
        "# Fine-tuning families: LoRA and full fine-tuning from the cache under context parallelism vs one process",
        "",
        f"{describe('python -m benchmarks.families')} gloo, float32. Each family's tiny offline pipeline caches the fixture's folder "
        "(`prepare.py`), then LoRA (rank 4) trains 3 steps from the cache with SGD and with AdamW under each layout and on "
        f"one process, and full fine-tuning (every weight) the same way under {FULL_LAYOUT}. "
        "Errors are the worst over ranks: loss relative to the loss, gradients (first step) and updates relative to "
        "their norm per tensor. Verified: within `tests/test_finetune.py`'s bounds (gradient / update) for the family.",
        "",
        "| family | task | training | optimizer | layout | loss | gradient | update | bound (gradient / update) | "
        "verified |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(row_line(r) for r in rows),
        "",
        f"`train.py` from the cache under ring 2 ({TRAIN_PY_LAYOUT}), 3 steps, validation samples every 2: "
        "logged to W&B at steps 2 and 3; the saved adapters, loaded into the pipeline with the family's loader, "
        "generate the run's last sample and change the base model's output.",
        "",
        "| family | samples logged, adapters reload | problems |",
        "|---|---|---|",
        *(f"| {name} | {'yes' if trip['verified'] else 'no'} | {'; '.join(trip['problems']) or 'none'} |"
          for name, trip in sorted(trips.items())),
        "",
        f"Resumed mid-run: LoRA with AdamW under {RESUME_LAYOUT}, a checkpoint after every step, then a second run from "
        "step 1's checkpoint; the largest differences from the uninterrupted run, over ranks (exact: 0).",
        "",
        "| family | steps resumed | loss difference | weight difference | bit for bit |",
        "|---|---|---|---|---|",
        *(f"| {name} | {r['steps_resumed']} | {r['loss_difference']:.1e} | {r['weight_difference']:.1e} | "
          f"{'yes' if r['verified'] else 'no'} |" for name, r in sorted(resumes.items())),
        "",
    ])
    (RESULTS / "families.md").write_text(report)
    generated = table(rows, trips, resumes)
    replace_section(START, END, generated)
    replace_section(START, END, generated, DOCS / "finetune.md")
    print(report)


if __name__ == "__main__":
    main()
