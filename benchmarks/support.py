"""Which diffusers transformers train under cp_plugin: the table, written from the sweep's results.

    python -m benchmarks.every_dit      # trains every case, writes benchmarks/results/every_dit.json
    python -m benchmarks.support        # writes benchmarks/results/support.md, docs/models.md's table, the README's counts

Every ``ModelMixin`` class in ``diffusers.models.transformers`` gets one row:

- **verified exact**: every case of the class (set up as a user sets it up where the table says so: the
  processor a model's docs opt into) in ``fixtures/dits`` (two sizes: other head counts,
  head dims, token and text lengths, one token count equal to a feature width) trains under ulysses
  2 and ring 2 with SGD and AdamW as one process does, within the bounds of
  ``tests/test_every_dit.py`` (``benchmarks/results/every_dit.md`` has the errors); the layouts column
  adds those of the 4-process cases and of ``tests/test_strategy_exact.py``;
- **refused**: what cp_plugin says when asked to train it (its error, raised on every rank before any
  collective), for every case or for the size named;
- **fails**: a case that raised an error that is not a refusal, or was not exact.

The plan column says whether the class trains on diffusers' own ``_cp_plan``, on the plan cp_plugin
derives from its structure, or on the derived plan in place of an own plan it replaces (and why:
``cp_plugin.plans.DERIVED_OVER_OWN``). The attention column says how its processors reach attention.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import diffusers
from diffusers import ModelMixin

from benchmarks.provenance import describe
from benchmarks.readme import DOCS, replace_section
from cp_plugin.plans import DERIVED_OVER_OWN
from fixtures.dits import CASES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# docs/models.md carries the table between these lines, the README the counts (rewritten by each run).
README_START, README_END = "<!-- support table: python -m benchmarks.support -->", "<!-- end of support table -->"
COUNTS_START, COUNTS_END = "<!-- support counts: python -m benchmarks.support -->", "<!-- end of support counts -->"


def transformer_classes() -> list[type[ModelMixin]]:
    """Every ModelMixin subclass defined in diffusers.models.transformers, by name."""
    package = importlib.import_module("diffusers.models.transformers")
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, ModelMixin) and cls.__module__ == module.__name__:
                found[cls.__name__] = cls
    return [found[name] for name in sorted(found)]


def attention_calls(cls: type[ModelMixin]) -> str:
    """How the attention processors defined beside ``cls`` reach attention (from their source)."""
    module = sys.modules[cls.__module__]
    styles = set()
    for _, processor in inspect.getmembers(module, inspect.isclass):
        if processor.__module__ != module.__name__ or not callable(getattr(processor, "__call__", None)):
            continue
        if not processor.__name__.endswith(("Processor", "Processor2_0", "Processor3_0")):
            continue
        source = inspect.getsource(processor)
        if "dispatch_attention_fn(" in source:
            styles.add("dispatch + parallel config" if "parallel_config=" in source else "dispatch, no parallel config")
        if "scaled_dot_product_attention(" in source:
            styles.add("direct SDPA")
        if "dispatch_attention_fn(" not in source and "scaled_dot_product_attention(" not in source:
            styles.add(f"own arithmetic ({processor.__name__})")
    return ", ".join(sorted(styles)) or "diffusers' shared processors"


def plan_kind(cls: type[ModelMixin]) -> str:
    if cls.__name__ in DERIVED_OVER_OWN:
        return "derived, over its own"
    return "own" if getattr(cls, "_cp_plan", None) else "derived"


def _layout(world: int, degrees: dict[str, int]) -> str:
    cp = degrees.get("ring_degree", 1) * degrees.get("ulysses_degree", 1)
    parts = [f"{k[:-7]} {v}" for k, v in sorted(degrees.items()) if k != "dp_degree"]
    return " x ".join(([f"dp {world // cp}"] if world > cp else []) + parts)


def lightning_layouts() -> dict[str, set[str]]:
    """Class name -> layouts ``tests/test_strategy_exact.py`` trains it under with the Lightning strategy."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    from exact import FlowMatchingModule
    from test_strategy_exact import FOUR_RANKS, TWO_RANKS

    layouts: dict[str, set[str]] = defaultdict(set)
    kinds: dict[str, str] = {}
    for world, cases in ((2, TWO_RANKS), (4, FOUR_RANKS)):
        for case in cases:
            if case["kind"] not in kinds:
                kinds[case["kind"]] = type(FlowMatchingModule(case["kind"]).transformer).__name__
            degrees = {k: v for k, v in case["strategy_kwargs"].items() if k.endswith("_degree")}
            layouts[kinds[case["kind"]]].add(_layout(world, degrees))
    return layouts


