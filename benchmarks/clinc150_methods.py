"""CLINC150 method comparison with all-MiniLM-L6-v2: every method, one table.

    python benchmarks/clinc150_methods.py                      # all methods, CPU schedule, offline data
    python benchmarks/clinc150_methods.py --methods full lora --epochs full=10 lora=20

Each method runs its experiment file `experiments/intent/clinc150-<method>.yaml` through `querytune.train` in a
subprocess (so peak memory is per run), pointed at the local copy of the data by override: the benchmark never
copies an experiment. Finished runs are reused unless --force, so an interrupted benchmark resumes.

In the same invocation it measures training throughput with dynamic padding (querytune's default) against the HF
example-script default of padding every query to 128 tokens, on identical steps of the same experiment.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from common import train  # noqa: E402

from querytune.report import machine_description, markdown_table, plot_runs, run_row  # noqa: E402
from querytune.runs import MARKER  # noqa: E402

METHODS = ["full", "lora", "adapter-houlsby", "adapter-pfeiffer", "ia3", "adalora", "prompt", "prefix", "freeze",
           "lora-r12"]  # fmt: skip
# Rows that are an experiment plus overrides. lora-r12: LoRA at the parameter budget of the Houlsby adapters
# (221k vs 226k adapter weights on MiniLM-L6), for the adapter comparison.
VARIANTS = {"lora-r12": ("lora", ["--lora_r", "12", "--lora_alpha", "24"])}
# Epochs that fit a 2-core CPU in about two hours. The experiment files hold the longer GPU schedules
# (full 10 epochs, PEFT methods 20), which this machine cannot afford for nine methods.
CPU_EPOCHS = {"full": 4, "freeze": 3, "lora": 6, "adalora": 5, "ia3": 5, "prefix": 3, "prompt": 3,
              "adapter-houlsby": 5, "adapter-pfeiffer": 5, "lora-r12": 6}  # fmt: skip


def padding_ratio(data: str, runs: Path, steps: int) -> dict[str, float]:
    """Train samples/s of dynamic padding vs padding to 128, same experiment, same number of steps."""
    exp = REPO / "experiments/intent/clinc150-full.yaml"
    short = ["--dataset_name", data, "--max_steps", str(steps), "--eval_strategy", "no", "--save_strategy", "no",
             "--load_best_model_at_end", "false", "--max_eval_samples", "200"]  # fmt: skip
    speeds = {}
    for name, extra in (("dynamic", []), ("pad128", ["--pad_to_max_length", "true", "--max_seq_length", "128"])):
        out = runs / f"throughput-{name}"
        train(exp, out, short + extra, runs / f"throughput-{name}.log")
        speeds[name] = json.loads((out / "all_results.json").read_text())["train_step_samples_per_second"]
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/clinc150"))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--epochs", nargs="*", default=[], help="method=epochs overrides of the CPU schedule")
    parser.add_argument("--runs", default=str(REPO / "runs/bench-clinc150"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/clinc150_methods.md"))
    parser.add_argument("--throughput_steps", type=int, default=30)
    parser.add_argument("--max_train_samples", type=int, default=None, help="smoke runs only")
    parser.add_argument("--force", action="store_true", help="retrain finished runs")
    parser.add_argument(
        "--no_epoch_eval",
        action="store_true",
        help="evaluate once at the end instead of every epoch (the last epoch's model is scored)",
    )
    args = parser.parse_args()

    epochs = dict(CPU_EPOCHS)
    for item in args.epochs:
        method, value = item.split("=")
        epochs[method] = float(value)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)

    saved = runs / "throughput.json"
    if args.throughput_steps:
        speeds = padding_ratio(args.data, runs, args.throughput_steps)
        saved.write_text(json.dumps({**speeds, "steps": args.throughput_steps}))
    else:  # keep the figure an earlier invocation measured
        speeds = json.loads(saved.read_text()) if saved.is_file() else {}
        args.throughput_steps = speeds.pop("steps", 0)
    if speeds:
        print(f"throughput: dynamic {speeds['dynamic']:.1f} samples/s, padded to 128 {speeds['pad128']:.1f}, "
              f"ratio {speeds['dynamic'] / speeds['pad128']:.2f}x", flush=True)  # fmt: skip

    rows = []
    for method in args.methods:
        out = runs / method
        if args.force or not (out / MARKER).is_file():
            experiment, extra = VARIANTS.get(method, (method, []))
            overrides = ["--dataset_name", args.data, "--num_train_epochs", str(epochs[method]), *extra]
            if args.max_train_samples:
                overrides += ["--max_train_samples", str(args.max_train_samples)]
            if args.no_epoch_eval:
                overrides += ["--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false"]
            exp_file = REPO / f"experiments/intent/clinc150-{experiment}.yaml"
            wall = train(exp_file, out, overrides, runs / f"{method}.log")
            print(f"{method}: {wall:.0f} s", flush=True)
        row = run_row(out)
        row["run"] = method
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_table(args, rows, speeds)  # after every method, so a cut-short benchmark still leaves its rows


def write_table(args: argparse.Namespace, rows: list[dict], speeds: dict[str, float]) -> None:
    lines = [
        "# CLINC150 method comparison (all-MiniLM-L6-v2)",
        "",
        f"Measured by `python benchmarks/clinc150_methods.py` on: {machine_description()}.",
        "",
        "Test split of CLINC150 ('plus': 150 intents + oos; 4,500 in-scope and 1,000 out-of-scope queries). "
        "Epochs follow the CPU schedule in the script, shorter than the experiment files' GPU schedules. "
        "Train samples/s counts optimizer steps only (evaluation excluded); peak MB is the process's peak "
        "resident memory on CPU or torch's peak allocation on GPU; model MB is the saved adapter or model.",
        "",
        markdown_table(rows),
        "",
        f"![comparison chart]({Path(args.out).with_suffix('.png').name})",
        "",
    ]
    if speeds:
        lines += [
            "Training throughput on the same experiment (full fine-tuning, batch 32, "
            f"{args.throughput_steps} steps): dynamic padding {speeds['dynamic']:.1f} samples/s, padding every "
            f"query to 128 tokens (the HF example-script default) {speeds['pad128']:.1f} samples/s: "
            f"**{speeds['dynamic'] / speeds['pad128']:.2f}x** faster.",
            "",
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    plot_runs(rows, Path(args.out).with_suffix(".png"), title="CLINC150, all-MiniLM-L6-v2 (test split)")


if __name__ == "__main__":
    main()
