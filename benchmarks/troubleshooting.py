"""Every error cp_plugin raises, with the fix its message names: ``docs/troubleshooting.md``, read from the source.

    python -m benchmarks.troubleshooting      # rewrites docs/troubleshooting.md

Each ``raise`` of the library with a message, and each error a function builds for its caller to raise
(``return ValueError(...)``), is listed under its module and that function; the message is shown as written, its computed parts as ``{expression}``. ``tests/test_docs.py``
checks that the page is current, so a new error cannot go undocumented.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY, PAGE = ROOT / "cp_plugin", ROOT / "docs" / "troubleshooting.md"

HEADER = """# Troubleshooting: every error and its fix

cp_plugin checks what it is given before anything runs or communicates, and every rank raises the
same error. Each message names the setting involved and a way out. Below is every message the
library can raise, as written in its source (computed parts in braces), by module and function.
`python -m benchmarks.troubleshooting` writes this page; a test keeps it current.
"""


def _message(node: ast.expr) -> str | None:
    """The text of a message expression: string parts as written, computed parts as ``{expression}``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else "{" + ast.unparse(part.value) + "}"
                       for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _message(node.left), _message(node.right)
        return None if left is None or right is None else left + right
    return None


def errors(path: Path) -> list[tuple[str, str, str]]:
    """``(function, exception, message)`` of every ``raise`` with a message in ``path``, in source order."""
    found = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = f"{where}.{child.name}" if where and isinstance(child, (ast.FunctionDef, ast.ClassDef)) else (
                child.name if isinstance(child, (ast.FunctionDef, ast.ClassDef)) else where)
            # ``raise Error(...)``, and ``return Error(...)`` from a function that builds an error its caller raises
            made = child.exc if isinstance(child, ast.Raise) else child.value if isinstance(child, ast.Return) else None
            if (isinstance(made, ast.Call) and made.args and (isinstance(child, ast.Raise)
                                                               or ast.unparse(made.func).endswith("Error"))):
                message = _message(made.args[0])
                if message:
                    found.append((where or "module", ast.unparse(made.func), " ".join(message.split())))
            visit(child, inner)

    visit(ast.parse(path.read_text()), "")
    return found


def page() -> str:
    sections = [HEADER]
    for path in sorted(LIBRARY.rglob("*.py")):
        found = errors(path)
        if not found:
            continue
        sections.append(f"\n## `{path.relative_to(ROOT).as_posix()}`\n")
        for where, exception, message in found:
            text = message.replace("[", "\\[").replace("*", "\\*").replace("_", "\\_")  # Markdown: literal
            sections.append(f"- `{where}` raises `{exception}`: {text}")
    return "\n".join(sections) + "\n"


if __name__ == "__main__":
    PAGE.write_text(page())
    print(f"{PAGE.relative_to(ROOT)}: {PAGE.read_text().count(chr(10) + '- ')} errors")
