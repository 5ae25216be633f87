"""Home Depot product search on ALL test queries against the whole catalogue: BM25, zero-shot MiniLM, today's
bi-encoder and cross-encoder, the new bi-encoder (mined negatives, distillation from the cross-encoder), hybrid
(BM25 + dense, fusion chosen on validation) and hybrid + cross-encoder rerank; with their targets.

    python benchmarks/homedepot_search.py                          # the full benchmark (hours on 2 CPU cores)
    python benchmarks/homedepot_search.py --smoke                  # a few queries, a 2,000-product catalogue
    python benchmarks/homedepot_search.py --rows bm25 zeroshot     # only some rows (the others are kept if done)

Queries are split by the seeded md5 rule of `querytune/tasks/ranking/data.py` (seed 0: 10% test, 10% validation,
80% train). Training uses every train query; evaluation every test query against all 54,667 products; the hybrid
fusion is chosen on the validation queries only. Fine-tuned rows run their experiment file
(`experiments/relevance/homedepot-*.yaml`) through `querytune.train` in a subprocess, pointed at the data by
override; hybrid + rerank runs `querytune eval` on the cross-encoder run with `--rerank_first_stage hybrid
--rerank_retrieval_run` the distilled bi-encoder run. Every row is saved as it finishes (rows/NAME.json in
--runs) and reused by the next invocation (finished runs too) unless --force NAME; the table is rewritten after every
row with the 1-minute load average before and after it and its CPU time (user + system, this process and its
children).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from common import train, uncommitted_note  # noqa: E402

from querytune.config import load_config  # noqa: E402
from querytune.runs import MARKER  # noqa: E402

METRICS = ["ndcg@10", "ndcg@5", "mrr@10", "map", "recall@10", "recall@100"]
EXP = REPO / "experiments/relevance"
# name -> (system, how it is computed, what it needs)
ROWS: dict[str, dict] = {  # fmt: skip
    "bm25": {"system": "BM25 (bm25s, stemmed, stop words)", "kind": "baseline", "mode": "bm25"},
    "zeroshot": {"system": "all-MiniLM-L6-v2 zero-shot, dense (cosine)", "kind": "baseline", "mode": "dense"},
    "zeroshot-hybrid": {"system": "zero-shot MiniLM + BM25, hybrid (fusion chosen on validation)", "kind": "baseline",
                        "mode": "hybrid"},  # fmt: skip
    "cross-encoder": {"system": "cross-encoder reranks BM25 top 100 (today: graded BCE, 8 mixed negatives/query)",
                      "kind": "train", "experiment": "homedepot-rerank-full.yaml", "task": "rerank"},  # fmt: skip
    "bi-encoder": {"system": "bi-encoder, dense (today: in-batch + 1 judged hard negative)", "kind": "train",
                   "experiment": "homedepot-retrieval-full.yaml", "task": "retrieval"},  # fmt: skip
    "bi-encoder-mined": {"system": "bi-encoder, dense (new: + 4 unjudged BM25-mined negatives/query)", "kind": "train",
                         "experiment": "homedepot-retrieval-mined.yaml", "task": "retrieval", "part": "dense_"},  # fmt: skip
    "bi-encoder-distilled": {"system": "bi-encoder, dense (new: 2 BM25 + 2 self-mined negatives/query, re-mined "
                             "every epoch; + Margin-MSE from the cross-encoder)", "kind": "train",
                             "experiment": "homedepot-retrieval-distill.yaml", "task": "retrieval",
                             "part": "dense_", "needs": ["cross-encoder"]},  # fmt: skip
    "hybrid-mined": {"system": "hybrid: BM25 + the mined bi-encoder (fusion chosen on validation)", "kind": "derived",
                     "from": "bi-encoder-mined"},  # fmt: skip
    "hybrid": {"system": "hybrid: BM25 + the distilled bi-encoder (fusion chosen on validation)", "kind": "derived",
               "from": "bi-encoder-distilled"},  # fmt: skip
    "hybrid-rerank": {"system": "hybrid top 100 -> cross-encoder rerank", "kind": "eval",
                      "needs": ["cross-encoder", "bi-encoder-distilled"]},  # fmt: skip
    "hybrid-rerank-fused": {"system": "hybrid top 100 -> cross-encoder, its scores fused with the hybrid's "
                            "(rerank_interpolation: fusion chosen on validation)", "kind": "eval", "interpolate": True,
                            "needs": ["cross-encoder", "bi-encoder-distilled"]},  # fmt: skip
}  # fmt: skip
TARGETS = [  # (row, metric, target or another row, what the target says)
    ("bi-encoder-distilled", "ndcg@10", "bm25", "fine-tuned bi-encoder alone >= BM25 on the same queries"),
    ("hybrid", "ndcg@10", 0.40, "hybrid nDCG@10 >= 0.40"),
    ("hybrid", "recall@100", 0.85, "hybrid R@100 >= 0.85"),
    ("hybrid-rerank", "ndcg@10", 0.45, "hybrid + cross-encoder rerank nDCG@10 >= 0.45"),
    ("hybrid-rerank-fused", "ndcg@10", 0.45, "hybrid + cross-encoder rerank nDCG@10 >= 0.45 (scores fused)"),
]


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def data_overrides(args: argparse.Namespace) -> list[str]:
    out = ["--dataset_name", args.data, "--catalogue_cache_dir", str(Path(args.runs) / "cache")]
    if args.train_queries:
        out += ["--max_train_queries", str(args.train_queries)]
    if args.test_queries:
        out += ["--max_eval_queries", str(args.test_queries)]
    if args.catalogue_file:
        out += ["--catalogue_file", args.catalogue_file]
    return out


def sampled_catalogue(args: argparse.Namespace) -> None:
    """--catalogue_sample N (smoke tests only): every judged product of the sampled queries plus seeded random others,
    written outside the repository (the Home Depot data must not be copied into it)."""
    if not args.catalogue_sample:
        return
    from querytune.tasks.ranking.data import load_ranking_data

    config = load_config(EXP / "homedepot-retrieval-full.yaml", data_overrides(args))
    data = load_ranking_data(config.data, config.task_args, config.training.seed)
    judged = {d for ds in data.splits.values() for d in ds["doc_id"]}
    others = sorted(set(data.catalogue) - judged)
    keep = judged | set(random.Random(0).sample(others, max(0, args.catalogue_sample - len(judged))))
    path = Path(args.runs) / f"catalogue-{len(keep)}.jsonl"
    path.write_text("".join(json.dumps({"product_uid": d, "product_title": t}) + "\n"
                            for d, t in data.catalogue.items() if d in keep))  # fmt: skip
    args.catalogue_file = str(path)


def baseline(args: argparse.Namespace, name: str, out_dir: Path) -> dict:
    """BM25, zero-shot MiniLM, or both fused (the fusion chosen on the validation queries), in this process."""
    from transformers import AutoModel

    from querytune.models import load_tokenizer, resolve_model_path
    from querytune.tasks.ranking.retrieval import RetrievalTask

    config = load_config(EXP / "homedepot-retrieval-full.yaml", data_overrides(args))
    config.task_args.retrieval_mode = ROWS[name]["mode"]
    task = RetrievalTask(config)
    task.load_data()
    model = tokenizer = None
    if ROWS[name]["mode"] != "bm25":
        path = resolve_model_path(config.model.model_name_or_path)
        model, tokenizer = AutoModel.from_pretrained(path), load_tokenizer(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = task.catalogue_metrics(model, tokenizer, task.data.splits["test"], out_dir, "test")
    row = {m: metrics.get(m) for m in [*METRICS, "num_queries", "num_queries_no_relevant"]}
    if task.fusion is not None:
        row["fusion"] = describe_fusion(task.fusion)
    return row


def describe_fusion(record: dict, names: tuple[str, ...] = ("bm25", "dense")) -> str:
    params = record["params"]
    setting = f"k={params['k']}" if "k" in params else f"weights {names[0]} {params['weights'][0]:.2f} / " \
                                                         f"{names[1]} {params['weights'][1]:.2f}"  # fmt: skip
    return f"{record['fusion']} ({setting}; validation nDCG@10 {record['validation_ndcg@10']:.3f})"


def run_dir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.runs) / name


def fine_tuned(args: argparse.Namespace, name: str) -> dict:
    spec = ROWS[name]
    out = run_dir(args, name)
    if name in args.force or not (out / MARKER).is_file():
        epochs = args.rerank_epochs if spec["task"] == "rerank" else args.epochs
        overrides = data_overrides(args) + ["--num_train_epochs", str(epochs), "--eval_strategy", "no",
                                            "--save_strategy", "no", "--load_best_model_at_end", "false",
                                            "--logging_steps", "50", "--report_to", "none"]  # fmt: skip
        if args.max_steps:
            overrides += ["--max_steps", str(args.max_steps)]
        if "cross-encoder" in spec.get("needs", []):
            overrides += ["--retrieval_teacher", str(run_dir(args, "cross-encoder"))]
        train(EXP / spec["experiment"], out, overrides, Path(args.runs) / f"{name}.log")
    metrics = json.loads((out / "all_results.json").read_text())
    part = spec.get("part", "")
    row = {m: metrics.get(f"test_{part}{m}") for m in METRICS}
    row |= {"num_queries": metrics.get("test_num_queries"), "train_runtime_s": metrics.get("train_runtime")}
    return row


def derived(args: argparse.Namespace, name: str) -> dict:
    """The hybrid metrics a hybrid-mode bi-encoder run computed at the end of its training."""
    out = run_dir(args, ROWS[name]["from"])
    metrics = json.loads((out / "all_results.json").read_text())
    row = {m: metrics.get(f"test_{m}") for m in METRICS} | {"num_queries": metrics.get("test_num_queries")}
    row["fusion"] = describe_fusion(json.loads((out / "retrieval_fusion.json").read_text()))
    return row


def hybrid_rerank(args: argparse.Namespace, name: str) -> dict:
    """`querytune eval` of the cross-encoder over the hybrid top 100 of the distilled bi-encoder, all test queries
    (with `rerank_interpolation`, the fusion with the hybrid scores is chosen on the validation queries first)."""
    rerank, retrieval = run_dir(args, "cross-encoder"), run_dir(args, "bi-encoder-distilled")
    cmd = [sys.executable, "-m", "querytune", "eval", str(rerank), "--split", "test", "--rerank_first_stage", "hybrid",
           "--rerank_retrieval_run", str(retrieval), *data_overrides(args)[:2]]  # fmt: skip
    if ROWS[name].get("interpolate"):
        cmd += ["--rerank_interpolation", "true"]
    if args.test_queries:
        cmd += ["--max_eval_queries", str(args.test_queries)]
    if args.catalogue_file:
        cmd += ["--catalogue_file", args.catalogue_file]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = Path(args.runs) / f"{name}.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, env=env, cwd=REPO, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"querytune eval failed (exit {proc.returncode}); see {log}")
    metrics = json.loads(proc.stdout)
    row = {m: metrics.get(m) for m in METRICS} | {"num_queries": metrics.get("num_queries")}
    row["first stage nDCG@10"] = metrics.get("first_stage_ndcg@10")
    if ROWS[name].get("interpolate"):
        evals = rerank / "evals" / f"{Path(args.data).name}-test"  # where `querytune eval` writes
        fusion = json.loads((evals / "rerank_interpolation.json").read_text())
        row["fusion"] = describe_fusion(fusion, fusion["runs"]) + (
            f"; cross-encoder alone nDCG@10 {metrics['cross_encoder_ndcg@10']:.3f}"
        )
    return row


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def targets(rows: dict[str, dict]) -> list[str]:
    lines = []
    for name, metric, target, text in TARGETS:
        got = rows.get(name, {}).get(metric)
        goal = rows.get(target, {}).get(metric) if isinstance(target, str) else target
        if got is None or goal is None:
            lines.append(f"- {text}: not measured yet.")
            continue
        where = f" ({target} {goal:.3f})" if isinstance(target, str) else ""
        verdict = "met" if got >= goal else f"**missed by {goal - got:.3f}**"
        lines.append(f"- {text}: {ROWS[name]['system']} {metric} {got:.3f}{where}: {verdict}.")
    return lines


def write_table(args: argparse.Namespace, rows: dict[str, dict], header: dict) -> None:
    head = ["row", "system", "nDCG@10", "nDCG@5", "MRR@10", "MAP", "R@10", "R@100", "test queries", "CPU s",
            "wall s", "load before / after", "notes"]  # fmt: skip
    shown = [n for n in ROWS if n in rows]
    reused = [n for n in shown if n in header.get("reused", ())]
    made_by = (
        ""
        if not reused
        else " Every row was made by an earlier invocation"
        if reused == shown
        else f" Rows {', '.join(reused)} were made by earlier invocations"
    )
    if made_by:  # the saved rows do not record their command and commit: the notes name them
        made_by += ", each at its own commit; the notes below give each row's command and commit."
    lines = [
        "# Home Depot product search: all test queries, whole catalogue (all-MiniLM-L6-v2)",
        "",
        f"Measured by `python benchmarks/homedepot_search.py {' '.join(sys.argv[1:])}` on {header['machine']}"
        f"{header['commit']}. {header['sizes']}{made_by}",
        "",
        "nDCG uses graded gain `relevance - 1` (unjudged products: 0); MRR, MAP and recall count `relevance >= 2.5` "
        "as relevant (queries without such a product are left out of them). **The judgement pool came from a "
        "lexical engine**: unjudged products that a dense model finds count as irrelevant although many are not, "
        "so these figures favour BM25 and understate the dense and hybrid rows. Cross-encoders rerank the top 100 of "
        "their first stage, so their R@100 is the first stage's. The hybrid fusion (method and weight) was chosen "
        "on the validation queries only. CPU s: user + system time of the row (training, encoding the catalogue, "
        "evaluation), from which wall time follows on a quiet machine; load average: 1-minute, before / after the "
        "row (2 cores: above 2 means another job shared them).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, spec in ROWS.items():
        r = rows.get(name)
        if r is None:
            continue
        results = run_dir(args, name) / "all_results.json"
        trained = json.loads(results.read_text()).get("train_epoch") if spec["kind"] == "train" and \
            results.is_file() else None  # fmt: skip
        notes = "; ".join(x for x in (f"{trained:.2f} epoch(s) trained" if trained else None, r.get("fusion"),
                                       r.get("note"),
                                       f"first stage nDCG@10 {r['first stage nDCG@10']:.3f}"
                                       if r.get("first stage nDCG@10") is not None else None) if x)  # fmt: skip
        cells = [name, spec["system"], *[_fmt(r.get(m)) for m in METRICS], str(r.get("num_queries", "–")),
                 _fmt(r.get("cpu_s"), 0), _fmt(r.get("wall_s"), 0),
                 f"{r['load_before']:.1f} / {r['load_after']:.1f}" if "load_before" in r else "–", notes or "–"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "**Targets**", "", *targets(rows), ""]
    if args.note and Path(args.note).is_file():  # how the rows were made and what they say (kept under benchmarks/)
        lines += [Path(args.note).read_text().strip(), ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/homedepot"))
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--epochs", type=float, default=1.0, help="bi-encoder epochs")
    parser.add_argument("--rerank_epochs", type=float, default=1.0, help="cross-encoder epochs")
    parser.add_argument("--runs", default=str(REPO / "runs/bench-homedepot-search"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/homedepot_search.md"))
    parser.add_argument("--note", default=str(REPO / "benchmarks/notes/homedepot_search.md"),
                        help="a markdown file appended to the table (if it exists)")  # fmt: skip
    parser.add_argument("--force", nargs="*", default=[], help="rows to recompute (their runs are retrained)")
    parser.add_argument("--smoke", action="store_true",
                        help="a smoke test: 40 train / 12 test queries, 2,000 products, 8 steps per training")  # fmt: skip
    parser.add_argument("--train_queries", type=int, default=None, help="(smoke) seeded sample of train queries")
    parser.add_argument("--test_queries", type=int, default=None, help="(smoke) sample of test / validation queries")
    parser.add_argument("--catalogue_sample", type=int, default=0, help="(smoke) products searched; 0: all")
    parser.add_argument("--max_steps", type=int, default=0, help="(smoke) training steps instead of epochs")
    args = parser.parse_args()
    if args.smoke:
        args.train_queries = args.train_queries or 40
        args.test_queries = args.test_queries or 12
        args.catalogue_sample = args.catalogue_sample or 2000
        args.max_steps = args.max_steps or 8
        if args.out == parser.get_default("out"):
            args.out = str(Path(args.runs) / "homedepot_search_smoke.md")
        if args.note == parser.get_default("note"):
            args.note = ""  # the note describes the real rows
    args.catalogue_file = None
    runs = Path(args.runs)
    (runs / "rows").mkdir(parents=True, exist_ok=True)
    sampled_catalogue(args)

    from querytune.report import machine_description

    smoke = any((args.train_queries, args.test_queries, args.catalogue_sample, args.max_steps))
    sizes = ("**Smoke test, not a result**: " if smoke else "") + (
        f"train queries: {args.train_queries or 'all'}; test and validation queries: {args.test_queries or 'all'}; "
        f"catalogue: {args.catalogue_sample or 'all 54,667'} products; training: "
        + (f"{args.max_steps} steps" if args.max_steps else
           f"{args.epochs:g} epoch(s) bi-encoders, {args.rerank_epochs:g} cross-encoder (this invocation's rows; "
           "the notes say what each trained row ran)")
        + ".")  # fmt: skip
    header = {"machine": machine_description(), "commit": uncommitted_note(), "sizes": sizes}
    rows: dict[str, dict] = {}
    for name in ROWS:
        saved = runs / "rows" / f"{name}.json"
        if saved.is_file() and name not in args.force:
            rows[name] = json.loads(saved.read_text())
    header["reused"] = list(rows)
    write_table(args, rows, header)
    for name in args.rows:
        if name in rows:
            continue
        missing = [n for n in ROWS[name].get("needs", []) if not (run_dir(args, n) / MARKER).is_file()]
        if ROWS[name]["kind"] == "derived" and not (run_dir(args, ROWS[name]["from"]) / MARKER).is_file():
            missing.append(ROWS[name]["from"])
        if missing:
            print(f"{name}: skipped, needs {missing} first", flush=True)
            continue
        load, cpu, start = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
        kind = ROWS[name]["kind"]
        try:
            if kind == "baseline":
                row = baseline(args, name, runs / name)
            elif kind == "train":
                row = fine_tuned(args, name)
            elif kind == "derived":
                row = derived(args, name)
                row["note"] = f"computed inside the {ROWS[name]['from']} run (its CPU time)"
            else:
                row = hybrid_rerank(args, name)
        except RuntimeError as err:  # one failed row must not lose the others
            print(f"{name} failed: {err}", flush=True)
            continue
        row |= {"cpu_s": cpu_seconds() - cpu, "wall_s": time.perf_counter() - start, "load_before": load,
                "load_after": os.getloadavg()[0]}  # fmt: skip
        if kind == "derived":
            row["cpu_s"] = row["wall_s"] = None
        (runs / "rows" / f"{name}.json").write_text(json.dumps(row, indent=1))
        rows[name] = row
        write_table(args, rows, header)
        print(f"{name}: {json.dumps(row)}", flush=True)


if __name__ == "__main__":
    main()
