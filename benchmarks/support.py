"""Which diffusers transformers train under cp_plugin: a table written by walking diffusers' classes.

    python -m benchmarks.support        # writes benchmarks/results/support.md and the README's table

Every ``ModelMixin`` class in ``diffusers.models.transformers`` is listed with its status:

- **verified exact**: a test trains a tiny seeded instance under the layouts named and matches one
  process (losses, gradients, weight updates): ``tests/test_strategy_exact.py`` (Lightning) and
  ``tests/test_every_dit.py`` (every verified DiT, own or derived plan);
- **own plan, not verified here**: the class carries a ``_cp_plan``, which cp_plugin applies, but
  no test trains it;
- **derived plan, not verified here**: no ``_cp_plan``; ``cp_plugin.plans.derive_plan`` accepts the
  class's structure (checked on an instance built on the meta device with its default config), so
  it trains on a derived plan, but no test trains it;
- **refused**: the reason ``derive_plan`` gives (before anything runs), or that its default config
  cannot be built to check.

The attention column says how the class's processors reach attention (from their source):
through ``dispatch_attention_fn`` with or without the parallel config, by calling
``F.scaled_dot_product_attention`` themselves (both are routed), or by their own arithmetic.
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

from cp_plugin.plans import derive_plan

ROOT = Path(__file__).resolve().parents[1]
# The README carries the table between these lines (rewritten by each run).
README_START, README_END = "<!-- support table: python -m benchmarks.support -->", "<!-- end of support table -->"


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


def meta_instance(cls: type[ModelMixin]) -> ModelMixin | str:
    """``cls`` built with its default config on the meta device, or why it could not be."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return cls()
    except Exception as err:  # noqa: BLE001 - some classes need constructor arguments
        return f"default config fails: {type(err).__name__}"


def attention_calls(model: ModelMixin | str) -> str:
    """How the default processors of ``model`` call attention, or why that could not be read."""
    if isinstance(model, str):
        return f"not inspected ({model})"
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


def plan_status(cls: type[ModelMixin], model: ModelMixin | str) -> str:
    """Own plan, derived plan, or the reason a plan cannot be derived."""
    if getattr(cls, "_cp_plan", None):
        return "own plan, not verified here"
    if isinstance(model, str):
        return f"refused: not checked ({model})"
    try:
        derive_plan(model, "")
    except ValueError as err:
        reason = str(err).split(";")[0].replace(f"{cls.__name__} ('')", "").strip(" :")
        return f"refused: {reason.replace('|', '/')}"
    return "derived plan, not verified here"


def _layout(world: int, degrees: dict[str, int]) -> str:
    cp = degrees.get("ring_degree", 1) * degrees.get("ulysses_degree", 1)
    parts = [f"{k[:-7]} {v}" for k, v in sorted(degrees.items()) if k != "dp_degree"]
    return " x ".join(([f"dp {world // cp}"] if world > cp else []) + parts)


def verified_layouts() -> dict[str, list[str]]:
    """Class name -> layouts the exactness tests train it under (from the tests' case lists)."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    from test_every_dit import FOUR_RANK_MODELS, FOUR_RANKS as DIT_FOUR, TWO_RANKS as DIT_TWO
    from test_strategy_exact import FOUR_RANKS, TWO_RANKS

    from exact import FlowMatchingModule
    from fixtures.dits import CASES

    layouts: dict[str, set[str]] = defaultdict(set)
    kinds: dict[str, str] = {}
    for world, cases in ((2, TWO_RANKS), (4, FOUR_RANKS)):
        for case in cases:
            if case["kind"] not in kinds:
                kinds[case["kind"]] = type(FlowMatchingModule(case["kind"]).transformer).__name__
            degrees = {k: v for k, v in case["strategy_kwargs"].items() if k.endswith("_degree")}
            layouts[kinds[case["kind"]]].add(_layout(world, degrees))
    for name, case in CASES.items():
        for world, grid in ((2, DIT_TWO), (4, DIT_FOUR if name in FOUR_RANK_MODELS else [])):
            for degrees in grid:
                layouts[case.cls].add(_layout(world, degrees))
    return {name: sorted(found) for name, found in layouts.items()}


def main() -> None:
    verified = verified_layouts()
    rows, counts = [], defaultdict(int)
    for cls in transformer_classes():
        model = meta_instance(cls)
        plan = "own plan" if getattr(cls, "_cp_plan", None) else "derived plan"
        if cls.__name__ in verified:
            status = f"verified exact, {plan} ({'; '.join(verified[cls.__name__])})"
        else:
            status = plan_status(cls, model)
        counts[status.split(" (")[0].split(":")[0].split(",")[0]] += 1
        rows.append(f"| {cls.__name__} | {status} | {attention_calls(model)} |")
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
    readme = ROOT / "README.md"
    before, rest = readme.read_text().split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    table = "\n".join(report.splitlines()[2:]).strip()
    readme.write_text(f"{before}{README_START}\n{table}\n{README_END}{after}")
    print(report)


if __name__ == "__main__":
    main()
