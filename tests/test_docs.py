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
    ``benchmarks/results/families.json``, ``families_train_py.json`` and ``families_resume.json``, which measured
    every family the recipe has."""
    import json

    from benchmarks.families import END, RESUMES, START, TRIPS, table
    from recipe.families import FAMILIES

    rows = json.loads((ROOT / "benchmarks" / "results" / "families.json").read_text())
    trips, resumes = json.loads(TRIPS.read_text()), json.loads(RESUMES.read_text())
    assert {row["family"] for row in rows} == set(trips) == set(resumes) == set(FAMILIES), \
        "a family is not measured: run python -m benchmarks.families"
    for page in (ROOT / "README.md", ROOT / "docs" / "finetune.md"):
        written = page.read_text().split(START, 1)[1].split(END, 1)[0].strip()
        assert written == table(rows, trips, resumes), \
            f"{page.name}'s families table differs from its results: run python -m benchmarks.families"


def test_the_longest_sequence_tables_are_the_ones_their_results_file_makes() -> None:
    """The README's longest-sequence table and the benchmarks page's are what ``python -m benchmarks.longest``
    wrote from ``benchmarks/results/longest.jsonl`` (``--report-only`` rewrites them from it)."""
    from benchmarks.longest import OUT, README_END, README_START, in_order, layouts, page_table, read, summary

    records = in_order(layouts(read(ROOT / OUT / "longest.jsonl")))
    assert {r["world"] for r in records} >= {1, 2}, "the search measured nothing: the test cannot fail"
    readme = (ROOT / "README.md").read_text().split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert readme == summary(records), "the README's table differs: run python -m benchmarks.longest --report-only"
    docs = (ROOT / "docs" / "benchmarks.md").read_text().split(README_START, 1)[1].split(README_END, 1)[0].strip()
    results = (ROOT / OUT / "longest.md").read_text()
    assert docs == page_table(results), "docs/benchmarks.md's table differs from benchmarks/results/longest.md"


# A measured figure: a number with decimals or an exponent, or with a unit; plain integers are counts and settings
# (token lengths, ports, ranks), and a one-digit power of ten (1e-5) is a bound the tests hold, not a measurement.
FIGURE = re.compile(r"(?<![\w.\-/])(\d+(?:\.\d+)?(?:e-?\d+)?)( ?k| ?B\b|x| ?%| ?s\b| ?ms\b| ?[KMG]iB| TFLOP/s)?(?![\w/])")
# A number that names a version or a model (torch 2.13, Wan 2.2, HunyuanVideo 1.5) is not a figure.
NAMED = re.compile(r"\b(?:Python|torch|diffusers|lightning|Lightning|accelerate|Accelerate|peft|Wan|HunyuanVideo|"
                   r"Qwen|Kandinsky|Lumina|LTX|Cosmos|Sana|CogVideoX|CUDA)[\s-]v?\d+(?:\.\d+)*")
SCALES = {"k": (1e3, 1024), "B": (1e9,), "%": (1, 0.01)}


def _rounding(figure: str) -> float:
    """Half a unit of the figure's last written digit: how far from its source it may be by rounding."""
    mantissa, _, exponent = figure.partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def unsourced_figures(page: Path) -> list[str]:
    """Every measured figure in ``page``'s prose that no results file its section names holds, to its rounding.

    A section names its sources as ``benchmarks/results/<file or folder>`` or by the command that writes them
    (``benchmarks.<name>`` -> ``benchmarks/results/<name>*``). Code, comments, links and names are not figures.
    A figure counts as sourced when its files hold the value anywhere: this finds figures typed with no source and
    figures a rerun changed, not one that equals another cell of the same file by chance.
    """
    results = ROOT / "benchmarks" / "results"
    files = {str(p.relative_to(results)): p for p in results.rglob("*") if p.suffix in (".md", ".json", ".jsonl")}
    missing = []
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for section in re.split(r"(?m)^(?=#+ )", text):
        named = re.findall(r"benchmarks/results/([\w./-]+)", section)
        sources = {f for f in files if any(f == n or f.startswith(n.rstrip("/") + "/") for n in named)}
        for module in re.findall(r"benchmarks\.(\w+)", section):
            sources |= {f for f in files if re.match(rf"{module}[_./]", f)}
        pool = [float(v) for f in sources for v in re.findall(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", files[f].read_text())]
        prose = re.sub(r"<!--.*?-->", "", section, flags=re.S)
        prose = NAMED.sub("", re.sub(r"`[^`]*`|!?\[[^\]]*\]\([^)]*\)|^#+ .*$", "", prose, flags=re.M))
        for match in FIGURE.finditer(prose):
            figure, unit = match.group(1), (match.group(2) or "").strip()
            if not unit and ("." not in figure and "e" not in figure or re.fullmatch(r"\de-\d+", figure)):
                continue
            near = _rounding(figure)
            if not any(abs(v - float(figure) * s) <= near * s * 1.0001 for s in SCALES.get(unit, (1,)) for v in pool):
                missing.append(f"{page.name}, {section.splitlines()[0][:50]!r}: {figure}{match.group(2) or ''}")
    return missing

def test_every_measured_figure_of_the_readme_and_the_docs_is_in_the_results_file_its_section_names(
        tmp_path: Path) -> None:
    """A figure typed by hand drifts from its measurement, or never had one: each must be what its results file says
    (to the figure's rounding). The troubleshooting page is generated from the source (tested above)."""
    pages = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").glob("*.md"))
                                   if p.name not in ("troubleshooting.md", "diffusers_dit_survey.md"))]
    missing = [figure for page in pages for figure in unsourced_figures(page)]
    assert not missing, f"figures no results file of their section holds (rerun its benchmark, or cite it): {missing}"
    planted = tmp_path / "benchmarks.md"  # one figure off by a digit, one typed with no source: both are found
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "1.15x [1.15-1.21]" in text
    planted.write_text(text.replace("1.15x [1.15-1.21]", "1.93x [1.15-1.21]") + "\n## Elsewhere\n\nIt took 12.5 s.\n")
    assert [figure.rsplit(": ", 1)[1] for figure in unsourced_figures(planted)] == ["1.93x", "12.5 s"]


MACHINE = re.compile(r"\b(?:x86_64|aarch64|arm64|AMD64|NVIDIA [A-Z]\w*)")


def test_every_results_file_names_the_command_machine_and_versions_that_made_it() -> None:
    """A figure is judged by where it ran: each results page opens (before its first table) with the command that
    wrote it, the machine and the torch version (``benchmarks.provenance`` writes them)."""
    results = ROOT / "benchmarks" / "results"
    for page in sorted(results.rglob("*.md")):
        name, header = str(page.relative_to(results)), page.read_text().split("\n|", 1)[0]
        assert re.search(r"`python -m benchmarks\.\w+", header), f"{name}: no command"
        assert MACHINE.search(header), f"{name}: no machine"
        assert re.search(r"\btorch \d+\.\d+", header), f"{name}: no torch version"
