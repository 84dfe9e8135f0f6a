"""Generated tables and figures in the README and the docs: each lives between two marker lines that the
benchmark writing it rewrites."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = README.parent / "docs"


def replace_section(start: str, end: str, table: str, readme: Path = README) -> None:
    """Put ``table`` between the lines ``start`` and ``end`` of ``readme`` (the README or a docs page), replacing
    what was there."""
    before, rest = readme.read_text().split(start, 1)
    after = rest.split(end, 1)[1]
    readme.write_text(f"{before}{start}\n{table}\n{end}{after}")
