"""mkdocs hook (`hooks:` in mkdocs.yml): put the benchmark result tables and plots into the site without copying them
into docs/.

Every `benchmarks/results/**/*.md` and `*.png` becomes `benchmarks/results/...` of the site, so a page links to a
table as `benchmarks/results/NAME.md` (from the docs root) and `mkdocs build --strict` checks those links as it checks
any other. A table that a benchmark script's docstring names but that has not been written yet becomes a short page
that says so and names the script, rather than a broken link. Snippets are included from the repository root.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SITE_DIR = "benchmarks/results"


def _expected_tables() -> dict[str, str]:
    """Result tables named in the benchmark scripts' docstrings, by file name, with the script that writes them."""
    expected: dict[str, str] = {}
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
        for name in re.findall(r"benchmarks/results/([\w.-]+\.md)", doc):
            expected.setdefault(name, f"benchmarks/{script.name}")
    return expected


def on_config(config: Any) -> Any:
    """Snippets (`--8<-- "experiments/x.yaml"`) are read from the repository root wherever mkdocs is run from."""
    snippets = config["mdx_configs"].get("pymdownx.snippets")
    if snippets is not None:
        snippets["base_path"] = [str(REPO)]
    return config


def on_files(files: Files, config: Any) -> Files:
    for path in sorted(RESULTS.rglob("*")):
        if path.suffix in (".md", ".png") and path.is_file():
            uri = f"{SITE_DIR}/{path.relative_to(RESULTS).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    for name, script in _expected_tables().items():
        if not (RESULTS / name).is_file():
            text = (f"# {name}\n\nThis table has not been written yet. `python {script}` writes it (see "
                    "[Benchmarks](../../benchmarks.md)).\n")  # fmt: skip
            files.append(File.generated(config, f"{SITE_DIR}/{name}", content=text))
    return files
