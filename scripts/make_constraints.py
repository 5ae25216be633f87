"""Write constraints.txt: the installed version of every distribution that querytune and the extras asked for need.

    python scripts/make_constraints.py > constraints.txt           # querytune[dev], the environment CI tests
    python scripts/make_constraints.py bench > bench-constraints.txt

It walks the requirements of pyproject.toml (core plus the extras named, `dev` by default), then the installed
metadata of each requirement, recursively, with markers evaluated for this interpreter and platform, and prints
`name==version` for what is installed. Local version labels are dropped (`torch 2.13.0+cpu` -> `torch==2.13.0`), so
the file constrains CPU and CUDA builds alike. A requirement that is not installed is reported on stderr.
"""

from __future__ import annotations

import platform
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def project_requirements(extras: list[str]) -> list[Requirement]:
    """Core requirements plus those of `extras`, with the project's self-references (`querytune[x]`) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    out = [Requirement(r) for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional[extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def applies(req: Requirement, extras: set[str]) -> bool:
    """Whether `req` holds here, for a distribution installed with `extras`."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in extras | {""})


def closure(roots: list[Requirement]) -> dict[str, metadata.Distribution]:
    """Every installed distribution that `roots` need, by canonical name."""
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    todo = list(roots)
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            print(f"not installed, left out: {req}", file=sys.stderr)
            continue
        found[key[0]] = dist
        for text in dist.requires or []:
            sub = Requirement(text)
            if applies(sub, set(req.extras)):
                todo.append(sub)
    return found


def main(argv: list[str]) -> int:
    extras = argv or ["dev"]
    dists = closure(project_requirements(extras))
    print(f"# Exact versions of querytune[{','.join(extras)}] and everything it needs, as installed where CI and the")
    print("# benchmarks run. Generated (do not edit by hand) on")
    print(f"# Python {platform.python_version()}, {sys.platform} {platform.machine()} with:")
    print(f"#   python {' '.join(['scripts/make_constraints.py', *argv])} > constraints.txt")
    print('# Used by: pip install torch==2.13.0 && pip install -e ".[dev]" -c constraints.txt')
    print("# The ranges users get are in pyproject.toml; this file only pins the tested environment.")
    for name in sorted(dists):
        dist = dists[name]
        print(f"{dist.metadata['Name']}=={Version(dist.version).public}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
