"""Home Depot query–product relevance with all-MiniLM-L6-v2: BM25, zero-shot bi-encoder, fine-tuned bi-encoders
(retrieval) and cross-encoders (rerank of the BM25 top 100), one table on the same held-out queries.

    python benchmarks/homedepot_relevance.py                                   # CPU budget, offline data
    python benchmarks/homedepot_relevance.py --rerank full lora ia3 --retrieval full lora --train_queries 1500
    python benchmarks/homedepot_relevance.py --rerank full:regression:0 full:listwise:8 full  # objective ablation

Two catalogues, on the same test queries. The cross-encoders rerank the BM25 top 100 of the **whole** catalogue
(all 54,667 products of the file), next to BM25 on it. The bi-encoders (and the zero-shot one) search the whole
catalogue too, or with `--retrieval_catalogue N` a seeded sample of N products that holds every judged product of
the test queries plus random others, next to BM25 on that same sample. A `--rerank` entry is a method, or
`method:objective:negatives` to override the experiment file's `rerank_objective` and `rerank_negatives`. Fine-tuned
rows
run their experiment file `experiments/relevance/homedepot-<task>-<method>.yaml` through `querytune.train` in a
subprocess, pointed at ../shared/data/homedepot and the subsample by override: the benchmark never copies an
experiment. Finished runs and baseline results are reused unless --force, so an interrupted benchmark resumes;
the table is rewritten after every row.
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
from querytune.runs import MARKER, read_run  # noqa: E402
from querytune.tasks.ranking.data import first_query_texts, load_ranking_data, qrels  # noqa: E402

RERANK = ["full", "lora", "ia3", "adapter", "freeze", "adalora", "prompt", "prefix"]
RETRIEVAL = ["full", "lora"]
# Learning rates for one short epoch on CPU; the experiment files hold longer schedules.
CPU_LR = {("rerank", "full"): 5e-5, ("rerank", "lora"): 1e-3, ("rerank", "freeze"): 2e-4, ("rerank", "ia3"): 5e-3,
          ("rerank", "adapter"): 1e-3, ("rerank", "adalora"): 2e-3, ("rerank", "prompt"): 3e-2,
          ("rerank", "prefix"): 1e-2, ("retrieval", "full"): 2e-5, ("retrieval", "lora"): 5e-4}  # fmt: skip
METRICS = ["ndcg@10", "ndcg@5", "mrr@10", "map", "recall@10", "recall@100"]


def shared_overrides(args: argparse.Namespace) -> list[str]:
    return ["--dataset_name", args.data, "--max_train_queries", str(args.train_queries), "--max_eval_queries",
            str(args.test_queries), "--catalogue_cache_dir", str(Path(args.runs) / "cache")]  # fmt: skip


def sampled_catalogue(args: argparse.Namespace, data) -> tuple[dict[str, str], str | None]:
    """The retrieval catalogue: every judged product of the test sample plus seeded random others, written as
    jsonl outside the repository (the Home Depot data must not be copied into it); the whole catalogue for 0."""
    import random

    if not args.retrieval_catalogue or args.retrieval_catalogue >= len(data.catalogue):
        return data.catalogue, None
    judged = set(data.splits["test"]["doc_id"])
    others = sorted(set(data.catalogue) - judged)
    keep = judged | set(random.Random(0).sample(others, max(0, args.retrieval_catalogue - len(judged))))
    catalogue = {d: t for d, t in data.catalogue.items() if d in keep}
    path = Path(args.cache_dir).expanduser() / f"homedepot-catalogue-{len(catalogue)}-test{args.test_queries}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"product_uid": d, "product_title": t}) + "\n" for d, t in catalogue.items()))
    return catalogue, str(path)


def baselines(args: argparse.Namespace, data, config, catalogue: dict[str, str]) -> list[dict]:
    """BM25 on both catalogues and zero-shot MiniLM on the retrieval one, on exactly the test queries the
    fine-tuned runs see (same config, same seed)."""
    import numpy as np

    from querytune.tasks.ranking.bm25 import BM25Index
    from querytune.tasks.ranking.common import ranking_metrics
    from querytune.tasks.ranking.retrieval import RetrievalTask

    test, train_split = data.splits["test"], data.splits["train"]
    # The regression reference depends on the train sample: always recomputed (it is cheap).
    mean = float(np.mean(train_split["label"]))
    rmse = float(np.sqrt(np.mean((np.asarray(test["label"]) - mean) ** 2)))
    mean_row = {"system": f"train-mean predictor ({mean:.3f})", "task": "regression", "method": "–", "rmse": rmse,
                "catalogue": "–"}  # fmt: skip
    saved = Path(args.runs) / f"baselines-test{args.test_queries}-cat{len(catalogue)}.json"
    if saved.is_file() and not args.force:
        return [*json.loads(saved.read_text()), mean_row]
    judged, queries = qrels(test), first_query_texts(test)
    ids = list(judged)
    rows = []
    for name, docs in (("full", data.catalogue), ("sample", catalogue)):
        if name == "sample" and docs is data.catalogue:
            continue
        start = time.perf_counter()
        index = BM25Index(list(docs), list(docs.values()))
        hits = index.search([queries[q] for q in ids], 100)
        found = ranking_metrics(dict(zip(ids, hits, strict=True)), judged, config.task_args, recall_k=(10, 100))
        rows.append({"system": "BM25 (bm25s, stemmed, stop words)", "task": "retrieval", "method": "–", **found,
                     "wall_s": time.perf_counter() - start, "catalogue": len(docs)})  # fmt: skip

    from transformers import AutoModel

    from querytune.models import load_tokenizer, resolve_model_path

    path = resolve_model_path(config.model.model_name_or_path)
    model, tokenizer = AutoModel.from_pretrained(path), load_tokenizer(path)
    task = RetrievalTask(config)
    task.data = data
    start = time.perf_counter()
    hits = task.retrieve(model, tokenizer, [queries[q] for q in ids], catalogue, 100)
    wall = time.perf_counter() - start
    found = ranking_metrics(dict(zip(ids, hits, strict=True)), judged, config.task_args, recall_k=(10, 100))
    rows.append({"system": "all-MiniLM-L6-v2 zero-shot (cosine)", "task": "retrieval", "method": "–", **found,
                 "wall_s": wall, "catalogue": len(catalogue)})  # fmt: skip
    saved.write_text(json.dumps(rows, indent=2))
    return [*rows, mean_row]


def grade_shares(data_dir: str, config) -> str:
    """The share of judged pairs relevant, partly relevant (2 up to the threshold) and below 2, over every split."""
    import numpy as np

    full = load_config(REPO / "experiments/relevance/homedepot-rerank-full.yaml", ["--dataset_name", data_dir])
    splits = load_ranking_data(full.data, full.task_args, full.training.seed).splits
    labels = np.concatenate([np.asarray(ds["label"]) for ds in splits.values()])
    t = config.task_args.relevance_threshold
    return (f"{np.mean(labels >= t):.0%} >= {t}, {np.mean((labels >= 2) & (labels < t)):.0%} from 2 up to {t}, "
            f"{np.mean(labels < 2):.0%} below 2 ({len(labels):,} pairs)")  # fmt: skip


def variant(entry: str) -> tuple[str, list[str], str]:
    """`method` or `method:objective:negatives` → (method, overrides, run name)."""
    method, *rest = entry.split(":")
    if not rest:
        return method, [], method
    objective, negatives = rest[0], rest[1] if len(rest) > 1 else "0"
    return (
        method,
        ["--rerank_objective", objective, "--rerank_negatives", negatives],
        f"{method}-{objective}-n{negatives}",
    )


def fine_tuned(args: argparse.Namespace, task: str, entry: str, catalogue_file: str | None, size: int) -> dict:
    method, extra, name = variant(entry)
    out = Path(args.runs) / f"{task}-{name}"
    if args.force or not (out / MARKER).is_file():
        exp = REPO / f"experiments/relevance/homedepot-{task}-{method}.yaml"
        overrides = shared_overrides(args) + extra + [
            "--num_train_epochs", str(args.epochs), "--learning_rate", str(CPU_LR[(task, method)]),
            "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
            "--logging_steps", "20", "--report_to", "none",
        ]  # fmt: skip
        if task == "retrieval" and catalogue_file:
            overrides += ["--catalogue_file", catalogue_file]
        if method == "adalora":  # the budget schedule needs room between warm-up and the final phase
            overrides += ["--adalora_tinit", "0.1", "--adalora_tfinal", "0.2"]
        wall = train(exp, out, overrides, Path(args.runs) / f"{task}-{name}.log")
        (out / "bench_wall.json").write_text(json.dumps({"wall_s": wall}))
    info = read_run(out)
    config = load_config(out / "querytune_config.yaml")
    data = config.task_args
    objective = "contrastive: in-batch + 1 judged hard negative"
    if task == "rerank":
        negatives = f"{data.rerank_negatives} negatives/query ({data.rerank_negative_source})"
        objective = f"{data.rerank_objective}, {negatives if data.rerank_negatives else 'judged pairs only'}"
    metrics = json.loads((out / "all_results.json").read_text())
    wall = json.loads((out / "bench_wall.json").read_text())["wall_s"] if (out / "bench_wall.json").is_file() else None
    system = "cross-encoder, reranks BM25 top 100" if task == "rerank" else "bi-encoder (cosine)"
    return {"system": f"MiniLM-L6 {system}", "task": task, "method": method, "objective": objective,
            **{m: metrics.get(f"test_{m}") for m in [*METRICS, "rmse", "num_queries", "num_queries_no_relevant"]},
            "trainable_percent": info["trainable_percent"], "wall_s": wall,
            "train_samples_per_second": info["train_samples_per_second"],
            "catalogue": size}  # fmt: skip


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def shown_command() -> str:
    """The benchmark's arguments, without the --note text."""
    argv = sys.argv[1:]
    if "--note" in argv:
        i = argv.index("--note")
        argv = argv[:i] + argv[i + 2 :]
    return " ".join(argv)