def _reason(error: str, cls: str) -> str:
    """The first line of an error, without its type, the class's name and the plan-writing hint refusals end with."""
    line = error.splitlines()[0].split("; pass cp_plan")[0]
    for prefix in ("ValueError: ", "RuntimeError: ", f"{cls} ('')", f"{cls}: ", cls):
        line = line.removeprefix(prefix).lstrip(": ")
    return line.replace("|", "/")[:300]


def status(cls: str, rows: list[dict]) -> tuple[str, list[str]]:
    """One class's status from its sweep rows (``verified exact``, else refused or fails, with why) and the
    layouts it is verified under."""
    by_size: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_size[row["size"]].append(row)
    exact = sorted(size for size, rs in by_size.items() if all(r.get("exact") for r in rs))
    layouts = sorted({r["layout"] for r in rows if r.get("exact")})
    if len(exact) == len(by_size):
        return "verified exact", layouts
    failing = sorted(set(by_size) - set(exact), key=lambda size: size != "suite")
    bad = next(r for r in by_size[failing[0]] if not r.get("exact"))
    refused = all(r.get("error", "").startswith("ValueError") for size in failing for r in by_size[size]
                  if not r.get("exact"))
    if "error" in bad:
        why = _reason(bad["error"], cls)
    else:
        why = f"not exact (loss {bad['loss']:.1e}, gradient {bad['gradient']:.1e}, update {bad['update']:.1e})"
    sizes = "both sizes" if not exact else f"the {failing[0]} size; verified exact at the {exact[0]} size"
    return f"{'refused' if refused else 'fails'} ({sizes}): {why}", layouts


def main() -> None:
    rows = json.loads((RESULTS / "every_dit.json").read_text())
    by_class: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_class[row["class"]].append(row)
    lightning = lightning_layouts()
    lines, counts = [], defaultdict(int)
    for cls in transformer_classes():
        name = cls.__name__
        text, layouts = status(name, by_class[name]) if name in by_class else ("no case", [])
        if text == "verified exact":
            layouts = sorted(set(layouts) | lightning.get(name, set()))
            setup = next((CASES[r["case"]].setup for r in by_class[name] if CASES[r["case"]].setup), "")
            text += f" ({setup})" if setup else ""
        counts[text.split(" (")[0]] += 1
        lines.append(f"| {name} | {text} | {plan_kind(cls)} | {'; '.join(layouts)} | {attention_calls(cls)} |")
    summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = "\n".join([
            f"# diffusers {diffusers.__version__} transformers under cp_plugin",
            "",
            f"{describe('python -m benchmarks.support')} From `benchmarks/results/every_dit.json` (`python -m "
            f"benchmarks.every_dit`, its provenance in `every_dit.md`): {len(lines)} classes; {summary}.",
            "",
            "| class | status | plan | layouts verified | attention calls |",
            "|---|---|---|---|---|",
            *lines,
            "",
        ])
    (RESULTS / "support.md").write_text(report)
    replace_section(README_START, README_END, "\n".join(report.splitlines()[2:]).strip(), DOCS / "models.md")
    replace_section(COUNTS_START, COUNTS_END, f"{len(lines)} transformer classes of diffusers {diffusers.__version__}: "
                    f"{summary} (`python -m benchmarks.support`, [the table](docs/models.md)).")
    print(report)


if __name__ == "__main__":
    main()
