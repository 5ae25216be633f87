"""The run directory: what a finished run holds, and the marker that tells it from an interrupted one.

The marker (`querytune_run.json`) is written last and atomically, after the model, the reports, the W&B run and the
Hub push. Its `status` says how the run ended:

- `finished`: trained to the end and everything after training succeeded;
- `pruned`: stopped early by a sweep's pruner (the model is whatever it was when stopped);
- `failed_after_training`: the model was trained and saved, but finishing the W&B run or the Hub push failed
  (`failures` says which, with the error).

`predict`, `eval`, `export` and `serve` load only `finished` runs unless told otherwise (`allow_status`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from querytune.errors import ExportError, RunError

MARKER = "querytune_run.json"  # written last, atomically: without it a run is unfinished
FINISHED, PRUNED, FAILED_AFTER_TRAINING = "finished", "pruned", "failed_after_training"
STATUSES = (FINISHED, PRUNED, FAILED_AFTER_TRAINING)
_STATUS_MEANING = {
    PRUNED: "a sweep's pruner stopped it before the end of its schedule",
    FAILED_AFTER_TRAINING: "the model was trained and saved, but a step after training failed",
}
CONFIG_FILE = "querytune_config.yaml"
LABEL_MAP = "label_map.json"
METRICS_FILE = "all_results.json"
# An export directory (querytune.serving.export) has its own marker, also written last and atomically.
EXPORT_MARKER = "querytune_export.json"
PARTIAL_EXPORT_MARKER = ".querytune_export_partial"  # written first: an export is being written here
ONNX_FILE = "model.onnx"
TRAINER_STATE = "trainer_state.json"  # Trainer writes it last into a checkpoint: then the checkpoint is complete


def prepare_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into a non-empty directory unless asked; never leave a stale finished marker."""
    out = Path(output_dir)
    # A run that stopped before training wrote anything (bad data, a refused option) left only its resolved config:
    # nothing to lose, so running again into it needs no flag.
    held = {p.name for p in out.iterdir()} - {CONFIG_FILE} if out.is_dir() else set()
    if held and not resume:
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


def last_complete_checkpoint(output_dir: str | Path, required: tuple[str, ...] = ()) -> Path | None:
    """The newest `checkpoint-N` folder that was completely written, or None.

    A run killed while saving leaves a checkpoint without `trainer_state.json` (or without a file a method's callback
    writes after Trainer, `required`); resuming from it would fail or silently diverge, so it is skipped with a
    warning.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    )
    for _, path in reversed(found):
        missing = [name for name in (TRAINER_STATE, *required) if not (path / name).is_file()]
        if not missing:
            return path
        logging.getLogger("querytune").warning("skipping %s: it was not completely written (no %s)", path,
                                               ", ".join(missing))  # fmt: skip
    return None


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def mark_run(output_dir: str | Path, info: dict[str, Any], status: str = FINISHED,
             failures: list[dict[str, str]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Write the marker (last, atomically) with the run's status; returns what was written."""
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}; one of {STATUSES}")
    marker = {"status": status, **{k: v for k, v in info.items() if k not in ("status", "failures")}}
    if failures:
        marker["failures"] = failures
    write_json_atomic(Path(output_dir) / MARKER, marker)
    return marker


def read_run(
    run_dir: str | Path, allow_status: tuple[str, ...] | list[str] | str | None = (FINISHED,)
) -> dict[str, Any]:
    """The marker of a run whose status is in `allow_status` (default: finished only; None or "any": every status);
    a clear error for a missing, unfinished or foreign directory, or a status not allowed."""
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
    info = json.loads(marker.read_text())
    allowed = parse_allow_status(allow_status)
    status = info.get("status", FINISHED)
    if status not in allowed:
        failures = "; ".join(f"{f.get('stage')}: {f.get('error')}" for f in info.get("failures", []))
        raise RunError(
            f"{run} has status {status!r}: {_STATUS_MEANING.get(status, 'not finished')}"
            f"{f' ({failures})' if failures else ''}. Commands load finished runs only; pass --allow_status {status} "
            "to use it anyway."
        )
    return info


def parse_allow_status(allow_status: tuple[str, ...] | list[str] | str | None) -> tuple[str, ...]:
    """The statuses a command accepts: a name, a comma-separated list, "any" or None (every status)."""
    if allow_status is None:
        return STATUSES
    names = allow_status.split(",") if isinstance(allow_status, str) else list(allow_status)
    names = [n.strip() for n in names if n.strip()]
    if "any" in names:
        return STATUSES
    unknown = [n for n in names if n not in STATUSES]
    if unknown:
        raise RunError(f"--allow_status: unknown status {unknown[0]!r}; use one of {', '.join(STATUSES)} or any")
    return tuple(dict.fromkeys([FINISHED, *names]))


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
