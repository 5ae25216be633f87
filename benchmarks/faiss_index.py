"""Approximate nearest-neighbour search for large catalogues: faiss HNSW and IVF against exact search.

    python benchmarks/faiss_index.py                          # 1M synthetic 384-d vectors (faiss_index.md)
    python benchmarks/faiss_index.py --n 20000 --queries 200  # smoke test
    python benchmarks/faiss_index.py --vectors emb.npy         # real catalogue embeddings instead

What `retrieval_index: faiss` trades: recall@100 of each index against exact search (the share of the exact top 100
the index returns, averaged over queries), queries/s searched in one batch and one at a time, and the time to build
the index. The vectors are synthetic unless --vectors is given: a seeded mixture of Gaussian clusters on the unit
sphere (n / 100 centres; real text embeddings are clustered too, while uniform random vectors would be the worst case
for any index), and the queries are drawn from the same mixture. The speed figures do not depend on the values;
recall does, so the table says which vectors were used. Each row is written to the table as soon as it finishes,
and built indexes are cached in --cache (reused when the script is run again, unless --force).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

DEFAULT_INDEXES = ["HNSW32:efSearch=64,efSearch=128,efSearch=256", "IVF4096,Flat:nprobe=8,nprobe=32,nprobe=128"]


def synthetic(n: int, dim: int, seed: int, centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around seeded Gaussian centres (generated in chunks: 1M x 384 float32 is 1.5 GB)."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = np.random.default_rng(12345).normal(size=(max(1, n // 100), dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centres[rng.integers(len(centres), size=m)] + 0.35 * rng.normal(size=(m, dim)).astype(np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, centres


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / k for a, b in zip(found, exact, strict=True)]))


def timed_search(index, queries: np.ndarray, k: int, single: int) -> tuple[np.ndarray, float, float]:
    """Top k of every query (one batch), batch queries/s, and one-at-a-time queries/s over the first `single`."""
    start = time.perf_counter()
    _, idx = index.search(queries, k)
    batch_qps = len(queries) / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(min(single, len(queries))):
        index.search(queries[i : i + 1], k)
    single_qps = min(single, len(queries)) / (time.perf_counter() - start)
    return idx, batch_qps, single_qps


def write_table(args: argparse.Namespace, rows: list[dict], header: dict) -> None:
    head = ["index", "search setting", "recall@100 vs exact", "queries/s (batch)", "queries/s (one by one)",
            "build s", "index MB", "load before / after"]  # fmt: skip
    lines = [
        f"# Nearest-neighbour search over {args.n:,} vectors: faiss against exact",
        "",
        f"Measured by `python benchmarks/faiss_index.py {' '.join(sys.argv[1:])}` on {header['machine']}"
        f"{header['commit']}; {args.threads} faiss threads. Vectors: {header['vectors']}. "
        f"{args.queries:,} queries, top {args.k}; recall@{args.k} is the share of the exact top {args.k} that the "
        "index returns, averaged over queries. Queries/s: all queries in one `search` call (batch), and the first "
        f"{args.single} one at a time (what a server answering one request sees). Build time: train + add. The "
        "1-minute load average before and after each row is given (2 cores: above 2, another job shared them).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["index"], r["setting"], f"{r['recall']:.4f}", f"{r['batch_qps']:,.0f}", f"{r['single_qps']:,.0f}",
                 "–" if r.get("build_s") is None else f"{r['build_s']:.0f}", f"{r['size_mb']:,.0f}",
                 f"{r['load_before']:.1f} / {r['load_after']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="catalogue vectors")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--single", type=int, default=200, help="queries also searched one at a time")
    parser.add_argument("--indexes", nargs="*", default=DEFAULT_INDEXES,
                        help="FACTORY:PARAMS,PARAMS... (faiss index_factory string : ParameterSpace settings)")  # fmt: skip
    parser.add_argument("--vectors", default=None, help=".npy of real embeddings (unit length) instead of synthetic")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(REPO / "runs/bench-faiss"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/faiss_index.md"))
    parser.add_argument("--force", action="store_true", help="rebuild cached indexes and recompute every row")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import uncommitted_note

    from querytune.report import machine_description

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.vectors:
        docs = np.load(args.vectors).astype(np.float32)[: args.n]
        args.n = len(docs)
        rng = np.random.default_rng(args.seed)
        queries = docs[rng.choice(len(docs), args.queries, replace=False)] + 0.05 * rng.normal(
            size=(args.queries, docs.shape[1])).astype(np.float32)  # fmt: skip
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        vectors = f"{args.vectors} (queries: catalogue vectors plus noise)"
    else:
        docs, centres = synthetic(args.n, args.dim, args.seed)
        queries, _ = synthetic(args.queries, args.dim, args.seed + 1, centres)
        vectors = (f"synthetic, {args.dim}-d unit vectors from {len(centres):,} Gaussian clusters (seed {args.seed}); "
                   "queries from the same clusters")  # fmt: skip
    header = {"machine": machine_description(), "commit": uncommitted_note(), "vectors": vectors}
    tag = f"n{args.n}-d{docs.shape[1]}-s{args.seed}-{'real' if args.vectors else 'syn'}"
    saved = cache / f"rows-{tag}-q{args.queries}-k{args.k}.json"
    done = {} if args.force or not saved.is_file() else json.loads(saved.read_text())
    rows: list[dict] = []

    def finish(key: str, row: dict) -> None:
        done[key] = row
        rows.append(row)
        saved.write_text(json.dumps(done, indent=1))
        write_table(args, rows, header)
        print(json.dumps(row), flush=True)

    # Exact search is the reference: its top k is the ground truth every index is scored against.
    load = os.getloadavg()[0]
    exact = faiss.IndexFlatIP(docs.shape[1])
    exact.add(docs)
    truth, batch_qps, single_qps = timed_search(exact, queries, args.k, args.single)
    if "exact" not in done:
        finish("exact", {"index": "exact (IndexFlatIP)", "setting": "–", "recall": 1.0, "batch_qps": batch_qps,
                         "single_qps": single_qps, "build_s": None, "size_mb": docs.nbytes / 2**20,
                         "load_before": load, "load_after": os.getloadavg()[0]})  # fmt: skip
    else:
        rows.append(done["exact"])
    for spec in args.indexes:
        factory, _, settings = spec.partition(":")
        path = cache / f"{tag}-{factory.replace(',', '_')}.faiss"
        keys = [f"{factory}|{s}" for s in settings.split(",") if s] or [f"{factory}|"]
        if all(k in done for k in keys):
            rows += [done[k] for k in keys]
            write_table(args, rows, header)
            continue
        load = os.getloadavg()[0]
        build_s = None
        if path.is_file() and not args.force:
            index = faiss.read_index(str(path))
            built = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
            build_s = built.get("build_s")
        else:
            start = time.perf_counter()
            index = faiss.index_factory(docs.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                sample = docs[np.random.default_rng(0).choice(len(docs), min(len(docs), 256 * 4096), replace=False)]
                index.train(sample)
            index.add(docs)
            build_s = time.perf_counter() - start
            faiss.write_index(index, str(path))
            path.with_suffix(".json").write_text(json.dumps({"build_s": build_s}))
        size_mb = path.stat().st_size / 2**20
        for key in keys:
            setting = key.split("|", 1)[1]
            if key in done:
                rows.append(done[key])
                continue
            before = load if setting == keys[0].split("|", 1)[1] else os.getloadavg()[0]
            if setting:
                faiss.ParameterSpace().set_index_parameters(index, setting)
            found, batch_qps, single_qps = timed_search(index, queries, args.k, args.single)
            finish(key, {"index": factory, "setting": setting or "–", "recall": recall_at(found, truth),
                         "batch_qps": batch_qps, "single_qps": single_qps, "build_s": build_s, "size_mb": size_mb,
                         "load_before": before, "load_after": os.getloadavg()[0]})  # fmt: skip
    write_table(args, rows, header)


if __name__ == "__main__":
    main()
