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
