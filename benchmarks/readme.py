"""The README's generated tables: each lives between two marker lines that the benchmark writing it rewrites."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def replace_section(start: str, end: str, table: str, readme: Path = README) -> None:
    """Put ``table`` between the lines ``start`` and ``end`` of the README, replacing what was there."""
    before, rest = readme.read_text().split(start, 1)
    after = rest.split(end, 1)[1]
    readme.write_text(f"{before}{start}\n{table}\n{end}{after}")
