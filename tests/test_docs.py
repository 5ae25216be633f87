"""The docs site (mkdocs.yml, docs/): it builds with --strict, its generated reference matches the code, and the
benchmarks page shows every result table and plot.

Why: the reference pages (experiment keys, command line, HTTP API, registries) are generated from the code so that
they cannot drift from it; a page that no longer matches the code must fail here, not mislead a user.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

GENERATOR = "python scripts/gen_reference.py"
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1",
       "OMP_NUM_THREADS": "1"}  # fmt: skip


def test_the_site_builds_in_strict_mode(tmp_path):
    """A broken link, a missing anchor, a page in the nav that does not exist or a missing included file fails."""
    if importlib.util.find_spec("material") is None:  # never a skip: CI must build the site
        pytest.fail("the docs need mkdocs-material: pip install -e '.[dev]'")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    problems = [
        line for line in result.stderr.splitlines() if line.startswith(("WARNING", "ERROR")) or "Error" in line
    ]
    assert result.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems or [result.stderr[-3000:]])
    assert (tmp_path / "site" / "reference" / "experiment-keys" / "index.html").is_file()
    assert (tmp_path / "site" / "benchmarks" / "results" / "clinc150_methods.png").is_file()


@pytest.mark.slow
def test_the_generated_reference_matches_the_code():
    """docs/reference/ is what `python scripts/gen_reference.py` writes now (in a fresh process, so that a toy task or
    method another test registered cannot leak into it)."""
    result = subprocess.run([sys.executable, "scripts/gen_reference.py", "--check"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, (
        f"docs/reference/ differs from what the code generates: run `{GENERATOR}` and commit the result.\n"
        f"{result.stderr[-2000:]}"
    )


def test_the_benchmarks_page_shows_every_result_table_and_plot():
    page = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    results = REPO / "benchmarks" / "results"
    missing = [p.name for p in sorted(results.glob("*")) if p.suffix in (".md", ".png")
               and f"benchmarks/results/{p.name}" not in page]  # fmt: skip
    assert not missing, f"docs/benchmarks.md does not link or show: {missing}"


def test_the_benchmarks_page_names_the_table_of_every_benchmark_script():
    """A script whose docstring names a table it writes (benchmarks/results/X.md) has a row on the benchmarks page,
    even before the table exists (the site then shows a page saying it has not been written yet)."""
    page = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    named = set()
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
        named |= set(re.findall(r"benchmarks/results/([\w.-]+\.md)", doc))
    missing = sorted(name for name in named if f"benchmarks/results/{name}" not in page)
    assert not missing, f"docs/benchmarks.md has no row for: {missing}"


# Docs speak to users: no tracker references or notes about where the authors worked.
INTERNAL = re.compile(r"\bissues? #?\d+|\bsession\b|\bthis (VM|box)\b|\bour (machine|VM|box)\b|\bthe lead\b", re.I)


def test_the_pages_speak_to_users():
    """The docs, the README, the experiment and sweep files and the results tables users read."""
    found = []
    pages = [REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "experiments").rglob("*.yaml"),
             *(REPO / "experiments").rglob("*.md"), *(REPO / "sweeps").glob("*.yaml"),
             *(REPO / "benchmarks" / "results").glob("*.md"), *(REPO / "benchmarks" / "notes").glob("*.md")]  # fmt: skip
    for page in sorted(pages):
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if INTERNAL.search(line):
                found.append(f"{page.relative_to(REPO)}:{n}: {line.strip()[:120]}")
    assert not found, "pages that speak of the project's internals:\n" + "\n".join(found)


def test_the_generator_is_deterministic_in_what_it_writes():
    """No paths, timestamps or versions of the generating machine in the committed pages."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "docs" / "reference").glob("*")))
    for leak in (str(REPO), str(Path.home()), sys.version.split()[0]):
        assert leak not in text, f"docs/reference holds {leak!r}: generation must not depend on the machine"


def test_every_link_of_the_readme_resolves():
    """README.md is read on GitHub and PyPI, outside the site: each of its relative links (docs pages, plots, files)
    must name a file of the repository, and every docs page it links must be in the site's nav."""
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10, local
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
    nav = (REPO / "mkdocs.yml").read_text()
    off_nav = [link for link in local if link.startswith("docs/") and link.endswith(".md")
               and link.removeprefix("docs/") not in nav]  # fmt: skip
    assert not off_nav, f"README.md links to docs pages the site does not list: {off_nav}"