def write_table(args: argparse.Namespace, rows: list[dict], sizes: dict) -> None:
    head = ["system", "method", "objective", "catalogue", "nDCG@10", "nDCG@5", "MRR@10", "MAP@100", "R@10", "R@100", "RMSE", "trainable %",
            "wall s", "train samples/s"]  # fmt: skip
    lines = [
        "# Home Depot query–product relevance (all-MiniLM-L6-v2)",
        "",
        f"Measured by `python benchmarks/homedepot_relevance.py {shown_command()}` on: "
        f"{machine_description()}; 1-minute load average {args.load[0]:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end (2 cores: above 2, other jobs shared them and times are pessimistic).",
        "",
        "**What was subsampled.** " + sizes["text"],
        "",
        "Each system searches the catalogue in its row for each test query: the whole catalogue "
        f"({sizes['full']:,} products) for BM25 and the cross-encoders (which rerank the BM25 top 100 of it), or "
        f"{sizes['sampled']}. nDCG uses graded gain `relevance - 1` "
        "(unjudged products: 0); MRR, MAP and recall count `relevance >= 2.5` as relevant, and queries with no "
        "such product are left out of them "
        f"({sizes.get('no_relevant', '?')} of {args.test_queries} test queries). The judgements were pooled "
        "from a lexical engine, so unjudged hits of a semantic model may well be relevant: the pool favours BM25. "
        "Cross-encoders rerank the BM25 top 100, so their R@100 is BM25's. Their objective column gives the loss "
        "and the unjudged catalogue products sampled per train query as irrelevant (label 1): half from the "
        "query's BM25 top 100, half at random (`mixed`). RMSE is on the judged test pairs "
        "(regression objective only). Wall time covers training plus the end-of-training evaluation (validation "
        "pairs, and the test catalogue search or rerank); train samples/s counts optimizer steps only.",
        "",
        *([args.note, ""] if args.note else []),
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        size = r.get("catalogue")
        cells = [r["system"], r["method"], r.get("objective", "–"), f"{size:,}" if isinstance(size, int) else "–", *[_fmt(r.get(m)) for m in METRICS], _fmt(r.get("rmse"), 4),
                 _fmt(r.get("trainable_percent"), 2), _fmt(r.get("wall_s"), 0),
                 _fmt(r.get("train_samples_per_second"), 1)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/homedepot"))
    parser.add_argument(
        "--rerank", nargs="*", default=["full", "lora"], help=f"methods {RERANK}, or method:objective:negatives"
    )
    parser.add_argument("--retrieval", nargs="*", default=RETRIEVAL, choices=RETRIEVAL)
    parser.add_argument("--train_queries", type=int, default=1500, help="seeded sample of train queries")
    parser.add_argument("--test_queries", type=int, default=200, help="seeded sample of test (and validation) queries")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--runs", default=str(REPO / "runs/bench-homedepot"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/homedepot_relevance.md"))
    parser.add_argument(
        "--retrieval_catalogue",
        type=int,
        default=0,
        help="products searched by the bi-encoders (judged test products + random others); 0: all",
    )
    parser.add_argument("--cache_dir", default="~/.cache/querytune/bench", help="where the sampled catalogue goes")
    parser.add_argument("--force", action="store_true", help="recompute finished runs and baselines")
    parser.add_argument("--note", default=None, help="a paragraph added above the table (what the rows show)")
    args = parser.parse_args()
    args.load = os.getloadavg()
    for entry in args.rerank:
        if variant(entry)[0] not in RERANK:
            parser.error(f"--rerank {entry!r}: the method must be one of {RERANK}")
    Path(args.runs).mkdir(parents=True, exist_ok=True)

    config = load_config(REPO / "experiments/relevance/homedepot-rerank-full.yaml", shared_overrides(args))
    data = load_ranking_data(config.data, config.task_args, config.training.seed)
    count = {r: (len(set(ds["query_id"])), len(ds)) for r, ds in data.splits.items()}
    sizes = {"text": (
        f"Queries split by the seeded md5 rule of `querytune/tasks/ranking/data.py` (seed 0: 10% test, 10% validation). "
        f"Training: a seeded sample of {count['train'][0]} train queries ({count['train'][1]} judged pairs), "
        f"{args.epochs:g} epoch. Evaluation: a seeded sample of {count['test'][0]} test queries "
        f"({count['test'][1]} judged pairs), and "
        f"{count['validation'][0]} validation queries. Same test queries for every row. Grades of all judged "
        f"pairs in the file: {grade_shares(args.data, config)}.")}  # fmt: skip
    catalogue, catalogue_file = sampled_catalogue(args, data)
    sizes["full"] = len(data.catalogue)
    sizes["sampled"] = (
        "the whole catalogue for the bi-encoders too" if catalogue_file is None else
        f"for the bi-encoders (zero-shot and fine-tuned) and the second BM25 row, a seeded sample of "
        f"{len(catalogue):,} products: every judged product of the test queries plus random others (encoding "
        "the whole catalogue once per model did not fit the time)")  # fmt: skip
    print(sizes["text"], flush=True)
    retrieval_config = load_config(
        REPO / "experiments/relevance/homedepot-retrieval-full.yaml", shared_overrides(args)
    )
    rows = baselines(args, data, retrieval_config, catalogue)
    sizes["no_relevant"] = rows[0].get("num_queries_no_relevant")
    write_table(args, rows, sizes)
    print(json.dumps(rows, indent=1), flush=True)
    for task, methods in (("rerank", args.rerank), ("retrieval", args.retrieval)):
        for method in methods:
            start = time.perf_counter()
            try:
                size = len(catalogue) if task == "retrieval" else len(data.catalogue)
                row = fine_tuned(args, task, method, catalogue_file, size)
            except RuntimeError as err:  # one failed method must not lose the others' rows
                print(f"{task}-{method} failed: {err}", flush=True)
                continue
            rows.append(row)
            print(f"{task}-{method} ({time.perf_counter() - start:.0f} s): {json.dumps(row)}", flush=True)
            write_table(args, rows, sizes)


if __name__ == "__main__":
    main()
