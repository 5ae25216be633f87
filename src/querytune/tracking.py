"""Weights & Biases tracking: one W&B run per training, offline when there is no API key, reports as tables.

Trainer's own `WandbCallback` logs the training curves; it reuses the run started here, which carries querytune's
full resolved config, the experiment's name, group and tags. Trainer never calls `wandb.finish()`, so without
`finish_run` two trainings in one process (a sweep) would share one W&B run.

An unreachable W&B server never stops a training: `wandb.init` gets a timeout (WANDB_INIT_TIMEOUT, default 30 s
here instead of wandb's 90 s), and when it expires the run falls back to offline mode with one notice and trains on
(upload it later with `wandb sync`).
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from querytune.config import ExperimentConfig
from querytune.errors import ConfigError
from querytune.extras import require

logger = logging.getLogger(__name__)

INIT_TIMEOUT_S = 30.0  # without WANDB_INIT_TIMEOUT: how long an unreachable server may delay a training


def init_timeout() -> float:
    """WANDB_INIT_TIMEOUT as it is now, else INIT_TIMEOUT_S. Always passed explicitly: wandb reads its environment
    once per process, so a later change (a second training in one process) would otherwise wait wandb's 90 s."""
    value = os.environ.get("WANDB_INIT_TIMEOUT")
    try:
        return float(value) if value else INIT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"WANDB_INIT_TIMEOUT must be a number of seconds, got {value!r}") from None


def wants_wandb(config: ExperimentConfig) -> bool:
    return "wandb" in (config.training.report_to or [])


def has_api_key() -> bool:
    """Whether wandb could authenticate: WANDB_API_KEY or a stored login in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def check_extra(config: ExperimentConfig) -> None:
    """Fail before any work (data, model) when the run reports to W&B and the 'tracking' extra is missing."""
    if wants_wandb(config):
        require("wandb", extra="tracking", feature="report_to wandb")


def start_run(config: ExperimentConfig) -> Any | None:
    """Start this training's W&B run on the job's first process (before Trainer, which then reuses it): one run per
    job, not one per machine (TrainingArguments.should_log is true on every machine's first process)."""
    if not wants_wandb(config) or config.training.process_index != 0:
        return None
    wandb = require("wandb", extra="tracking", feature="report_to wandb")

    mode = None
    offline_dir = f"{os.environ.get('WANDB_DIR', '.')}/wandb"
    if not os.environ.get("WANDB_MODE") and not has_api_key():
        mode = "offline"
        print(
            f"querytune: no W&B API key found: logging offline to {offline_dir} (upload later with "
            "`wandb sync <that folder>/offline-run-*`)"
        )
    args = config.training
    run_id = os.environ.get("WANDB_RUN_ID")
    name = args.run_name
    if os.environ.get("WANDB_SWEEP_ID") and run_id and name:  # `wandb agent`: one run per trial, told apart
        name = f"{name}-{run_id}"
    kwargs = dict(
        project=args.wandb_project or os.environ.get("WANDB_PROJECT", "querytune"),
        name=name,
        group=args.wandb_group or os.environ.get("WANDB_RUN_GROUP"),
        tags=args.wandb_tags,
        config=config.to_flat_dict(),
        # wandb caches settings per process; pass the current folder so each run goes where the env says now
        dir=os.environ.get("WANDB_DIR"),
        reinit="finish_previous",
    )
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=init_timeout()), **kwargs)
    except (wandb.errors.Error, TimeoutError) as err:
        if mode == "offline" or os.environ.get("WANDB_MODE") == "offline":
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(
            f"querytune: W&B did not answer ({first_line}); training goes on with W&B offline in {offline_dir} "
            "(upload later with `wandb sync <that folder>/offline-run-*`)"
        )
        return wandb.init(mode="offline", **kwargs)


def finish_run(run: Any | None, metrics: dict[str, Any], output_dir: Path, info: dict[str, Any]) -> None:
    """Log final metrics, per-label reports (as tables) and plots (as images), then close the run."""
    if run is None:
        return
    import wandb

    run.summary.update({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    run.summary.update({k: info[k] for k in ("trainable_params", "trainable_percent", "method") if k in info})
    for report in sorted(output_dir.glob("*_report.json")):
        rows = report_rows(json.loads(report.read_text()))
        if rows:
            columns = list(rows[0])
            run.log({f"report/{report.stem}": wandb.Table(columns=columns, data=[list(r.values()) for r in rows])})
    for image in sorted(output_dir.glob("*.png")):
        run.log({f"plots/{image.stem}": wandb.Image(str(image))})
    run.finish()


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten a classification report ({label: {precision, recall, f1-score, support}}) into table rows."""
    rows = []
    for label, values in report.items():
        if isinstance(values, dict):
            rows.append({"label": label, **{k: float(v) for k, v in values.items()}})
    return rows
