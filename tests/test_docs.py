"""The documentation builds without a broken link, and the README's links lead somewhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_in_strict_mode(tmp_path: Path) -> None:
    """MkDocs in strict mode: a link to a missing page or anchor, a page outside the navigation, or a docstring
    mkdocstrings cannot parse fails."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "models" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "shard_batch" in api and "ParallelConfig" in api  # the reference was rendered from the docstrings


def test_every_relative_link_of_the_readme_exists() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, "the README links to no file: the test cannot fail"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"the README links to missing files: {missing}"


def test_the_troubleshooting_page_lists_every_error_the_library_raises() -> None:
    """``docs/troubleshooting.md`` is what ``python -m benchmarks.troubleshooting`` writes from the source today."""
    from benchmarks.troubleshooting import PAGE, page

    current = page()
    assert current.count("\n- ") > 50, "the page lists almost no errors: the extraction is broken"
    assert PAGE.read_text() == current, "an error was added or changed: run python -m benchmarks.troubleshooting"


def test_the_families_table_is_the_one_its_results_file_makes_and_covers_every_family() -> None:
    """The README's and the fine-tuning page's families tables are what ``python -m benchmarks.families`` wrote from
    ``benchmarks/results/families.json``, and that file measured every family the recipe has."""
    import json

    from benchmarks.families import END, START, table
    from recipe.families import FAMILIES

    rows = json.loads((ROOT / "benchmarks" / "results" / "families.json").read_text())
    assert {row["family"] for row in rows} == set(FAMILIES), "a family is not measured: run python -m benchmarks.families"
    for page in (ROOT / "README.md", ROOT / "docs" / "finetune.md"):
        written = page.read_text().split(START, 1)[1].split(END, 1)[0].strip()
        assert written == table(rows), f"{page.name}'s families table differs from its results: run python -m benchmarks.families"
