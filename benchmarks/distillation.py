"""A 3-layer student distilled from the 6-layer CLINC150 full fine-tune: the teacher and each student variant trained
from the experiment files, one at a time. Writes `benchmarks/results/distillation.md` (and the raw figures of every
row to `benchmarks/results/distillation.json`).

    python benchmarks/distillation.py                                # teacher, then the default students
    python benchmarks/distillation.py --rows student-3layer-e20      # one more variant (trains the teacher first)
    python benchmarks/distillation.py --list                         # the rows it knows
    python benchmarks/distillation.py --render                       # rewrite the table from the saved figures

Teacher: `experiments/intent/clinc150-full.yaml`; students: `experiments/intent/clinc150-student-3layer.yaml`
with `--distill_teacher` and `--model_name_or_path` pointing at the teacher run, plus each row's overrides. Every
row also points the file at the local data (`--dataset_name ../shared/data/clinc150`). Each training runs alone in
its own process (`common.train`: machine-wide CPU lock, refuses to start above a 1-minute load average of 1.5
unless `--force_load`, load before / after recorded). A row's figures (its commit, command, load, wall time) are
saved when it finishes, and the table is rewritten after every row, so a stopped run loses only the row it was in.
Finished rows are skipped unless `--force`.

The out-of-scope figures are scored offline from each run's validation and test logits, as `converged.py` does:
the argmax model, and the experiment files' detector (energy, threshold chosen on validation so that in-scope
accuracy drops at most 0.3 point) applied to test.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import train  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "clinc150"
EXP = REPO / "experiments" / "intent"
RESULTS = REPO / "benchmarks" / "results"
TEACHER = "teacher"
# row -> (experiment file, overrides beyond the data location and the teacher, what the row tries)
ROWS: dict[str, tuple[str, list[str], str]] = {
    TEACHER: ("clinc150-full.yaml", [], "the teacher: 6 layers, the full fine-tune as written"),
    "student-3layer": ("clinc150-student-3layer.yaml", [], "as written: layers 0, 2, 4; alpha 0.5, T 2, 10 epochs"),
    "student-3layer-a0.9": ("clinc150-student-3layer.yaml", ["--distill_alpha", "0.9"], "more weight on the teacher"),
    "student-3layer-e20": ("clinc150-student-3layer.yaml", ["--num_train_epochs", "20"], "twice the epochs"),
    "student-3layer-t4": ("clinc150-student-3layer.yaml", ["--distill_temperature", "4"], "a softer teacher (T 4)"),
    "student-3layer-bottom": ("clinc150-student-3layer.yaml", ["--student_layers", "0", "1", "2"],
                              "the bottom three layers kept"),
    "student-3layer-hidden": ("clinc150-student-3layer.yaml", ["--distill_hidden_weight", "1.0"],
                              "hidden-state matching (TinyBERT), weight 1"),
}  # fmt: skip
DEFAULT_ROWS = [TEACHER, "student-3layer", "student-3layer-a0.9"]


def overrides(name: str, runs: Path) -> list[str]:
    """The row's command-line overrides: the local data, the teacher run (students), the row's own."""
    extra = ["--dataset_name", str(DATA)]
    if name != TEACHER:
        teacher = str(runs / TEACHER)
        extra += ["--distill_teacher", teacher, "--model_name_or_path", teacher]
    return [*extra, *ROWS[name][1]]


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src", "experiments"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head.strip() + (" (with uncommitted changes)" if dirty else "")


def figures(name: str, run: Path) -> dict[str, Any]:
    """What the table shows of a finished run: validation per epoch, test with and without the energy detector."""
    import yaml
    from converged import oos_rows

    from querytune.runs import read_run

    info = read_run(run)
    log = json.loads((run / "train_log.json").read_text())
    per_epoch = [(e["epoch"], e["eval_in_scope_accuracy"]) for e in log if "eval_in_scope_accuracy" in e]
    best_epoch, best_val = max(per_epoch, key=lambda e: e[1])
    table = oos_rows(run)
    argmax = next(t for t in table if t["detector"] == "none (argmax)")
    energy = next(t for t in table if t["detector"] == "energy" and t["rule"] == "in_scope_drop")
    config = yaml.safe_load((run / "querytune_config.yaml").read_text())
    return {"val_per_epoch": per_epoch, "val_best": best_val, "best_epoch": best_epoch,
            "test_argmax_in_scope": argmax["in_scope_accuracy"], "test_energy_in_scope": energy["in_scope_accuracy"],
            "test_energy_oos_recall": energy["oos_recall"], "oos_auroc": energy["oos_auroc"],
            "total_params": info["total_params"], "train_runtime_s": info["train_runtime_s"],
            "samples_per_s": info["train_samples_per_second"], "epochs": config.get("num_train_epochs"),
            "layers": config.get("student_layers"), "alpha": config.get("distill_alpha") if name != TEACHER else None,
            "temperature": config.get("distill_temperature") if name != TEACHER else None}  # fmt: skip


def run_row(name: str, runs: Path, force_load: bool, more: list[str]) -> dict[str, Any]:
    experiment, run = EXP / ROWS[name][0], runs / name
    extra = [*overrides(name, runs), *more]
    command = f"querytune train experiments/intent/{ROWS[name][0]} " + " ".join(
        a.replace(str(REPO) + "/", "").replace(str(REPO.parent), "..") for a in extra
    )
    started = commit()
    train(experiment, run, [*extra, "--report_to", "none"], runs / f"{name}.log", force_load)
    timing = json.loads((run / "bench_row.json").read_text())
    return {"row": name, "purpose": ROWS[name][2], "command": command, "commit": started, **timing,
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **figures(name, run)}  # fmt: skip


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def render(raw: dict[str, dict[str, Any]], out: Path, machine: str, note: str = "") -> None:
    """The table of every finished row, in `ROWS` order, and `note` (what else ran beside a row) after it."""
    rows = [raw[n] for n in ROWS if n in raw]
    teacher = raw.get(TEACHER)
    commits = sorted({r["commit"] for r in rows})
    lines = [
        "# A 3-layer student distilled from the CLINC150 full fine-tune", "",
        f"Measured by `python benchmarks/distillation.py` on {machine} (the commit named there rendered this page), "
        f"one training at a time; the rows were trained at commit(s) {', '.join(commits) or '–'} (each row's commit, "
        "command, load and finish time are in `distillation.json`). Test: 4,500 in-scope + 1,000 out-of-scope queries. Test in-scope accuracy (argmax) "
        "counts the model's top label; the energy detector's threshold is chosen on validation (in-scope accuracy "
        "drops at most 0.3 point) and a rejected in-scope query counts as wrong. Val in-scope: the best epoch's "
        "(the checkpoint kept, `load_best_model_at_end`). `train s` is the Trainer's `train_runtime` (with its "
        "per-epoch validation), `wall s` the whole `querytune train` command (for students: with the teacher's "
        "logits on the train split computed once before training).", "",
        "| run | tries | layers | alpha / T | epochs | params M | val in-scope % (epoch) | test in-scope % (argmax) | "
        "vs teacher | energy detector: in-scope % / OOS recall % | OOS AUROC % | train s | wall s | samples/s | "
        "load before / after |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for r in rows:
        gap = "–" if r["row"] == TEACHER or not teacher else (
            f"{100 * (r['test_argmax_in_scope'] - teacher['test_argmax_in_scope']):+.2f}")  # fmt: skip
        layers = "all 6" if r["layers"] is None else ", ".join(map(str, r["layers"]))
        mix = "–" if r["alpha"] is None else f"{r['alpha']:g} / {r['temperature']:g}"
        lines.append(
            f"| {r['row']} | {r['purpose']} | {layers} | {mix} | {r['epochs']:g} | {r['total_params'] / 1e6:.1f} | "
            f"{_pct(r['val_best'])} ({r['best_epoch']:g}) | {_pct(r['test_argmax_in_scope'])} | {gap} | "
            f"{_pct(r['test_energy_in_scope'])} / {_pct(r['test_energy_oos_recall'])} | {_pct(r['oos_auroc'])} | "
            f"{r['train_runtime_s']:.0f} | {r['wall_s']:.0f} | {r['samples_per_s']:.1f} | "
            f"{r['load_before']:.2f} / {r['load_after']:.2f}{' (forced)' if r.get('forced') else ''} |"
        )  # fmt: skip
    lines += ["", "Validation in-scope accuracy per epoch:", ""]
    lines += [f"- {r['row']}: " + ", ".join(f"{100 * v:.2f}" for _, v in r["val_per_epoch"]) for r in rows]
    lines += ["", "Commands (the teacher run is `runs/bench-distill/teacher`):", "", "```"]
    lines += [r["command"] for r in rows]
    lines += ["```", ""]
    if note:
        lines += [note.strip(), ""]
    out.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench-distill"))
    parser.add_argument("--out", default=str(RESULTS / "distillation.md"))
    parser.add_argument("--raw", default=str(RESULTS / "distillation.json"))
    parser.add_argument("--force", action="store_true", help="retrain rows that already finished")
    parser.add_argument("--force_load", action="store_true", help="start a row even when the machine is busy")
    parser.add_argument("--render", action="store_true", help="only rewrite the table from the saved figures")
    parser.add_argument("--list", action="store_true", help="print the rows and what each tries")
    parser.add_argument("--extra", default="", help="overrides added to every row, one string (a smoke run: "
                        "--extra='--max_steps 4 --max_eval_samples 200'); recorded in each row's command")  # fmt: skip
    parser.add_argument("--note", default="", help="a paragraph after the table (e.g. what ran beside a row); pass "
                        "it again with --render")  # fmt: skip
    args = parser.parse_args()
    if args.list:
        print("\n".join(f"{name}: {purpose}" for name, (_, _, purpose) in ROWS.items()))
        return
    from querytune.report import machine_description

    machine = machine_description()
    runs, raw_path = Path(args.runs), Path(args.raw)
    runs.mkdir(parents=True, exist_ok=True)
    raw: dict[str, dict[str, Any]] = json.loads(raw_path.read_text()) if raw_path.is_file() else {}
    from querytune.runs import MARKER

    todo = [] if args.render else [r for r in args.rows if r not in raw or args.force]
    if any(r != TEACHER for r in todo) and not (runs / TEACHER / MARKER).is_file() and TEACHER not in todo:
        todo.insert(0, TEACHER)  # the students need the teacher's run itself, not only its figures
    for name in sorted(todo, key=lambda n: n != TEACHER):
        raw[name] = run_row(name, runs, args.force_load, shlex.split(args.extra))
        raw_path.write_text(json.dumps(raw, indent=2, default=float))
        render(raw, Path(args.out), machine, args.note)
        print(f"{name}: {raw[name]['wall_s']:.0f} s, test in-scope {100 * raw[name]['test_argmax_in_scope']:.2f}",
              flush=True)  # fmt: skip
    render(raw, Path(args.out), machine, args.note)


if __name__ == "__main__":
    main()
