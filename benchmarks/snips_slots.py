"""SNIPS slot filling and joint intent + slots with all-MiniLM-L6-v2, next to the published JointBERT figures.

    python benchmarks/snips_slots.py                                # default rows, CPU schedule, offline data
    python benchmarks/snips_slots.py --tasks joint --methods full lora --epochs full=10 lora=20

Each row runs an experiment file, `experiments/slots/snips-<method>.yaml` (slots) or
`experiments/slots/snips-joint-<method>.yaml` (joint), through `querytune.train` in a subprocess (so peak memory is
per run), pointed at the local copy of the data by override: the benchmark never copies an experiment. Finished runs
are reused unless --force, so an interrupted benchmark resumes.

By default it trains every method jointly (intent + slots, as JointBERT does) plus slot-only full fine-tuning and
LoRA, to show what the intent head costs or gives the slots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from common import train  # noqa: E402

from querytune.report import machine_description  # noqa: E402
from querytune.runs import MARKER, METRICS_FILE, dir_size_mb, model_files, read_run  # noqa: E402

METHODS = ["full", "lora", "adapter-houlsby", "adapter-pfeiffer", "ia3", "adalora", "prompt", "prefix", "freeze"]
TASKS = {"slots": "snips-{method}.yaml", "joint": "snips-joint-{method}.yaml"}
DEFAULT_ROWS = [("slots", "full"), ("slots", "lora")] + [("joint", m) for m in METHODS]
# Epochs that fit a 2-core CPU: one SNIPS epoch (13,084 queries) is about 4-5 minutes of MiniLM-L6 training there,
# so the default rows take about 2.5 hours. The experiment files hold the longer GPU schedules (full 10 epochs,
# PEFT methods 20).
CPU_EPOCHS = {"full": 3, "freeze": 2, "lora": 4, "adalora": 4, "ia3": 4, "prefix": 2, "prompt": 2,
              "adapter-houlsby": 4, "adapter-pfeiffer": 4}  # fmt: skip
# Chen et al. (2019), "BERT for Joint Intent Classification and Slot Filling", Table 2, SNIPS test set.
JOINTBERT = {"intent_accuracy": 0.986, "slot_f1": 0.970, "exact_match": 0.928, "params": "110M"}
MINILM_PARAMS = "22.7M"
ERRORS = ("wrong_type", "wrong_boundary", "wrong_type_and_boundary", "missed", "spurious")


def row(run_dir: Path, task: str) -> dict[str, Any]:
    """The table row of one finished run: test-split scores, span errors and cost."""
    info = read_run(run_dir)
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    slot = "test_slot_" if task == "joint" else "test_"
    return {
        "run": run_dir.name,
        "task": task,
        "method": info["method"],
        "intent_accuracy": metrics.get("test_intent_accuracy"),
        "slot_f1": metrics[f"{slot}f1"],
        "slot_precision": metrics[f"{slot}precision"],
        "slot_recall": metrics[f"{slot}recall"],
        "exact_match": metrics.get("test_exact_match"),
        "errors": {kind: metrics[f"{slot}{kind}"] for kind in ERRORS},
        "gold_spans": metrics[f"{slot}num_gold_spans"],
        "trainable_percent": info["trainable_percent"],
        "total_params": info["total_params"],
        "model_size_mb": dir_size_mb(model_files(run_dir)),
        "train_runtime_s": info.get("train_runtime_s"),
        "train_samples_per_second": info.get("train_samples_per_second"),
        "peak_memory_mb": metrics.get("peak_memory_mb"),
        "epochs": metrics.get("train_epoch") or metrics.get("epoch"),
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    head = ["run", "task", "method", "intent acc %", "slot F1 %", "slot P %", "slot R %", "exact match %",
            "trainable %", "params", "model MB", "train s", "train samples/s", "peak MB", "epochs"]  # fmt: skip
    lines = [
        "# SNIPS slot filling and joint intent + slots (all-MiniLM-L6-v2)",
        "",
        f"Measured by `python benchmarks/snips_slots.py` on: {machine_description()}.",
        "",
        "Test split of SNIPS as split by JointBERT (700 queries, 7 intents, 39 slot types). Slot scores are seqeval "
        "entity-level micro averages over words (a word's tag is read at its first sub-token); exact match is the "
        "intent and every word's tag right (JointBERT's sentence accuracy). Epochs follow the CPU schedule in the "
        "script, shorter than the experiment files' GPU schedules. Model MB is the saved adapter or model.",
        "",
        f"Model size: all-MiniLM-L6-v2 has {MINILM_PARAMS} parameters (6 layers, hidden 384); JointBERT used "
        f"BERT-base ({JOINTBERT['params']}), about 5x larger.",
        "",
    ]
    if args.note:
        lines += [args.note, ""]
    if args.max_train_samples or args.max_eval_samples:
        lines += [f"**Smoke run** (max_train_samples {args.max_train_samples}, max_eval_samples "
                  f"{args.max_eval_samples}): these figures say nothing about the method.", ""]  # fmt: skip
    lines += [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| JointBERT (Chen et al. 2019, published) | joint | full | "
        f"{_pct(JOINTBERT['intent_accuracy'])} | {_pct(JOINTBERT['slot_f1'])} | – | – | "
        f"{_pct(JOINTBERT['exact_match'])} | 100 | {JOINTBERT['params']} | – | – | – | – | – |",
    ]
    for r in rows:
        cells = [r["run"], r["task"], r["method"], _pct(r["intent_accuracy"]), _pct(r["slot_f1"]),
                 _pct(r["slot_precision"]), _pct(r["slot_recall"]), _pct(r["exact_match"]),
                 _num(r["trainable_percent"], 3), f"{r['total_params'] / 1e6:.1f}M", _num(r["model_size_mb"], 2),
                 _num(r["train_runtime_s"]), _num(r["train_samples_per_second"], 1), _num(r["peak_memory_mb"]),
                 _num(r["epochs"], 1)]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "Span errors on the test split (each gold and predicted span counted once: same words other type; same type "
        "overlapping other words; other type and other words; gold span with no overlapping prediction; predicted "
        "span with no overlapping gold span):",
        "",
        "| run | gold spans | " + " | ".join(k.replace("_", " ") for k in ERRORS) + " |",
        "|" + "---|" * (len(ERRORS) + 2),
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['gold_spans']} | " + " | ".join(str(r["errors"][k]) for k in ERRORS) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/snips"))
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None, help="default: the default rows")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="default: the default rows")
    parser.add_argument("--epochs", nargs="*", default=[], help="method=epochs overrides of the CPU schedule")
    parser.add_argument("--runs", default=str(REPO / "runs/bench-snips"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/snips_slots.md"))
    parser.add_argument("--max_train_samples", type=int, default=None, help="smoke runs only")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="smoke runs only")
    parser.add_argument("--force", action="store_true", help="retrain finished runs")
    parser.add_argument("--report_only", action="store_true", help="tabulate the finished runs; train nothing")
    parser.add_argument("--note", default=None, help="a sentence added under the table header (e.g. CPU sharing)")
    args = parser.parse_args()

    epochs = dict(CPU_EPOCHS)
    for item in args.epochs:
        method, value = item.split("=")
        epochs[method] = float(value)
    plan = DEFAULT_ROWS
    if args.tasks or args.methods:
        plan = [(t, m) for t in args.tasks or list(TASKS) for m in args.methods or METHODS]
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)

    rows = []
    for task, method in plan:
        out = runs / f"{task}-{method}"
        if args.report_only and not (out / MARKER).is_file():
            continue
        if args.force or not (out / MARKER).is_file():
            overrides = ["--dataset_name", args.data, "--num_train_epochs", str(epochs[method])]
            for key in ("max_train_samples", "max_eval_samples"):
                if getattr(args, key):
                    overrides += [f"--{key}", str(getattr(args, key))]
            experiment = REPO / "experiments/slots" / TASKS[task].format(method=method)
            wall = train(experiment, out, overrides, runs / f"{task}-{method}.log")
            print(f"{task}-{method}: {wall:.0f} s", flush=True)
        rows.append(row(out, task))
        print(json.dumps(rows[-1]), flush=True)
        write_table(args, rows)  # after every run, so a cut-short benchmark still leaves its rows


if __name__ == "__main__":
    main()
