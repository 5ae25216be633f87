"""The run directory: what a finished run holds, and the marker that tells it from an interrupted one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from querytune.errors import ExportError, RunError

MARKER = "querytune_run.json"  # written last, atomically: its presence means the run finished
CONFIG_FILE = "querytune_config.yaml"
LABEL_MAP = "label_map.json"
METRICS_FILE = "all_results.json"
# An export directory (querytune.serving.export) has its own marker, also written last and atomically.
EXPORT_MARKER = "querytune_export.json"
PARTIAL_EXPORT_MARKER = ".querytune_export_partial"  # written first: an export is being written here
ONNX_FILE = "model.onnx"


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


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_MARKER).is_file()


def read_export(export_dir: str | Path) -> dict[str, Any]:
    """The marker of a finished export; a clear error for a missing or half-written one."""
    path = Path(export_dir)
    if not path.is_dir():
        raise ExportError(f"export directory not found: {path}")
    if not is_export(path):
        raise ExportError(
            f"{path} is not a finished querytune export (no {EXPORT_MARKER}): it was interrupted or is still being "
            "written; run `querytune export` again"
        )
    return json.loads((path / EXPORT_MARKER).read_text())
