"""Converged intent and joint intent + slot runs, trained from the experiment files as written, with OOS detection.

    python benchmarks/converged.py                                   # every row, one training at a time
    python benchmarks/converged.py --rows clinc150-lora banking77-full --force

Each row is an experiment file plus only the override that points it at the local copy of the data
(`--dataset_name ../shared/data/...`, and BANKING77's `--label_column category`); sweep rows add the values they
try. Every training runs alone in its own process (`querytune.train`), under the machine-wide CPU lock; the script
refuses to start a row while the 1-minute load average is above 1.5 (unless `--force_load`) and records the load
before and after each row. Finished runs are reused unless `--force`, and the tables are rewritten after every row.

For every CLINC150 run it then scores the out-of-scope detectors offline from the run's validation and test logits:
each detector's threshold is chosen on validation only, by each rule, and applied to test.

Writes benchmarks/results/intent_converged.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import train  # noqa: E402

DATA = REPO.parent / "shared" / "data"
EXP = REPO / "experiments"
# name -> (experiment file, data folder, overrides beyond the data location, what the row is for)
ROWS: dict[str, tuple[str, str, list[str], str]] = {
    "clinc150-full": ("intent/clinc150-full.yaml", "clinc150", [], "as written"),
    "clinc150-lora": ("intent/clinc150-lora.yaml", "clinc150", [], "as written"),
    "clinc150-adapter-houlsby": ("intent/clinc150-adapter-houlsby.yaml", "clinc150", [], "as written"),
    "clinc150-adapter-pfeiffer": (
        "intent/clinc150-adapter-pfeiffer.yaml",
        "clinc150",
        ["--learning_rate", "1e-3"],
        "lr 1e-3 (the method file before the sweep)",
    ),
    "banking77-full": ("intent/banking77-full.yaml", "banking77", ["--label_column", "category"], "as written"),
    "banking77-lora": ("intent/banking77-lora.yaml", "banking77", ["--label_column", "category"], "as written"),
    "snips-joint-full": ("slots/snips-joint-full.yaml", "snips", [], "as written"),
    "snips-joint-lora": ("slots/snips-joint-lora.yaml", "snips", [], "as written"),
}
ROWS["clinc150-lora-e20"] = ("intent/clinc150-lora.yaml", "clinc150", ["--num_train_epochs", "20"],
                             "the LoRA method file's 20 epochs")  # fmt: skip
# Short learning-rate sweeps of the bottleneck adapters (2 epochs each), to find where they train.
for variant in ("houlsby", "pfeiffer"):
    for lr in ("3e-4", "1e-3", "3e-3", "1e-2"):
        ROWS[f"sweep-{variant}-lr{lr}"] = (f"intent/clinc150-adapter-{variant}.yaml", "clinc150",
                                           ["--learning_rate", lr, "--num_train_epochs", "2"], "lr sweep, 2 epochs")  # fmt: skip
ROWS["clinc150-adapter-pfeiffer-lr1e-2"] = ("intent/clinc150-adapter-pfeiffer.yaml", "clinc150", [],
                                            "as written: lr 1e-2, the sweep's best")  # fmt: skip
DETECTORS = ("msp", "energy", "oos_class")
RULES = (("in_scope_drop", "within 0.3 pt of argmax in-scope acc (the experiment files' setting)"), ("max_sum", "max in-scope acc + OOS recall"),
         ("in_scope_recall", "keeps 95% of in-scope validation queries"))  # fmt: skip


def run_row(name: str, runs: Path, force_load: bool) -> dict[str, Any]:
    exp, data, extra, purpose = ROWS[name]
    out = runs / name
    train(EXP / exp, out, ["--dataset_name", str(DATA / data), *extra], runs / f"{name}.log", force_load or None)
    timing = json.loads((out / "bench_row.json").read_text())
    return {"row": name, "experiment": exp, "overrides": extra, "purpose": purpose, **timing}


def describe(row: dict[str, Any], runs: Path) -> dict[str, Any]:
    """Figures of a finished run from its run directory."""
    from querytune.runs import METRICS_FILE, read_run

    out = runs / row["row"]
    info = read_run(out)
    metrics = json.loads((out / METRICS_FILE).read_text())
    log = json.loads((out / "train_log.json").read_text())
    best = max((e for e in log if "eval_loss" in e), key=lambda e: e.get(f"eval_{_select(out)}", -1), default={})
    return {**row, "method": info["method"], "task": info["task"], "metrics": metrics,
            "trainable_percent": info["trainable_percent"], "train_runtime_s": info["train_runtime_s"],
            "samples_per_s": info["train_samples_per_second"],
            "epochs": metrics.get("epoch") or max((e.get("epoch", 0) for e in log), default=None),
            "best_epoch": best.get("epoch")}  # fmt: skip


def _select(run_dir: Path) -> str:
    import yaml

    config = yaml.safe_load((run_dir / "querytune_config.yaml").read_text())
    return str(config.get("metric_for_best_model") or "accuracy").removeprefix("eval_")


def oos_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every detector x rule, threshold chosen on validation logits, scored on test; and the argmax model."""
    import numpy as np

    from querytune.inference import LoadedRun
    from querytune.tasks.classification.data import load_eval_split
    from querytune.tasks.shared import oos

    loaded = LoadedRun(run_dir, device="cpu")
    task, data = loaded.task, loaded.config.data
    task.oos = None
    splits = {}
    for split in ("validation", "test"):
        ds = load_eval_split(data, split, task.labels)
        splits[split] = (task.logits(loaded, ds[data.text_column], batch_size=256), np.asarray(ds["labels"]))
    (val_logits, val_gold), (test_logits, test_gold) = splits["validation"], splits["test"]
    rows = [{"detector": "none (argmax)", "rule": "–", **task.scored(test_logits, test_gold)}]
    for detector in DETECTORS:
        for rule, _ in RULES:
            det = oos.choose_threshold(val_logits, val_gold, detector, task.oos_id, rule, 0.3, 0.95)
            task.oos = det
            rows.append(
                {"detector": detector, "rule": rule, "val": det.chosen_on, **task.scored(test_logits, test_gold)}
            )
            task.oos = None
    detection = loaded.config.section("oos")
    configured = (detection.oos_detector, detection.oos_threshold_rule, detection.oos_max_in_scope_drop,
                  detection.oos_in_scope_recall)  # fmt: skip
    if configured[0] not in (None, "none") and configured[2:] != (0.3, 0.95):  # the file's own, if not above
        det = oos.choose_threshold(val_logits, val_gold, *configured[:1], task.oos_id, *configured[1:])
        task.oos = det
        setting = {"in_scope_drop": detection.oos_max_in_scope_drop, "in_scope_recall": detection.oos_in_scope_recall}
        rule = (
            f"{detection.oos_threshold_rule} {setting.get(detection.oos_threshold_rule, '')} (the experiment file's)"
        )
        rows.append({"detector": detection.oos_detector, "rule": rule, "val": det.chosen_on,
                     **task.scored(test_logits, test_gold)})  # fmt: skip
        task.oos = None
    return rows


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def write_table(out: Path, rows: list[dict[str, Any]], oos_tables: dict[str, list[dict]], note: str) -> None:
    from querytune.report import machine_description

    lines = [
        "# Converged intent and joint intent + slot runs (all-MiniLM-L6-v2)",
        "",
        f"Measured by `python benchmarks/converged.py` on: {machine_description()}. The commit is the checkout when "
        "the tables were last written; finished rows are reused by later invocations, and the commit each row was "
        "trained at is not saved with it" + ("; the notes below name each row's." if note else "."),
        "",
        "Every row trains an experiment file as written (`experiments/...`), pointed at `../shared/data` by "
        "override, one training at a time. `epochs` is the schedule; `best` the epoch the checkpoint kept "
        "(`load_best_model_at_end` on validation). `train s` counts the Trainer's training loop, `wall s` the "
        "whole command. Load is the 1-minute load average before / after the row.",
        "",
    ]
    sections = (("CLINC150 (test: 4,500 in-scope + 1,000 out-of-scope queries)", "clinc150"),
                ("BANKING77 (test: 3,080 queries)", "banking77"), ("SNIPS joint intent + slots (test: 700)", "snips"))  # fmt: skip
    for title, key in sections:
        chosen = [r for r in rows if r["row"].startswith(key) or (key == "clinc150" and r["row"].startswith("sweep"))]
        if not chosen:
            continue
        lines += [f"## {title}", ""]
        if key == "snips":
            lines += ["| row | method | intent acc % | slot F1 % | exact match % | trainable % | epochs (best) | "
                      "train s | wall s | samples/s | load |", "|" + "---|" * 11]  # fmt: skip
        else:
            lines += ["| row | method | purpose | accuracy % | in-scope acc % | OOS recall (argmax) % | macro-F1 % | "
                      "trainable % | epochs (best) | train s | wall s | samples/s | load |", "|" + "---|" * 13]  # fmt: skip
        for r in chosen:
            m = r["metrics"]
            common = [f"{r['trainable_percent']:.3f}", f"{r['epochs']:g} ({r['best_epoch'] or '–'})",
                      f"{r['train_runtime_s']:.0f}", f"{r['wall_s']:.0f}", f"{r['samples_per_s']:.1f}",
                      f"{r['load_before']:.2f} / {r['load_after']:.2f}"]  # fmt: skip
            if key == "snips":
                cells = [r["row"], r["method"], _pct(m.get("test_intent_accuracy")), _pct(m.get("test_slot_f1")),
                         _pct(m.get("test_exact_match")), *common]  # fmt: skip
            else:
                in_scope = m.get("test_argmax_in_scope_accuracy", m.get("test_in_scope_accuracy"))
                recall = m.get("test_argmax_oos_recall", m.get("test_oos_recall"))
                accuracy = m.get("test_argmax_accuracy", m.get("test_accuracy"))
                macro = m.get("test_argmax_macro_f1", m.get("test_macro_f1"))
                cells = [r["row"], r["method"], r["purpose"], _pct(accuracy), _pct(in_scope), _pct(recall),
                         _pct(macro), *common]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if oos_tables:
        lines += ["## CLINC150 out-of-scope detection", "",
                  "Each detector's threshold is chosen on the validation split only (3,000 in-scope + 100 OOS "
                  "queries), by the rule named, then applied to test. A rejected in-scope query counts as wrong in "
                  "in-scope accuracy. AUROC and FPR@95 (OOS queries a threshold keeping 95% of in-scope queries "
                  "would accept) need no threshold.", ""]  # fmt: skip
        for run, table in oos_tables.items():
            lines += [f"### {run}", "", "| detector | rule | in-scope acc % | OOS recall % | OOS precision % | "
                      "OOS F1 % | AUROC % | FPR@95 % | threshold |", "|" + "---|" * 9]  # fmt: skip
            for t in table:
                lines.append(f"| {t['detector']} | {t['rule']} | {_pct(t.get('in_scope_accuracy'))} | "
                             f"{_pct(t.get('oos_recall'))} | {_pct(t.get('oos_precision'))} | {_pct(t.get('oos_f1'))} | "
                             f"{_pct(t.get('oos_auroc'))} | {_pct(t.get('oos_fpr_at_95_in_scope_recall'))} | "
                             f"{t.get('oos_threshold', float('nan')):.4g} |")  # fmt: skip
            lines.append("")
        lines += ["Rules: " + "; ".join(f"`{r}`: {d}" for r, d in RULES) + ".", ""]
    if note:
        lines += [note, ""]
    out.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=[r for r in ROWS if not r.startswith("sweep")],
                        choices=list(ROWS))  # fmt: skip
    parser.add_argument("--runs", default=str(REPO / "runs/bench-converged"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/intent_converged.md"))
    parser.add_argument("--force", action="store_true", help="retrain rows that already finished")
    parser.add_argument("--force_load", action="store_true", help="start a row even when the machine is busy")
    parser.add_argument("--report_only", action="store_true", help="rewrite the tables from finished rows")
    parser.add_argument("--note", default="", help="a paragraph appended to the tables")
    parser.add_argument("--refresh_oos", nargs="*", default=[], choices=list(ROWS),
                        help="recompute these finished rows' OOS tables (after a change of the rules)")  # fmt: skip
    args = parser.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    saved = runs / "rows.json"
    done: dict[str, dict] = {r["row"]: r for r in json.loads(saved.read_text())} if saved.is_file() else {}
    oos_file = runs / "oos.json"
    oos_tables: dict[str, list] = json.loads(oos_file.read_text()) if oos_file.is_file() else {}
    from querytune.runs import MARKER

    for name in args.refresh_oos:
        oos_tables[name] = oos_rows(runs / name)
        oos_file.write_text(json.dumps(oos_tables, indent=2, default=float))
    for name in [] if args.report_only else args.rows:
        if name in done and not args.force and (runs / name / MARKER).is_file():
            continue
        start = time.time()
        done[name] = run_row(name, runs, args.force_load)
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
        saved.write_text(json.dumps(list(done.values()), indent=2))
        if ROWS[name][1] == "clinc150" and not name.startswith("sweep"):
            oos_tables[name] = oos_rows(runs / name)
            oos_file.write_text(json.dumps(oos_tables, indent=2, default=float))
        rows = [describe(done[n], runs) for n in ROWS if n in done]
        write_table(Path(args.out), rows, oos_tables, args.note)
    rows = [describe(done[n], runs) for n in ROWS if n in done]
    write_table(Path(args.out), rows, oos_tables, args.note)
    os.sync()


if __name__ == "__main__":
    main()
