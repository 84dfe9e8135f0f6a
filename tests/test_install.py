"""A lean install: the library imports without the training recipe's tools.

``pip install cp_plugin`` brings torch, Lightning and diffusers only; Hydra, W&B, scikit-learn,
matplotlib, peft (``[train]``) and Accelerate (``[accelerate]``) are extras. These tests import the
library in a fresh interpreter where those packages look uninstalled, and check statically that no
module of ``cp_plugin`` imports them when it is loaded.

The core (every module but the adapters ``lightning.py``, ``lightning_resume.py`` and ``accelerate.py``)
is framework-neutral: it imports neither Lightning nor Accelerate, not even lazily, and the
Accelerate adapter does not import Lightning. The same fresh interpreters show it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE_TOOLS = ("hydra", "omegaconf", "wandb", "sklearn", "matplotlib", "peft", "transformers")  # peft brings transformers
NOT_AT_IMPORT = (*RECIPE_TOOLS, "PIL")  # PIL: the recipe's; diffusers may load it, cp_plugin must not

# Uninstalls packages for one interpreter: the path finder is wrapped so that the blocked packages'
# code is not found (``import`` raises ModuleNotFoundError, ``importlib.util.find_spec`` returns None)
# and neither is their distribution metadata (``importlib.metadata.version`` raises
# PackageNotFoundError). Lightning, torchmetrics and diffusers probe optional dependencies both ways.
PRELUDE = """
import importlib.machinery, json, re, sys
blocked = {blocked!r}
hidden_distributions = {distributions!r}
path_finder = importlib.machinery.PathFinder

class Uninstalled:
    @staticmethod
    def find_spec(name, path=None, target=None):
        return None if name.split(".")[0] in blocked else path_finder.find_spec(name, path, target)

    @staticmethod
    def find_distributions(*args, **kwargs):
        for dist in path_finder.find_distributions(*args, **kwargs):
            if re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower() not in hidden_distributions:
                yield dist

    @staticmethod
    def invalidate_caches():
        path_finder.invalidate_caches()

sys.meta_path[sys.meta_path.index(path_finder)] = Uninstalled
"""
DISTRIBUTIONS = {"hydra": "hydra-core", "sklearn": "scikit-learn", "PIL": "pillow",  # else the import name
                 "lightning_utilities": "lightning-utilities", "lightning_fabric": "lightning-fabric",
                 "pytorch_lightning": "pytorch-lightning"}
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities")
LIGHTNING_ADAPTER = ("cp_plugin/lightning.py", "cp_plugin/lightning_resume.py")
ADAPTERS = (*LIGHTNING_ADAPTER, "cp_plugin/accelerate.py")


def run_without(blocked: tuple[str, ...], body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a new interpreter where the packages ``blocked`` are not installed."""
    distributions = sorted(DISTRIBUTIONS.get(name, name) for name in blocked)
    code = PRELUDE.format(blocked=sorted(blocked), distributions=distributions) + body
    # cwd=ROOT puts this checkout first on sys.path (``-c`` adds the working directory), so it is
    # this checkout's cp_plugin that is imported even if the editable install points elsewhere.
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)


def import_without(modules: str, blocked: tuple[str, ...]) -> dict:
    """Import ``modules`` where ``blocked`` are not installed; which blocked modules got loaded."""
    body = (
        f"import {modules}\n"
        "loaded = sorted(n for n in sys.modules if n.split('.')[0] in blocked)\n"
        "print(json.dumps({'loaded': loaded, 'file': cp_plugin.__file__}))\n"
    )
    result = run_without(blocked, body)
    assert result.returncode == 0, f"import {modules} failed without {', '.join(blocked)}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_uninstalled_packages_look_absent_to_every_probe() -> None:
    """The control: what the tests below rely on, and that it makes a real dependency fail."""
    body = """
import importlib.metadata, importlib.util
assert importlib.util.find_spec("matplotlib") is None and importlib.util.find_spec("hydra") is None
for dist in ("matplotlib", "hydra-core"):
    try:
        importlib.metadata.version(dist)
        raise AssertionError(dist + " metadata still found")
    except importlib.metadata.PackageNotFoundError:
        pass
assert importlib.util.find_spec("json") is not None and importlib.metadata.version("torch")
import recipe.config  # the recipe needs Hydra
"""
    result = run_without(("hydra", "matplotlib"), body)
    assert result.returncode != 0 and "ModuleNotFoundError: No module named 'hydra'" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("modules", "blocked"),
    [
        ("cp_plugin, cp_plugin.lightning", (*RECIPE_TOOLS, "accelerate")),  # the core install
        ("cp_plugin, cp_plugin.accelerate", RECIPE_TOOLS),  # cp_plugin[accelerate]
    ],
    ids=["core", "accelerate"],
)
def test_library_imports_without_the_recipe_tools(modules: str, blocked: tuple[str, ...]) -> None:
    report = import_without(modules, blocked)
    assert report["loaded"] == []
    assert Path(report["file"]).resolve().is_relative_to(ROOT / "cp_plugin")


