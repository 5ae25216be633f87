"""🤗 `evaluate` metric modules shipped inside querytune, loaded by path so they work offline."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent


@cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load a bundled metric module (e.g. 'classification') by its folder path: no Hub access."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"no bundled metric {name!r} in {METRICS_DIR}")
    return evaluate.load(str(path))
