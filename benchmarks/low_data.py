"""Small, skewed query sets: no augmentation vs each augmenter vs a combination, with and without the consistency
filter, against SetFit on the same samples; SNIPS slots and joint intent + slots at 1% and 5% of train; full data.

    python benchmarks/low_data.py                         # every row of the default plan, one at a time
    python benchmarks/low_data.py --rows clinc150-10pi-none-s1 clinc150-10pi-eda-s1
    python benchmarks/low_data.py --list                  # the row names
    python benchmarks/low_data.py --render                # rewrite the table from the saved figures

Rows, each trained alone in its own process under the machine-wide CPU lock (`common.train`), refusing to start
above a 1-minute load average of 1.5 (unless `--force_load`, noted in the row):

- `clinc150-{N}pi-{setting}-s{seed}`: `experiments/intent/clinc150-fewshot.yaml` (the low-data recipe) at N train
  queries per intent (`max_train_samples_per_label`; the out-of-scope label keeps N rows too), full validation and
  test, seed = sample and initialisation. Settings: `none`, `eda`, `paraphrase` (SmolLM2-135M-Instruct, offline),
  `eda+paraphrase`, and `...+filter`: the same with `augment_filter_run` = that size and seed's `none` run.
- `setfit-{N}pi-s{seed}`: SetFit (`pip install setfit`) on the very same train rows (loaded through querytune's
  own sampler), all-MiniLM-L6-v2 body, its default recipe but `num_iterations` (pairs per row; see SETFIT).
  In-scope accuracy is reported with an MSP out-of-scope threshold chosen on validation by the experiment's own
  rule (in_scope_drop, 0.3 point), as the querytune rows use their energy detector.
- `snips-{slots|joint}-{P}pct-{setting}-s{seed}`: the SNIPS files at P% of train (`max_train_samples`), settings
  `none`, `slot_swap`, `eda` (O words only); and `none_1000steps`
  (none at the step count slot_swap trains at 5%).
- `clinc150-full-{setting}`: CLINC150 with all train rows, the shipped `clinc150-full.yaml`, one seed.

The raw figures of every finished row are saved in `benchmarks/results/low_data.json` (with the commit, command
and load of each row), and the table `benchmarks/results/low_data.md` is rewritten after every row, so a stopped
run loses only the row it was in. Finished rows are skipped unless `--force`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import check_load, cpu_slot, load_average, train  # noqa: E402

DATA = REPO.parent / "shared" / "data"
EXP = REPO / "experiments"
RESULTS = REPO / "benchmarks" / "results"
RAW = RESULTS / "low_data.json"
SEEDS = (1, 2, 3)
SNIPS_TRAIN = 13084  # rows of SNIPS train: 1% = 131, 5% = 654
# CLINC150 settings: the augmenters' keys (per_example: EDA's paper uses 4-16 new rows per sentence on small sets;
# paraphrasing is the expensive one).
SETTINGS: dict[str, list[str]] = {
    "none": [],
    "eda": ["--augment", "eda", "--augment_per_example", "4"],
    "paraphrase": ["--augment", "paraphrase", "--augment_per_example", "2"],
    "eda+paraphrase": ["--augment", "eda", "paraphrase", "--augment_per_example", "2"],
}
SLOT_SETTINGS: dict[str, list[str]] = {
    "none": [],
    "slot_swap": ["--augment", "slot_swap", "--augment_per_example", "4"],
    "eda": ["--augment", "eda", "--augment_per_example", "4"],
    # the control for the schedule: at 5% the recipe counts epochs over the augmented set, so slot_swap trains
    # ~1,000 steps against none's 300 (the min_train_steps floor); this is none at slot_swap's step count (at 1%,
    # where every setting trains the floor, it tells whether the longer schedule would hurt a smaller set)
    "none_1000steps": ["--min_train_steps", "1000"],
}
# SetFit: its defaults (batch 16, 1 epoch, body lr 2e-5, logistic-regression head) but the pair count: with 151
# classes its default "oversampling" draws every negative pair (over a million at 10 per intent); the SetFit
# paper's num_iterations=20 pairs per row would take ~25 min per row here.
SETFIT = {"num_iterations": 5, "batch_size": 16, "num_epochs": 1}


def plan() -> dict[str, dict[str, Any]]:
    """Every row the script knows, by name, in the order the default run takes them: seed by seed, the target size
    (10 per intent) with SetFit and SNIPS at 1%, so that a stopped run has whole seeds of every target; then full
    data, 5 and 20 per intent, SNIPS at 5%."""
    rows: dict[str, dict[str, Any]] = {}

    def clinc(size: int, seed: int, settings: tuple[str, ...]) -> None:
        for setting in settings:
            rows[f"clinc150-{size}pi-{setting}-s{seed}"] = {"part": "clinc150", "size": size, "setting": setting,
                                                           "seed": seed}  # fmt: skip
        rows[f"setfit-{size}pi-s{seed}"] = {"part": "setfit", "size": size, "seed": seed}

    def snips(pct: int, seed: int) -> None:
        for task in ("slots", "joint"):
            for setting in SLOT_SETTINGS:
                rows[f"snips-{task}-{pct}pct-{setting}-s{seed}"] = {"part": "snips", "task": task, "pct": pct,
                                                                   "setting": setting, "seed": seed}  # fmt: skip

    for seed in SEEDS:
        clinc(10, seed, ("none", "eda", "paraphrase", "eda+paraphrase", "eda+filter", "eda+paraphrase+filter",
                         "paraphrase+filter"))  # fmt: skip
        snips(1, seed)
    for setting in ("none", "eda"):
        rows[f"clinc150-full-{setting}"] = {"part": "full", "setting": setting, "seed": 42}
    for size in (5, 20):
        for seed in SEEDS:
            clinc(size, seed, ("none", "eda", "eda+filter"))
    for seed in SEEDS:
        snips(5, seed)
    return rows


def overrides(name: str, row: dict[str, Any], runs: Path) -> tuple[Path, list[str]]:
    """The experiment file and the flags of one querytune row."""
    cache = ["--augment_cache_dir", str(runs / "augment_cache")]
    if row["part"] == "clinc150":
        setting = row["setting"].removesuffix("+filter")
        flags = ["--dataset_name", str(DATA / "clinc150"), "--max_train_samples_per_label", str(row["size"]),
                 "--seed", str(row["seed"]), *SETTINGS[setting], *cache]  # fmt: skip
        if row["setting"].endswith("+filter"):
            flags += ["--augment_filter_run", str(runs / f"clinc150-{row['size']}pi-none-s{row['seed']}")]
        return EXP / "intent" / "clinc150-fewshot.yaml", flags
    if row["part"] == "snips":
        exp = EXP / "slots" / ("snips-fewshot.yaml" if row["task"] == "slots" else "snips-joint-fewshot.yaml")
        rows = round(SNIPS_TRAIN * row["pct"] / 100)
        return exp, ["--dataset_name", str(DATA / "snips"), "--max_train_samples", str(rows), "--seed",
                     str(row["seed"]), *SLOT_SETTINGS[row["setting"]], *cache]  # fmt: skip
    if row["part"] == "full":
        return EXP / "intent" / "clinc150-full.yaml", ["--dataset_name", str(DATA / "clinc150"),
                                                       *SETTINGS[row["setting"]], *cache]  # fmt: skip
    raise ValueError(name)


def depends_on(name: str, row: dict[str, Any]) -> str | None:
    """The row whose run a filtered row uses as its filter."""
    if row["part"] == "clinc150" and row["setting"].endswith("+filter"):
        return f"clinc150-{row['size']}pi-none-s{row['seed']}"
    return None


# --- SetFit on querytune's own sample
def setfit_worker(size: int, seed: int, out: Path) -> None:
    """Train and score SetFit on the rows querytune's sampler keeps (run in its own process by `setfit_row`)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from querytune.config import load_config
    from querytune.models import resolve_model_path
    from querytune.tasks import get_task
    from querytune.tasks.shared import oos

    torch.set_num_threads(2)
    config = load_config(EXP / "intent" / "clinc150-fewshot.yaml",
                         ["--dataset_name", str(DATA / "clinc150"), "--max_train_samples_per_label", str(size),
                          "--seed", str(seed)])  # fmt: skip
    task = get_task("intent")(config)
    splits = task.load_data()
    text = config.data.text_column
    train = Dataset.from_dict({"text": splits["train"][text], "label": list(splits["train"]["labels"])})
    model = SetFitModel.from_pretrained(resolve_model_path(config.model.model_name_or_path))
    args = TrainingArguments(seed=seed, report_to="none", **SETFIT)
    trainer = Trainer(model=model, args=args, train_dataset=train)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    scores = {}
    for role in ("validation", "test"):
        proba = np.asarray(model.predict_proba(splits[role][text], as_numpy=True))
        # the head knows only the labels it saw: put its columns where querytune's label ids are
        full = np.full((len(proba), len(task.labels)), 1e-9)
        full[:, np.asarray(model.model_head.classes_, dtype=int)] = proba
        scores[role] = (np.log(full), np.asarray(splits[role]["labels"]))
    oos_id = task.oos_id
    det = oos.choose_threshold(*scores["validation"], "msp", oos_id, "in_scope_drop", 0.3, 0.95)
    task.oos = det
    metrics = {f"test_{k}": v for k, v in task.scored(*scores["test"]).items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "setfit_results.json").write_text(json.dumps(
        {**metrics, "train_runtime": train_s, "train_rows": len(train), "setfit": SETFIT}, default=float))  # fmt: skip


