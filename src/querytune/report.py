"""Comparing finished runs: one row per run with the task metric and what it cost."""

from __future__ import annotations

import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any

from querytune.runs import METRICS_FILE, dir_size_mb, model_files, read_run
from querytune.tasks import get_task


def task_columns(task: str | None, metrics: dict[str, float] | None = None) -> list[tuple[str, str, float]]:
    """The metric columns a run of `task` fills (its Task class's `report_columns`), less those shadowed by a more
    specific metric the run has."""
    if not task:
        return []
    try:
        cls = get_task(task)
    except ValueError:  # a run of a task this installation does not know
        return []
    shadowed = {name for name, by in cls.report_shadowed.items() if metrics is not None and by in metrics}
    return [c for c in cls.report_columns if c[0] not in shadowed]


def run_labels(run_dirs: list[str | Path]) -> dict[str, str]:
    """Each run directory's row name: its folder name, with as many parent folders as it takes to tell runs apart
    (`bench/clinc150-lora` and `old/clinc150-lora`). Experiment names are no row names: one experiment file often
    has several runs (a sweep, a re-run with other flags)."""
    parts = {str(d): Path(d).resolve().parts for d in run_dirs}
    depth = {d: 1 for d in parts}
    while True:
        labels = {d: "/".join(p[-depth[d] :]) for d, p in parts.items()}
        clashes = {d for d in labels if list(labels.values()).count(labels[d]) > 1 and depth[d] < len(parts[d])}
        if not clashes:
            return labels
        for d in clashes:
            depth[d] += 1


def run_row(
    run_dir: str | Path, metric_prefix: str = "test", label: str | None = None, allow_status: str | None = "finished"
) -> dict[str, Any]:
    """The comparison row of one finished run (raises RunError for an unfinished one, or a status not allowed),
    named `label` (default: the run directory's folder name)."""
    run = Path(run_dir)
    info = read_run(run, allow_status)
    metrics = json.loads((run / METRICS_FILE).read_text())
    task_metrics = {}
    for name, _, _ in task_columns(info.get("task")):
        value = metrics.get(f"{metric_prefix}_{name}")
        if isinstance(value, int | float):
            task_metrics[name] = float(value)
    return {
        "run": label or run.resolve().name,
        "task": info.get("task"),
        "method": info["method"],
        "metrics": task_metrics,
        "trainable_percent": info["trainable_percent"],
        "trainable_params": info["trainable_params"],
        "model_size_mb": dir_size_mb(model_files(run)),
        "train_runtime_s": info.get("train_runtime_s"),
        "wall_time_s": info.get("wall_time_s"),
        "train_samples_per_second": info.get("train_samples_per_second"),
        "peak_memory_mb": metrics.get("peak_memory_mb"),
        "peak_memory_kind": info.get("peak_memory_kind"),
        "epochs": metrics.get("train_epoch") or metrics.get("epoch"),
    }


def metric_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """The metric columns of the compared runs' tasks, in task and column order, each once."""
    columns: list[tuple[str, str, float]] = []
    for row in rows:
        for column in task_columns(row["task"], row["metrics"]):
            if column not in columns and column[0] in row["metrics"]:
                columns.append(column)
    return columns


def _fmt(value: Any, digits: int = 1, scale: float = 1.0) -> str:
    if value is None:
        return "–"
    return f"{value * scale:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table: the task metrics the runs have (in percent), then what each run cost."""
    columns = metric_columns(rows)
    head = ["run", "task", "method", *(header for _, header, _ in columns)]
    head += ["trainable %", "model MB", "train s", "train samples/s", "peak MB", "epochs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["task"] or "–", r["method"]]
        own = task_columns(r["task"], r["metrics"])
        cells += [_fmt(r["metrics"].get(c[0]), 2, c[2]) if c in own else "–" for c in columns]
        cells += [
            _fmt(r["trainable_percent"], 3),
            _fmt(r["model_size_mb"], 2),
            _fmt(r["train_runtime_s"], 0),
            _fmt(r["train_samples_per_second"], 1),
            _fmt(r["peak_memory_mb"], 0),
            _fmt(r["epochs"], 1),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def machine_description() -> str:
    """CPU/GPU, cores and library versions: every results table says where it was measured."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU only, {torch.get_num_threads()} torch threads"
    try:
        import os

        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (
        f"{cpu}, {cores} cores; {device}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; querytune commit {commit or 'unknown'}"
    )


def plain_number(value: float) -> str:
    """A number as people write it, never in exponent notation: 1,960 / 12.3 / 0.0583 (3 significant digits)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


# Panels whose values span orders of magnitude (a 0.1 MB adapter next to an 87 MB model): drawn on a log axis.
LOG_PANELS = {"trainable_percent", "model_size_mb", "peak_memory_mb"}


def _lookup(row: dict[str, Any], key: str) -> float | None:
    if key.startswith("metrics."):
        return row["metrics"].get(key.removeprefix("metrics."))
    return row.get(key)


def plot_runs(rows: list[dict[str, Any]], path: str | Path, title: str = "querytune runs") -> None:
    """Bar charts side by side: the task metric, trainable %, model MB, train time, samples/s and peak memory."""
    import matplotlib.pyplot as plt

    fig = comparison_figure(rows, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_figure(rows: list[dict[str, Any]], title: str = "querytune runs"):
    """The figure `plot_runs` saves: one bar panel per measure, sizes on log axes, values as plain numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metric_panels = [(f"metrics.{name}", header, scale) for name, header, scale in metric_columns(rows)]
    panels = [
        *metric_panels[:2],  # the two leading task metrics (e.g. in-scope accuracy and OOS recall)
        ("trainable_percent", "trainable %", 1.0),
        ("model_size_mb", "model / adapter MB", 1.0),
        ("train_runtime_s", "train time s", 1.0),
        ("train_samples_per_second", "train samples/s", 1.0),
        ("peak_memory_mb", "peak memory MB", 1.0),
    ]
    names = [r["run"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.45 * len(rows) + 2), sharey=True)
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        raw = [_lookup(r, key) for r in rows]
        log = key in LOG_PANELS and any(v for v in raw)
        values = [v * scale if v else (math.nan if log else 0.0) for v in raw]  # no bar at 0 on a log axis
        ax.barh(range(len(rows)), values, color="tab:blue")
        ax.set_yticks(range(len(rows)), names)
        ax.set_title(f"{label} (log scale)" if log else label, fontsize=10)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: plain_number(v)))
        for i, v in enumerate(values):
            if math.isfinite(v):
                ax.text(v, i, f" {plain_number(v)}", va="center", fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    return fig