def import_time_imports(tree: ast.AST) -> list[tuple[str, int]]:
    """Top-level packages a module imports when it is loaded: everything outside function bodies
    and ``if TYPE_CHECKING:`` blocks (lazy imports inside functions are how optional tools stay
    optional)."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], child.lineno))
            visit(child)

    visit(tree)
    return found


def test_no_library_module_imports_optional_tools_at_import_time() -> None:
    offending = []
    for path in sorted((ROOT / "cp_plugin").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), filename=name)
        for package, line in import_time_imports(tree):
            if package in NOT_AT_IMPORT or (package == "accelerate" and name != "cp_plugin/accelerate.py"):
                offending.append(f"{name}:{line} imports {package}")
    assert not offending, "the library must import these lazily (or not at all):\n" + "\n".join(offending)


def library_modules(exclude: tuple[str, ...] = ()) -> list[str]:
    """Every module of ``cp_plugin`` (dotted), except the files ``exclude``."""
    paths = sorted(p.relative_to(ROOT) for p in (ROOT / "cp_plugin").rglob("*.py") if p.relative_to(ROOT).as_posix() not in exclude)
    return [".".join(p.parent.parts if p.name == "__init__.py" else p.with_suffix("").parts) for p in paths]


CORE = library_modules(exclude=ADAPTERS)


@pytest.mark.parametrize(
    ("modules", "blocked"),
    [(CORE, (*RECIPE_TOOLS, *LIGHTNING, "accelerate")), (["cp_plugin.accelerate"], (*RECIPE_TOOLS, *LIGHTNING))],
    ids=["core", "accelerate"],
)
def test_the_core_needs_no_framework_and_the_accelerate_adapter_no_lightning(modules: list[str],
                                                                              blocked: tuple[str, ...]) -> None:
    assert "cp_plugin.core" in CORE and "cp_plugin.checkpoint.sharded" in CORE and "cp_plugin.lightning" not in CORE
    assert import_without(", ".join(modules), blocked)["loaded"] == []


def test_installed_tools_stay_unloaded_by_the_core_the_accelerate_adapter_and_the_library() -> None:
    """With everything installed (``[test]``), nothing imports what it does not need, in one interpreter: the core
    loads no Lightning (diffusers itself loads Accelerate when installed), nor does the Accelerate adapter after it;
    then the whole library, Lightning adapter included, loads none of the recipe's tools.

    Left out of the last check: matplotlib, which torchmetrics (imported by Lightning) loads whenever it
    is installed, and peft with its transformers, which diffusers' hooks load whenever installed; the
    tests above show nothing needs them.
    """
    recipe_tools = set(RECIPE_TOOLS) - {"matplotlib", "peft", "transformers"}
    code = (
        "import json, sys\n"
        "def loaded(packages): return sorted({n.split('.')[0] for n in sys.modules} & packages)\n"
        f"import {', '.join(CORE)}\n"
        f"core = loaded({set(LIGHTNING)!r})\n"
        "import cp_plugin.accelerate\n"
        f"accelerate = loaded({set(LIGHTNING)!r})\n"
        "import cp_plugin, cp_plugin.lightning\n"
        f"print(json.dumps({{'core': core, 'accelerate': accelerate, 'library': loaded({recipe_tools!r})}}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"core": [], "accelerate": [], "library": []}


def every_import(tree: ast.AST) -> list[tuple[str, int]]:
    """Top-level packages a module imports anywhere, function bodies included (lazy imports count)."""
    return [(alias.name.split(".")[0], node.lineno) for node in ast.walk(tree) if isinstance(node, ast.Import)
            for alias in node.names] + [(node.module.split(".")[0], node.lineno) for node in ast.walk(tree)
                                        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module]


def test_only_the_adapters_import_their_framework_even_lazily() -> None:
    offending = []
    for path in sorted((ROOT / "cp_plugin").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        for package, line in every_import(ast.parse(path.read_text(), filename=name)):
            if (package in LIGHTNING and name not in LIGHTNING_ADAPTER) or (package == "accelerate" and name != ADAPTERS[-1]):
                offending.append(f"{name}:{line} imports {package}")
    assert not offending, "only the adapters may import Lightning or Accelerate:\n" + "\n".join(offending)


def test_the_framework_scan_finds_lazy_imports() -> None:
    source = "def rng():\n    from lightning.fabric.utilities.seed import _collect_rng_states\n"
    assert every_import(ast.parse(source)) == [("lightning", 2)]