def setfit_row(name: str, row: dict[str, Any], runs: Path, force_load: bool) -> None:
    out = runs / name
    log = runs / f"{name}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with cpu_slot():
        before = check_load(force_load)
        start = time.perf_counter()
        with log.open("w") as fh:
            proc = subprocess.run([sys.executable, __file__, "--_setfit", str(row["size"]), str(row["seed"]), str(out)],
                                  stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)  # fmt: skip
        wall = time.perf_counter() - start
        after = load_average()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {log}")
    (out / "bench_row.json").write_text(json.dumps({"wall_s": wall, "load_before": before, "load_after": after,
                                                    "forced": force_load}))  # fmt: skip


# --- figures of a finished row
def figures(name: str, row: dict[str, Any], runs: Path, command: list[str]) -> dict[str, Any]:
    out = runs / name
    bench = json.loads((out / "bench_row.json").read_text())
    metrics_file = out / ("setfit_results.json" if row["part"] == "setfit" else "all_results.json")
    metrics = json.loads(metrics_file.read_text())
    keep = ("test_in_scope_accuracy", "test_argmax_in_scope_accuracy", "test_oos_recall", "test_accuracy",
            "test_f1", "test_slot_f1", "test_intent_accuracy", "test_exact_match", "train_runtime", "train_rows",
            "train_rows_original", "schedule_steps", "augment_generated", "augment_kept", "augment_dropped_duplicate",
            "augment_dropped_heldout", "augment_dropped_filter", "augment_seconds", "augment_model_calls",
            "augment_from_cache")  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()  # fmt: skip
    return {**row, **{k: metrics[k] for k in keep if k in metrics}, **bench, "commit": commit,
            "threads": int(os.environ.get("OMP_NUM_THREADS", "2")), "cpu": cpu_name(), "command": command,
            "finished": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip


# --- the table
def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}" + (f" ({len(values)})" if len(values) != len(SEEDS) else "")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _delta(rows: list[dict], base: list[dict], key: str) -> str:
    """Mean ± std over seeds of the paired difference (this setting - no augmentation, same sample), in points."""
    by_seed = {r["seed"]: r[key] for r in base if key in r}
    diffs = [r[key] - by_seed[r["seed"]] for r in rows if key in r and r["seed"] in by_seed]
    if not diffs or rows is base:
        return "–"
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{100 * statistics.mean(diffs):+.2f} ± {100 * std:.2f}"


