"""Time to accuracy on CLINC150: which training recipe reaches the target in-scope accuracy soonest on this machine.

    python benchmarks/clinc150_speed.py                                   # every recipe, one after another
    python benchmarks/clinc150_speed.py --recipes today grouped --force   # re-run some

Each recipe is `experiments/intent/clinc150-full.yaml` plus overrides (nothing is copied), trained through
`querytune.train.run` in its own process. A callback stops the clock at every epoch end, scores the test split
(in-scope accuracy, OOS recall), and starts the clock again, so the time to the target counts training only:
neither the per-epoch test scoring nor the validation / checkpointing that the experiment does.
The same script runs unchanged on a GPU (`--device_note` names it in the table).

Hygiene: the script refuses to start while the 1-minute load average is above 1.5 (unless --force_load), runs one
training at a time, and records the load average before and after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import check_load, cpu_slot, load_average  # noqa: E402

EXPERIMENT = REPO / "experiments/intent/clinc150-full.yaml"
# name -> (what it changes, overrides of the experiment file)
RECIPES: dict[str, tuple[str, list[str]]] = {
    "today": (
        "the experiment file as landed (b8c84ce): random batches, lr 1e-4, 10 epochs",
        ["--train_sampling_strategy", "random", "--learning_rate", "1e-4", "--num_train_epochs", "10"],
    ),
    "grouped": (
        "length-grouped batches",
        ["--train_sampling_strategy", "group_by_length", "--learning_rate", "1e-4", "--num_train_epochs", "10"],
    ),
    "grouped-lr2e-4-e5": (
        "length-grouped, lr 2e-4, 5 epochs",
        ["--train_sampling_strategy", "group_by_length", "--learning_rate", "2e-4", "--num_train_epochs", "5"],
    ),
    "grouped-lr2e-4-e6": (
        "length-grouped, lr 2e-4, 6 epochs",
        ["--train_sampling_strategy", "group_by_length", "--learning_rate", "2e-4", "--num_train_epochs", "6"],
    ),
    "grouped-lr2e-4-e5-ls": (
        "length-grouped, lr 2e-4, 5 epochs, label smoothing 0.1",
        [
            "--train_sampling_strategy",
            "group_by_length",
            "--learning_rate",
            "2e-4",
            "--num_train_epochs",
            "5",
            "--label_smoothing_factor",
            "0.1",
        ],
    ),
    "grouped-lr2e-4-e5-bf16": (
        "length-grouped, lr 2e-4, 5 epochs, bf16 autocast",
        [
            "--train_sampling_strategy",
            "group_by_length",
            "--learning_rate",
            "2e-4",
            "--num_train_epochs",
            "5",
            "--bf16",
            "true",
            "--use_cpu",
            "true",
        ],
    ),
    "grouped-lr2e-4-e5-compile": (
        "length-grouped, lr 2e-4, 5 epochs, torch.compile",
        [
            "--train_sampling_strategy",
            "group_by_length",
            "--learning_rate",
            "2e-4",
            "--num_train_epochs",
            "5",
            "--torch_compile",
            "true",
        ],
    ),
}
# GPU recipes (bf16 autocast, larger batches, the learning rate scaled with the batch); not in the CPU default set.
for batch, lr, epochs in ((32, "2e-4", 5), (128, "4e-4", 6), (256, "8e-4", 8), (64, "2e-4", 8), (128, "3e-4", 12)):
    RECIPES[f"gpu-bf16-b{batch}-lr{lr}-e{epochs}"] = (
        f"GPU: length-grouped, bf16, batch {batch}, lr {lr}, {epochs} epochs",
        ["--train_sampling_strategy", "group_by_length", "--learning_rate", lr, "--num_train_epochs", str(epochs),
         "--bf16", "true", "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", "512"],
    )  # fmt: skip


class TimeToAccuracy:
    """A TrainerCallback (built lazily so the parent process never imports transformers) that scores the test split
    at every epoch end with the clock stopped."""

    @staticmethod
    def build(task, test_dataset, collator, path: Path, batch_size: int = 256):
        import numpy as np
        import torch
        from transformers import TrainerCallback

        from querytune.metrics import load_metric

        class _Callback(TrainerCallback):
            def __init__(self) -> None:
                self.train_s = 0.0
                self.t0 = 0.0
                self.points: list[dict] = []
                self.wall0 = time.perf_counter()

            def on_epoch_begin(self, args, state, control, **kwargs):
                self.t0 = time.perf_counter()

            def on_epoch_end(self, args, state, control, model=None, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # CUDA kernels run ahead of the host: stop the clock when they finish
                self.train_s += time.perf_counter() - self.t0
                model.eval()
                order = np.argsort([len(x) for x in test_dataset["input_ids"]])
                preds = np.zeros(len(order), dtype=np.int64)
                with torch.inference_mode():
                    for start in range(0, len(order), batch_size):
                        idx = order[start : start + batch_size].tolist()
                        rows = [{k: test_dataset[i][k] for k in test_dataset.column_names if k != "labels"}
                                for i in idx]  # fmt: skip
                        batch = {k: v.to(model.device) for k, v in collator(rows).items()}
                        preds[idx] = model(**batch).logits.argmax(-1).cpu().numpy()
                model.train()
                scores = load_metric("classification").compute(
                    predictions=preds, references=test_dataset["labels"], oos_label_id=task.oos_id
                )
                self.points.append({"epoch": round(state.epoch, 3), "step": state.global_step,
                                    "train_s": round(self.train_s, 1),
                                    "wall_s": round(time.perf_counter() - self.wall0, 1),
                                    "test_in_scope_accuracy": scores["in_scope_accuracy"],
                                    "test_oos_recall": scores["oos_recall"]})  # fmt: skip
                path.write_text(json.dumps(self.points, indent=2))
                print(json.dumps(self.points[-1]), flush=True)

        return _Callback()


def train_row(name: str, run_dir: Path, data: str, extra: list[str]) -> None:
    """The child process: train one recipe with the time-to-accuracy callback."""
    from querytune.config import load_config
    from querytune.models import load_tokenizer
    from querytune.tasks import get_task
    from querytune.train import run

    overrides = ["--dataset_name", data, "--output_dir", str(run_dir), "--overwrite_output_dir", "true",
                 "--disable_tqdm", "true", *RECIPES[name][1], *extra]  # fmt: skip
    config = load_config(EXPERIMENT, overrides)
    task = get_task(config.data.task)(config)
    tokenizer = load_tokenizer(config.model.model_name_or_path)
    test = task.tokenize(task.load_data(), tokenizer)["test"]
    callback = TimeToAccuracy.build(task, test, task.collator(tokenizer), run_dir.with_suffix(".trajectory.json"))
    run(config, callbacks=[callback])


def time_to(points: list[dict], target: float) -> dict | None:
    return next((p for p in points if 100 * p["test_in_scope_accuracy"] >= target), None)


def write_table(args: argparse.Namespace, rows: list[dict]) -> None:
    from querytune.report import machine_description

    base = next((r for r in rows if r["recipe"] == "today"), None)
    base_hit = time_to(base["points"], args.ratio_target) if base else None
    lines = [
        "# CLINC150 time to accuracy (all-MiniLM-L6-v2, full fine-tuning)",
        "",
        f"Measured by `python benchmarks/clinc150_speed.py` on: {machine_description()}"
        f"{'; ' + args.device_note if args.device_note else ''}. The commit is the checkout when the table was last "
        "written; each row is saved when it finishes and reused by later invocations, and the commit each row was "
        "trained at is not saved with it.",
        "",
        f"Target: {args.target:.1f}% in-scope accuracy on the CLINC150 test split (4,500 in-scope queries). "
        "`train s to X` is training time only, up to the end of the first epoch that reached X "
        "(the clock stops while the callback scores the test split and while the Trainer validates and saves). "
        f"The ratio compares the time to {args.ratio_target:.1f}%, a level today's recipe reaches, with today's. "
        "`run wall s` is the whole run: data, every validation and checkpoint, final scoring and saving. Load is the "
        "1-minute load average before / after each row; one training ran at a time.",
        "",
        f"| recipe | changes | epochs | train samples/s | train s to {args.target:.1f} (epoch) | "
        f"train s to {args.ratio_target:.1f} (epoch) | speed-up to {args.ratio_target:.1f} vs today | "
        "final in-scope % | final OOS recall % | run wall s | load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        last = r["points"][-1] if r["points"] else {}
        cells = [r["recipe"], RECIPES[r["recipe"]][0], f"{r['epochs']:g}", f"{r['samples_per_s']:.1f}"]
        for target in (args.target, args.ratio_target):
            hit = time_to(r["points"], target)
            cells.append(f"{hit['train_s']:.0f} ({hit['epoch']:g})" if hit else "not reached")
        hit = time_to(r["points"], args.ratio_target)
        cells.append(f"{base_hit['train_s'] / hit['train_s']:.2f}x" if hit and base_hit else "–")
        cells += [f"{100 * last.get('test_in_scope_accuracy', 0):.2f}", f"{100 * last.get('test_oos_recall', 0):.1f}",
                  f"{r['wall_s']:.0f}", f"{r['load_before']:.2f} / {r['load_after']:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-epoch test in-scope accuracy (train s in brackets):", ""]
    for r in rows:
        curve = ", ".join(f"{p['epoch']:g}: {100 * p['test_in_scope_accuracy']:.2f} ({p['train_s']:.0f})"
                          for p in r["points"])  # fmt: skip
        lines.append(f"- {r['recipe']}: {curve}")
    if args.note:
        lines += ["", args.note]
    Path(args.out).write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/clinc150"))
    parser.add_argument("--recipes", nargs="+", default=[r for r in RECIPES if not r.startswith("gpu-")],
                        choices=list(RECIPES))  # fmt: skip
    parser.add_argument("--runs", default=str(REPO / "runs/bench-clinc150-speed"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/clinc150_speed.md"))
    parser.add_argument("--target", type=float, default=96.0, help="in-scope accuracy %% to reach")
    parser.add_argument("--ratio_target", type=float, default=95.5, help="the level the speed-up is measured at")
    parser.add_argument("--force", action="store_true", help="retrain recipes that already have a result")
    parser.add_argument("--force_load", action="store_true", help="start even when the machine is busy")
    parser.add_argument("--device_note", default="", help="e.g. 'one H200, bf16, batch 256'")
    parser.add_argument("--note", default="", help="a paragraph appended to the table")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags added to every recipe")
    parser.add_argument("--_row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    runs = Path(args.runs)
    if args._row:
        train_row(args._row, runs / args._row, args.data, args.extra)
        return
    runs.mkdir(parents=True, exist_ok=True)
    results = runs / "results.json"
    rows = {r["recipe"]: r for r in json.loads(results.read_text())} if results.is_file() else {}
    for name in args.recipes:
        if name in rows and not args.force:
            continue
        cmd = [sys.executable, __file__, "--_row", name, "--runs", str(runs), "--data", args.data]
        if args.extra:
            cmd += ["--extra", *args.extra]
        log = runs / f"{name}.log"
        with cpu_slot(), log.open("w") as fh:
            load_before = check_load(args.force_load)
            start = time.perf_counter()
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            wall = time.perf_counter() - start
            load_after = load_average()
        if proc.returncode != 0:
            raise SystemExit(f"recipe {name} failed (exit {proc.returncode}); see {log}")
        metrics = json.loads((runs / name / "all_results.json").read_text())
        points = json.loads((runs / f"{name}.trajectory.json").read_text())
        rows[name] = {"recipe": name, "points": points, "wall_s": wall, "load_before": load_before,
                      "load_after": load_after, "epochs": metrics.get("train_epoch", metrics.get("epoch", 0)),
                      "samples_per_s": metrics["train_step_samples_per_second"]}  # fmt: skip
        results.write_text(json.dumps(list(rows.values()), indent=2))
        write_table(args, [rows[n] for n in RECIPES if n in rows])  # after every row: a stopped run keeps its rows
        print(f"{name}: done in {wall:.0f} s", flush=True)
    write_table(args, [rows[n] for n in RECIPES if n in rows])


if __name__ == "__main__":
    main()
