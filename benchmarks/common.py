"""Shared by the benchmark scripts: run one experiment through `querytune.train` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(experiment: Path, output_dir: Path, overrides: list[str], log: Path) -> float:
    """Train one experiment in its own process (so peak memory is per run); returns the wall time in seconds."""
    cmd = [sys.executable, "-m", "querytune.train", str(experiment), "--output_dir", str(output_dir),
           "--overwrite_output_dir", "true", "--disable_tqdm", "true", *overrides]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{experiment.name} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start
