"""Private APIs are reached through ``cp_plugin/compat.py`` only, and unverified versions are announced.

Two scans read the library's source. A pattern finds private names of torch / diffusers / Lightning /
Accelerate imported or reached as attributes. A walk of each module's syntax tree finds what a
pattern cannot see in classes built on a framework's: inherited private members (``self._timeout``),
overrides of private framework methods and ``super()`` calls of them (unless ``compat.PRIVATE_OVERRIDES``
records them), Lightning and Accelerate hooks overridden without ``@override``, and Lightning's
private checkpoint layout (``compat.LIGHTNING_LAYOUT_KEYS``). Each scan is shown failing on a
violating example.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from cp_plugin import compat

LIBRARY = Path(compat.__file__).parent
# A private name of torch / diffusers / lightning / accelerate: imported, or reached as an attribute.
PRIVATE = re.compile(
    r"from (torch|diffusers|lightning|accelerate)[\w.]* import [^\n]*\b_[a-zA-Z]"
    r"|import (torch|diffusers|lightning|accelerate)[\w.]*\._"
    r"|\b(torch|aten|funcol|DistributedDataParallel|_AttentionBackendRegistry)(\.\w+)*\._[a-zA-Z]"
    r"|\._(flatten|ddp_kwargs|optimizer|backends|is_accelerate_prepared)\b"
)


def test_private_apis_are_used_only_in_compat() -> None:
    offenders = [
        f"{path.relative_to(LIBRARY)}:{number}: {line.strip()}"
        for path in sorted(LIBRARY.rglob("*.py")) if path.name != "compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE.search(line)
    ]
    assert not offenders, "private APIs outside cp_plugin/compat.py:\n" + "\n".join(offenders)


def test_the_scan_finds_private_uses() -> None:
    for line in ("from torch.distributed.distributed_c10d import _get_default_store",
                 "mesh = root._flatten('cp')", "torch._foreach_norm(grads)", "aten._scaled_dot_product_flash_attention(q)"):
        assert PRIVATE.search(line), line


FRAMEWORKS = ("torch", "diffusers", "lightning", "pytorch_lightning", "accelerate")
HOOKED = ("lightning", "pytorch_lightning", "accelerate")  # frameworks whose hooks we override carry @override


def framework_imports(tree: ast.Module) -> dict[str, str]:
    """The names a module binds to framework objects, as ``module:attribute`` (``import torch`` as ``torch:``)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in FRAMEWORKS:
            names.update({alias.asname or alias.name: f"{node.module}:{alias.name}" for alias in node.names})
        elif isinstance(node, ast.Import):
            names.update({alias.asname or alias.name.split(".")[0]: f"{alias.name.split('.')[0]}:"
                          for alias in node.names if alias.name.split(".")[0] in FRAMEWORKS})
    return names


def resolve(node: ast.expr, imports: dict[str, str]) -> Any:
    """The framework object a base-class expression (``DDPStrategy``, ``torch.autograd.Function``) names, if any."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in imports:
        return None
    module, _, attribute = imports[node.id].partition(":")
    found: Any = importlib.import_module(module)
    for name in ([attribute] if attribute else []) + parts:
        found = getattr(found, name)
    return found


def defined_in(classes: list[type], name: str) -> type | None:
    """The framework class that defines ``name`` for a class built on ``classes`` (first in their MROs)."""
    return next((k for base in classes for k in base.__mro__ if name in vars(k)), None)


def qualified(cls: type, name: str) -> str:
    return f"{cls.__module__}.{cls.__qualname__}.{name}"


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def is_override(decorator: ast.expr) -> bool:
    return (decorator.id if isinstance(decorator, ast.Name) else getattr(decorator, "attr", None)) == "override"


def class_findings(cls: ast.ClassDef, bases: list[type]) -> list[tuple[int, str]]:
    """What a class built on the framework classes ``bases`` does that must go through compat (or lacks @override)."""
    found = []
    methods = [node for node in cls.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    own = {node.name for node in methods} | {
        target.attr for node in ast.walk(cls) if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign))
        for each in (node.targets if isinstance(node, ast.Assign) else [node.target])
        for target in ast.walk(each)
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    }
    hooked = any(k.__module__.split(".")[0] in HOOKED for base in bases for k in base.__mro__)
    for method in methods:
        owner = defined_in(bases, method.name)
        if owner is None or method.name.startswith("__"):
            continue
        if private(method.name) and qualified(owner, method.name) not in compat.PRIVATE_OVERRIDES:
            found.append((method.lineno, f"overrides the private {qualified(owner, method.name)}"))
        if hooked and not any(is_override(d) for d in method.decorator_list):
            found.append((method.lineno, f"overrides {qualified(owner, method.name)} without @override"))
    for node in ast.walk(cls):
        if not isinstance(node, ast.Attribute) or not private(node.attr):
            continue
        if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr not in own:
            found.append((node.lineno, f"reaches the inherited private member self.{node.attr}"))
        if isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "super":
            owner = defined_in(bases, node.attr)
            if owner is None or qualified(owner, node.attr) not in compat.PRIVATE_OVERRIDES:
                found.append((node.lineno, f"calls the private super().{node.attr}"))
    return found


def structural_findings(source: str) -> list[tuple[int, str]]:
    """Private framework members, unmarked hook overrides and Lightning's private checkpoint layout in ``source``."""
    tree = ast.parse(source)
    imports = framework_imports(tree)
    found, built_on = [], {}  # class name -> framework classes it is built on (also through classes defined here)
    for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)):
        bases = []
        for base in cls.bases:
            named = built_on.get(base.id, []) if isinstance(base, ast.Name) and base.id in built_on else [resolve(base, imports)]
            bases += [b for b in named if isinstance(b, type)]
        if bases:
            built_on[cls.name] = bases
            found += class_findings(cls, bases)
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    found += [(node.lineno, f"reads Lightning's private checkpoint layout ({node.value!r})") for node in ast.walk(tree)
              if isinstance(node, ast.Constant) and id(node) not in docstrings and node.value in compat.LIGHTNING_LAYOUT_KEYS]
    return found