def _means(rows: list[dict]):
    """A function: key -> the mean of that figure over the rows (0 where a row lacks it)."""
    return lambda key: statistics.mean(r.get(key, 0) for r in rows)


def render(raw: dict[str, dict[str, Any]], out: Path, note: str = "") -> None:
    def group(part: str, key) -> dict[Any, list[dict]]:
        groups: dict[Any, list[dict]] = {}
        for r in raw.values():
            if r["part"] == part:
                groups.setdefault(key(r), []).append(r)
        return groups

    commits = sorted({r["commit"] for r in raw.values()})
    cpus: dict[str, int] = {}
    for r in raw.values():
        cpus[r.get("cpu", cpu_name())] = cpus.get(r.get("cpu", cpu_name()), 0) + 1
    hosts = " and ".join(f"{cpu} ({n} row{'s' * (n != 1)})" if len(cpus) > 1 else cpu for cpu, n in cpus.items())
    for cpu in list(cpus)[1:]:  # name the rows of every CPU but the first
        hosts += f"; on {cpu}: " + ", ".join(n for n, r in raw.items() if r.get("cpu", cpu_name()) == cpu)
    loads = [r["load_before"] for r in raw.values()] + [r["load_after"] for r in raw.values()]
    forced = [n for n, r in raw.items() if r.get("forced")]
    lines = [
        "# Small query sets: augmentation and SetFit (all-MiniLM-L6-v2)",
        "",
        f"Measured by `python benchmarks/low_data.py` on {hosts} "
        f"({os.cpu_count()} cores, CPU only; seconds compare only between rows of one CPU), one row at a time; "
        f"querytune commit(s) {', '.join(commits)} (each row's CPU, commit, command and load are in "
        "`low_data.json`). Every figure is a mean ± standard deviation over seeds "
        f"{', '.join(map(str, SEEDS))} (a seed draws the sample and initialises the head); a count in brackets means "
        "fewer seeds have finished. 1-minute load average before / after the rows: "
        f"{min(loads):.2f}-{max(loads):.2f}"
        + (f"; started above 1.5 by --force_load: {', '.join(forced)}" if forced else "")
        + ".",  # fmt: skip
        "",
        "## CLINC150 at N queries per intent (test: 4,500 in-scope + 1,000 out-of-scope queries)",
        "",
        "`experiments/intent/clinc150-fewshot.yaml`: the low-data recipe (at least `min_train_steps` optimizer steps)."
        " In-scope accuracy counts a query the energy detector rejects as wrong; its threshold is chosen on the full "
        "validation split. `filter`: an augmented row is kept only if the same size and seed's `none` run predicts "
        "its label. `kept` is the mean number of new rows; `aug s` the time to make and filter them (cold cache for "
        "the first seed, partly cached after); `train s` the Trainer's loop.",
        "",
        "| N | setting | in-scope acc % | Δ vs none (paired) | argmax in-scope % | OOS recall % | train rows | kept | "
        "dropped dup / filter | steps | aug s | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(SETTINGS) + [f"{s}+filter" for s in SETTINGS if s != "none"] + ["setfit"]
    groups = group("clinc150", lambda r: (r["size"], r["setting"]))
    for key, rows in group("setfit", lambda r: (r["size"], "setfit")).items():
        groups[key] = rows
    for size in (5, 10, 20):
        for setting in order:
            rows = groups.get((size, setting))
            if not rows:
                continue
            mean = _means(rows)
            lines.append(
                f"| {size} | {'SetFit' if setting == 'setfit' else setting} | "
                f"{_mean_std([r['test_in_scope_accuracy'] for r in rows])} | "
                f"{_delta(rows, groups.get((size, 'none'), []), 'test_in_scope_accuracy')} | "
                f"{_mean_std([r['test_argmax_in_scope_accuracy'] for r in rows if 'test_argmax_in_scope_accuracy' in r])}"
                f" | {_mean_std([r['test_oos_recall'] for r in rows])} | {mean('train_rows'):.0f} | "
                f"{mean('augment_kept'):.0f} | {mean('augment_dropped_duplicate'):.0f} / "
                f"{mean('augment_dropped_filter'):.0f} | {mean('schedule_steps'):.0f} | {mean('augment_seconds'):.0f} | "
                f"{mean('train_runtime'):.0f} |"
            )
    lines += ["", "## SNIPS slots and joint intent + slots at P% of train (test: 700 queries)", "",
              "`experiments/slots/snips-fewshot.yaml` / `snips-joint-fewshot.yaml` with `max_train_samples` "
              f"(1% = {round(SNIPS_TRAIN / 100)}, 5% = {round(SNIPS_TRAIN / 20)} rows). `eda` edits only O words.",
              "", "| task | P | setting | slot F1 % | Δ slot F1 vs none (paired) | Δ vs none at ~equal steps | intent acc % | "
              "exact match % | train rows | kept | steps | aug s | train s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    groups = group("snips", lambda r: (r["task"], r["pct"], r["setting"]))
    for r in (r for rows in groups.values() for r in rows):
        r.setdefault("slot_f1", r.get("test_f1", r.get("test_slot_f1")))
    for task in ("slots", "joint"):
        for pct in (1, 5):
            for setting in SLOT_SETTINGS:
                rows = groups.get((task, pct, setting))
                if not rows:
                    continue
                f1 = [r["slot_f1"] for r in rows]
                intent = [r["test_intent_accuracy"] for r in rows if "test_intent_accuracy" in r]
                exact = [r["test_exact_match"] for r in rows if "test_exact_match" in r]
                mean = _means(rows)
                delta = _delta(rows, groups.get((task, pct, "none"), []), "slot_f1")
                # the no-augmentation rows whose step count is nearest this setting's (an augmented set's epochs
                # may train more steps than the recipe's floor)
                bases = [b for b in (groups.get((task, pct, n)) for n in ("none", "none_1000steps")) if b]
                matched = min(
                    bases, key=lambda b: abs(_means(b)("schedule_steps") - mean("schedule_steps")), default=[]
                )
                fair = "–" if setting.startswith("none") else _delta(rows, matched, "slot_f1")
                lines.append(f"| {task} | {pct} | {setting} | {_mean_std(f1)} | {delta} | {fair} | {_mean_std(intent)} | "
                             f"{_mean_std(exact)} | {mean('train_rows'):.0f} | {mean('augment_kept'):.0f} | "
                             f"{mean('schedule_steps'):.0f} | {mean('augment_seconds'):.0f} | "
                             f"{mean('train_runtime'):.0f} |")  # fmt: skip
    full = group("full", lambda r: r["setting"])
    if full:
        lines += ["", "## CLINC150, all train rows (one seed)", "",
                  "| setting | in-scope acc % | OOS recall % | train rows | steps | aug s | train s |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for setting, rows in full.items():
            r = rows[0]
            lines.append(f"| {setting} | {100 * r['test_in_scope_accuracy']:.2f} | {100 * r['test_oos_recall']:.2f} | "
                         f"{r.get('train_rows', 0)} | {r.get('schedule_steps', 0)} | {r.get('augment_seconds', 0):.0f} |"
                         f" {r['train_runtime']:.0f} |")  # fmt: skip
    if note:
        lines += ["", note]
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rows = plan()
    parser.add_argument("--rows", nargs="+", default=list(rows), choices=list(rows), metavar="ROW")
    parser.add_argument("--list", action="store_true", help="print the row names and exit")
    parser.add_argument("--runs", default=str(REPO / "runs" / "low_data"))
    parser.add_argument("--out", default=str(RESULTS / "low_data.md"))
    parser.add_argument("--raw", default=str(RAW), help="the saved figures of every finished row")
    parser.add_argument("--force", action="store_true", help="train rows that already finished again")
    parser.add_argument("--force_load", action="store_true", help="start a row even when the machine is busy")
    parser.add_argument("--render", action="store_true", help="rewrite the table from --raw and exit")
    parser.add_argument("--note", default="", help="a paragraph appended to the table")
    parser.add_argument("--_setfit", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._setfit:
        setfit_worker(int(args._setfit[0]), int(args._setfit[1]), Path(args._setfit[2]))
        return
    if args.list:
        print("\n".join(rows))
        return
    raw_file = Path(args.raw)
    raw: dict[str, dict] = json.loads(raw_file.read_text()) if raw_file.is_file() else {}
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    for name in [] if args.render else args.rows:
        if name in raw and not args.force:
            continue
        row = rows[name]
        needed = depends_on(name, row)
        if needed and needed not in raw:
            print(f"{name}: skipped, its filter run {needed} has not finished", flush=True)
            continue
        start = time.time()
        if row["part"] == "setfit":
            setfit_row(name, row, runs, args.force_load)
            command = ["python", "benchmarks/low_data.py", "--rows", name]
        else:
            exp, flags = overrides(name, row, runs)
            train(exp, runs / name, flags, runs / f"{name}.log", args.force_load or None)
            command = ["querytune", "train", str(exp.relative_to(REPO)), *flags]
        raw[name] = figures(name, row, runs, command)
        raw_file.write_text(json.dumps(raw, indent=1, default=float) + "\n")
        render(raw, Path(args.out), args.note)
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
    render(raw, Path(args.out), args.note)


if __name__ == "__main__":
    main()
