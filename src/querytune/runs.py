"""The run directory: what a finished run holds, and the marker that tells it from an interrupted one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

MARKER = "querytune_run.json"  # written last, atomically: its presence means the run finished
CONFIG_FILE = "querytune_config.yaml"
LABEL_MAP = "label_map.json"
METRICS_FILE = "all_results.json"


class RunError(ValueError):
    """A run directory that is missing, unfinished or not a querytune run."""


def prepare_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into a non-empty directory unless asked; never leave a stale finished marker."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            state = "a finished run" if (out / MARKER).exists() else "files of an unfinished run"
            raise RunError(
                f"output_dir {out} already holds {state}. Use another --output_dir, "
                "--resume_from_checkpoint last to continue it, or --overwrite_output_dir true to replace it."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # A resumed or restarted run is unfinished until it writes the marker again.
    (out / MARKER).unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def mark_finished(output_dir: str | Path, info: dict[str, Any]) -> None:
    write_json_atomic(Path(output_dir) / MARKER, {"status": "finished", **info})


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The marker of a finished run; a clear error for a missing, unfinished or foreign directory."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"run directory not found: {run}")
    marker = run / MARKER
    if not marker.is_file():
        hint = (
            " It has checkpoints: training was interrupted or is still running; finish it with "
            f"`querytune train {run / CONFIG_FILE} --resume_from_checkpoint last`."
            if any(run.glob("checkpoint-*"))
            else ""
        )
        raise RunError(f"{run} is not a finished querytune run (no {MARKER}).{hint}")
    return json.loads(marker.read_text())


def dir_size_mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def model_files(run_dir: str | Path) -> list[Path]:
    """The weight files of a run (adapter or full model), not checkpoints: what you would ship."""
    run = Path(run_dir)
    return sorted(
        p
        for p in run.iterdir()
        if p.suffix in (".safetensors", ".bin") and p.is_file() and p.name != "training_args.bin"
    )


def write_model_card(output_dir: Path, info: dict[str, Any]) -> None:
    """The run's README: the same card that `querytune push` uploads (see querytune.hub)."""
    from querytune.hub import model_card

    model_card(output_dir, info).save(output_dir / "README.md")