def test_classes_built_on_frameworks_reach_private_members_only_through_compat() -> None:
    offenders = [
        f"{path.relative_to(LIBRARY)}:{line}: {what}"
        for path in sorted(LIBRARY.rglob("*.py")) if path.name != "compat.py"
        for line, what in structural_findings(path.read_text())
    ]
    assert not offenders, "outside cp_plugin/compat.py:\n" + "\n".join(offenders)


VIOLATING = """
from lightning.pytorch.strategies import DDPStrategy


class Strategy(DDPStrategy):
    def _register_ddp_hooks(self) -> None:
        if self._ddp_comm_hook is not None:
            super()._register_ddp_hooks()

    def setup(self, trainer):
        return trainer.state["loops"]["fit_loop"]
"""
CLEAN = """
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override


class Strategy(DDPStrategy):
    def __init__(self) -> None:
        super().__init__()
        self._trainer = None

    @override
    def setup(self, trainer):
        self._trainer = trainer
        return self._describe()

    def _describe(self) -> str:
        \"\"\"Names like "fit_loop" in a docstring are words, not the layout.\"\"\"
        return str(self._trainer)
"""


def test_the_structural_scan_finds_each_kind_of_violation() -> None:
    found = "\n".join(what for _, what in structural_findings(VIOLATING))
    for expected in ("overrides the private lightning.pytorch.strategies.ddp.DDPStrategy._register_ddp_hooks",
                     "_register_ddp_hooks without @override", "inherited private member self._ddp_comm_hook",
                     "calls the private super()._register_ddp_hooks", "DDPStrategy.setup without @override",
                     "private checkpoint layout ('fit_loop')"):
        assert expected in found, f"{expected!r} not found in:\n{found}"
    assert structural_findings(CLEAN) == []


def resolve_path(path: str) -> Any:
    """An object by its dotted path: the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name)
        return found
    raise ImportError(path)


@pytest.mark.parametrize(
    ("path", "recorded"),
    [*compat.PRIVATE_OVERRIDES.items(), *((f"accelerate.Accelerator.{name}", signature)
                                         for name, signature in compat.ACCELERATOR_WRAPS.items())],
)
def test_overridden_and_wrapped_framework_methods_keep_their_recorded_signatures(path: str, recorded: str) -> None:
    assert str(inspect.signature(resolve_path(path))) == recorded, (
        f"{path} changed its signature: check cp_plugin's override or wrapper of it, then record the new one in "
        "cp_plugin/compat.py"
    )


def test_the_accelerate_plugin_sets_no_attribute_of_the_users_objects_but_these() -> None:
    """Everything else goes through Accelerate's and torch's hooks, or ``compat.wrap_accelerator``."""
    tree = ast.parse((LIBRARY / "accelerate.py").read_text())
    assigned = {ast.unparse(target) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Attribute) and ast.unparse(target.value) != "self"}
    assert assigned == {"accelerator.ddp_handler", "sys.excepthook"}, assigned
    assert "setattr(" not in (LIBRARY / "accelerate.py").read_text()


def test_a_wrapper_outside_the_recorded_ones_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Accelerator.save_state is not among the methods cp_plugin may wrap"):
        compat.wrap_accelerator(object(), "save_state", lambda method: method)


def test_an_unverified_version_warns_once_naming_what_was_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(compat.VERIFIED, "torch", ("1.0",))
    with pytest.warns(UserWarning, match=r"verified with torch 1\.0\.x; torch 2\.\d+.* is installed.*python -m pytest"):
        given = compat.check_versions()
    assert sum("torch" in message.split(";")[0] for message in given) == 1
