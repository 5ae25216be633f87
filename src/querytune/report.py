"""Comparing finished runs: one row per run with the task metric and what it cost."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from querytune.runs import METRICS_FILE, dir_size_mb, model_files, read_run


def run_row(run_dir: str | Path, metric_prefix: str = "test") -> dict[str, Any]:
    """The comparison row of one finished run (raises RunError for an unfinished one)."""
    run = Path(run_dir)
    info = read_run(run)
    metrics = json.loads((run / METRICS_FILE).read_text())

    def m(name: str) -> float | None:
        value = metrics.get(f"{metric_prefix}_{name}")
        return float(value) if value is not None else None

    return {
        "run": info.get("run_name", run.name),
        "method": info["method"],
        "accuracy": m("accuracy"),
        "in_scope_accuracy": m("in_scope_accuracy"),
        "oos_recall": m("oos_recall"),
        "macro_f1": m("macro_f1"),
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


def _fmt(value: Any, digits: int = 1, scale: float = 1.0) -> str:
    if value is None:
        return "–"
    return f"{value * scale:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table; accuracy-like metrics in percent."""
    has_oos = any(r.get("oos_recall") is not None for r in rows)
    head = ["run", "method"]
    head += ["in-scope acc %", "OOS recall %"] if has_oos else ["accuracy %"]
    head += ["macro-F1 %", "trainable %", "model MB", "train s", "train samples/s", "peak MB", "epochs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["method"]]
        cells += (
            [_fmt(r["in_scope_accuracy"], 2, 100), _fmt(r["oos_recall"], 1, 100)]
            if has_oos
            else [_fmt(r["accuracy"], 2, 100)]
        )
        cells += [
            _fmt(r["macro_f1"], 2, 100),
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


def plot_runs(rows: list[dict[str, Any]], path: str | Path, title: str = "querytune runs") -> None:
    """Bar charts side by side: the task metric, trainable %, model MB, train time, samples/s and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "in_scope_accuracy" if any(r.get("in_scope_accuracy") is not None for r in rows) else "accuracy"
    panels = [
        (metric, f"{metric.replace('_', ' ')} %", 100.0),
        ("trainable_percent", "trainable %", 1.0),
        ("model_size_mb", "model / adapter MB", 1.0),
        ("train_runtime_s", "train time s", 1.0),
        ("train_samples_per_second", "train samples/s", 1.0),
        ("peak_memory_mb", "peak memory MB", 1.0),
    ]
    names = [r["run"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.45 * len(rows) + 2), sharey=True)
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        values = [(r.get(key) or 0.0) * scale for r in rows]
        ax.barh(range(len(rows)), values, color="tab:blue")
        ax.set_yticks(range(len(rows)), names)
        ax.set_title(label, fontsize=10)
        if key == "trainable_percent":
            ax.set_xscale("log")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
