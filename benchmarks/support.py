"""Which diffusers transformers train under cp_plugin: a table written by walking diffusers' classes.

    python -m benchmarks.support        # writes benchmarks/results/support.md

Every ``ModelMixin`` class in ``diffusers.models.transformers`` is listed with its status:

- **verified exact**: the exactness suite (``tests/test_strategy_exact.py``) trains a tiny seeded
  instance under the layouts named and matches one process (losses, gradients, weights);
- **has a plan, not verified here**: the class carries a ``_cp_plan``, which cp_plugin applies, but
  no test trains it;
- **refused**: no ``_cp_plan``, so ``apply_context_parallel`` raises and asks for ``cp_plan=``.

The attention column says how the class's processors reach attention (from their source, on an
instance built on the meta device with its default config): through ``dispatch_attention_fn`` with
the parallel config (what cp_plugin routes today), without it, or by calling
``F.scaled_dot_product_attention`` themselves.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import diffusers
import torch
from diffusers import ModelMixin

ROOT = Path(__file__).resolve().parents[1]


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
    """How the default processors of ``cls`` call attention, or why that could not be read."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = cls()
    except Exception as err:  # noqa: BLE001 - some classes need constructor arguments
        return f"not inspected (default config fails: {type(err).__name__})"
    styles = set()
    for processor in {type(m.processor) for m in model.modules() if getattr(m, "processor", None) is not None}:
        source = inspect.getsource(processor)
        if "dispatch_attention_fn(" in source:
            styles.add("dispatch + parallel config" if "parallel_config=" in source else "dispatch, no parallel config")
        if "scaled_dot_product_attention(" in source:
            styles.add("direct SDPA")
        if "dispatch_attention_fn(" not in source and "scaled_dot_product_attention(" not in source:
            styles.add(f"own attention ({processor.__name__})")
    return ", ".join(sorted(styles)) or "no attention processor"


def verified_layouts() -> dict[str, list[str]]:
    """Class name -> layouts the exactness suite trains it under (from the test's case lists)."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    from test_strategy_exact import FOUR_RANKS, TWO_RANKS

    from exact import FlowMatchingModule

    classes = {}
    layouts: dict[str, set[str]] = defaultdict(set)
    for world, cases in ((2, TWO_RANKS), (4, FOUR_RANKS)):
        for case in cases:
            if case["kind"] not in classes:
                classes[case["kind"]] = type(FlowMatchingModule(case["kind"]).transformer).__name__
            degrees = {k: v for k, v in case["strategy_kwargs"].items() if k.endswith("_degree")}
            cp = degrees.get("ring_degree", 1) * degrees.get("ulysses_degree", 1)
            parts = ([f"dp {world // cp}"] if world > cp else []) + [f"{k[:-7]} {v}" for k, v in sorted(degrees.items())]
            layouts[classes[case["kind"]]].add(" x ".join(parts))
    return {name: sorted(found) for name, found in layouts.items()}


def main() -> None:
    verified = verified_layouts()
    rows, counts = [], defaultdict(int)
    for cls in transformer_classes():
        if cls.__name__ in verified:
            status = f"verified exact ({'; '.join(verified[cls.__name__])})"
        elif getattr(cls, "_cp_plan", None):
            status = "has a plan, not verified here"
        else:
            status = "refused: no _cp_plan (pass cp_plan=)"
        counts[status.split(" (")[0].split(":")[0]] += 1
        rows.append(f"| {cls.__name__} | {status} | {attention_calls(cls)} |")
    summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
    report = "\n".join([
        f"# diffusers {diffusers.__version__} transformers under cp_plugin",
        "",
        f"`python -m benchmarks.support`: {len(rows)} classes; {summary}.",
        "",
        "| class | status | attention calls |",
        "|---|---|---|",
        *rows,
        "",
    ])
    out = ROOT / "benchmarks" / "results" / "support.md"
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
