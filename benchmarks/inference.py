"""Inference benchmark of a CLINC150 intent run: eager PyTorch (unmerged / merged), ONNX fp32, ONNX int8, and the served
API under concurrent load. Prints and writes `benchmarks/results/inference.md`.

python benchmarks/inference.py                                   # full run (CLINC150 test, 5,500 queries)
python benchmarks/inference.py --max_queries 200 --out /tmp/x.md # smoke run

Each engine runs in its own process (so peak memory is its own) with `--threads` threads. The timed path is what
`querytune predict` does: tokenise a batch, run the model, read the logits. Exports are made with
`querytune.serving.export.export_run` into RUN/exports/ and reused when they are finished. Batch sizes below the largest
run over the first `--latency_queries` queries; the largest runs over all (accuracy and agreement). Timings are
disturbed by anything else on the machine: the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENGINES = {  # name -> (export format or None for the run itself, quantize, merged)
    "pytorch-unmerged": None,
    "pytorch-merged": ("merged", None),
    "onnx-fp32": ("onnx", None),
    "onnx-int8": ("onnx", "int8"),
}


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process: its own peak (ru_maxrss would carry the parent's peak across fork + exec)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024


def percentiles(values: list[float]) -> tuple[float, float, float]:
    p = np.percentile(np.asarray(values) * 1000, [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


# --- one engine, in its own process
def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from querytune.inference import LoadedRun, OnnxModel

    queries = json.loads(Path(args.queries_file).read_text())
    start = time.perf_counter()
    if args.engine == "pytorch-unmerged":
        loaded = LoadedRun(args.path, merge=False, device="cpu")
    else:
        loaded = LoadedRun(args.path, device="cpu", threads=args.threads)
    load_s = time.perf_counter() - start
    loaded.logits(queries[:64], batch_size=64)  # warm-up
    loaded.logits(queries[:1], batch_size=1)
    result: dict = {"engine": args.engine, "load_s": load_s, "rows": []}
    for bs in args.batch_sizes:
        subset = queries if bs == max(args.batch_sizes) else queries[: args.latency_queries]
        latencies, preds = [], []
        tokenize_s = 0.0
        for i in range(0, len(subset), bs):
            chunk = subset[i : i + bs]
            t = time.perf_counter()
            logits = loaded.logits(chunk, batch_size=bs)
            latencies.append(time.perf_counter() - t)
            preds += np.argmax(logits, axis=-1).tolist()
        # The tokenizer alone on the same batches: the rest of the time is the model (and the logits' copy).
        for i in range(0, len(subset), bs):
            t = time.perf_counter()
            loaded.tokenizer(subset[i : i + bs], truncation=True, max_length=64, padding=True, return_tensors="pt")
            tokenize_s += time.perf_counter() - t
        result["rows"].append({"batch_size": bs, "num_queries": len(subset), "total_s": sum(latencies),
                               "latencies": latencies, "preds": preds, "tokenize_s": tokenize_s})  # fmt: skip
    if args.profile and isinstance(getattr(loaded, "model", None), OnnxModel):
        result["ort_profile"] = ort_profile(args.path, queries, loaded, args.threads)
    result["peak_rss_mb"] = peak_rss_mb(os.getpid())
    Path(args.result).write_text(json.dumps(result))


def ort_profile(path: str, queries: list[str], loaded, threads: int) -> list[dict]:
    """ONNX Runtime's own profile of 20 batches of 64: total time per operator type, largest first."""
    from querytune.inference import OnnxModel
    from querytune.runs import ONNX_FILE

    with tempfile.TemporaryDirectory() as tmp:
        model = OnnxModel(Path(path) / ONNX_FILE, threads, profile_prefix=str(Path(tmp) / "ort"))
        for i in range(0, min(len(queries), 20 * 64), 64):
            enc = loaded.tokenizer(queries[i : i + 64], truncation=True, max_length=64, padding=True,
                                   return_tensors="np")  # fmt: skip
            model(**{k: enc[k] for k in model.inputs})
        events = json.loads(Path(model.session.end_profiling()).read_text())
    per_op: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"].get("op_name", "?")] += e["dur"]
    total = sum(per_op.values()) or 1
    return [{"op": op, "ms": us / 1000, "share": us / total} for op, us in per_op.most_common(10)]


# --- the served API under load
def serve_load(export_dir: Path, queries: list[str], clients: int, per_request: int, threads: int, log: Path) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "querytune", "serve", f"bench={export_dir}", "--port", str(port), "--threads",
           str(threads), "--max_batch", "64", "--max_wait_ms", "5", "--max_pending", "1024"]  # fmt: skip
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited; see {log}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        chunks = [queries[i : i + per_request] for i in range(0, len(queries), per_request)]
        latencies: list[float] = []
        labels: dict[int, str] = {}

        async def client(todo: list[int], http: httpx.AsyncClient) -> None:
            while todo:
                i = todo.pop()
                t = time.perf_counter()
                r = await http.post("/predict", json={"queries": chunks[i], "top_k": 1})
                latencies.append(time.perf_counter() - t)
                r.raise_for_status()
                for j, res in enumerate(r.json()["results"]):
                    labels[i * per_request + j] = res["predictions"]["bench"]["label"]

        async def run() -> float:
            limits = httpx.Limits(max_connections=clients)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
                await http.post("/predict", json={"queries": queries[:per_request]})  # warm-up
                todo = list(range(len(chunks)))[::-1]
                t = time.perf_counter()
                await asyncio.gather(*(client(todo, http) for _ in range(clients)))
                return time.perf_counter() - t

        wall = asyncio.run(run())
        metrics = httpx.get(f"{url}/metrics").text
        hwm = peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)

    def metric(name: str) -> float:
        return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name))

    calls, batched = metric('querytune_batch_size_count{run="bench"}'), metric('querytune_batch_size_sum{run="bench"}')
    return {"wall_s": wall, "latencies": latencies, "labels": [labels[i] for i in range(len(queries))],
            "peak_rss_mb": hwm, "mean_model_batch": batched / max(calls, 1)}  # fmt: skip


# --- the report
def accuracy(pred_labels: list[str], gold: list[str], oos: str = "oos") -> tuple[float, float]:
    """(in-scope accuracy, accuracy over all queries) in %."""
    pairs = list(zip(pred_labels, gold, strict=True))
    in_scope = [p == g for p, g in pairs if g != oos]
    return 100 * float(np.mean(in_scope)) if in_scope else float("nan"), 100 * float(
        np.mean([p == g for p, g in pairs])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(REPO / "runs/bench-clinc150/lora"))
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/clinc150"))
    parser.add_argument("--max_queries", type=int, default=None, help="use the first N (shuffled) test queries")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument(
        "--latency_queries",
        type=int,
        default=1000,
        help="batch sizes below the largest run over "
        "this many queries (the largest runs over all, for accuracy and agreement)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--serve_queries", type=int, default=1000, help="queries sent to the served API")
    parser.add_argument("--no_serve", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/inference.md"))
    # internal: one engine in its own process
    parser.add_argument("--worker", dest="engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--queries_file", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return worker(args)

    from querytune.report import machine_description
    from querytune.runs import is_export
    from querytune.serving.export import default_export_dir, export_run

    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    run = Path(args.run)
    rows = [json.loads(line) for line in (Path(args.data) / "test.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(rows)  # the file is sorted by intent; batches should mix intents and lengths
    rows = rows[: args.max_queries] if args.max_queries else rows
    queries, gold = [r["text"] for r in rows], [r["intent"] for r in rows]
    labels = json.loads((run / "label_map.json").read_text())["labels"]

    paths: dict[str, Path] = {}
    for engine in args.engines:
        spec = ENGINES[engine]
        if spec is None:
            paths[engine] = run
            continue
        out = default_export_dir(run, *spec)
        if not is_export(out):
            print(f"exporting {engine} to {out} ...", flush=True)
            export_run(run, fmt=spec[0], quantize=spec[1], output_dir=out, overwrite=True, verify_samples=500)
        paths[engine] = out

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        qfile = Path(tmp) / "queries.json"
        qfile.write_text(json.dumps(queries))
        for engine in args.engines:
            print(f"benchmarking {engine} ...", flush=True)
            res = Path(tmp) / f"{engine}.json"
            cmd = [sys.executable, __file__, "--worker", engine, "--path", str(paths[engine]), "--queries_file",
                   str(qfile), "--result", str(res), "--threads", str(args.threads), "--latency_queries",
                   str(args.latency_queries), "--batch_sizes", *map(str, args.batch_sizes), "--profile"]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
                   "HF_HUB_OFFLINE": "1"}  # fmt: skip
            subprocess.run(cmd, check=True, env=env, cwd=REPO)
            results[engine] = json.loads(res.read_text())

    reference = {row["batch_size"]: row["preds"] for row in results[args.engines[0]]["rows"]}
    table = ["| engine | batch | queries | queries/s | p50 ms | p95 ms | p99 ms | in-scope acc % | acc % | "
             "agreement % | peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    profile = [
        "| engine | batch 64: total s | tokenizer s | model + rest s | tokenizer share |",
        "|---|---:|---:|---:|---:|",
    ]
    summary = {}
    for engine in args.engines:
        r = results[engine]
        for row in r["rows"]:
            bs, n = row["batch_size"], row["num_queries"]
            pred = [labels[i] for i in row["preds"]]
            in_acc, acc = accuracy(pred, gold[:n])
            agree = 100 * float(np.mean(np.asarray(row["preds"]) == np.asarray(reference[bs])))
            p50, p95, p99 = percentiles(row["latencies"])
            qps = n / row["total_s"]
            summary[(engine, bs)] = {"qps": qps, "in_scope": in_acc, "agreement": agree}
            table.append(f"| {engine} | {bs} | {n} | {qps:,.0f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {in_acc:.2f} | "
                         f"{acc:.2f} | {agree:.2f} | {r['peak_rss_mb']:,.0f} |")  # fmt: skip
            if bs == max(args.batch_sizes):
                tok = row["tokenize_s"]
                profile.append(f"| {engine} | {row['total_s']:.2f} | {tok:.2f} | {row['total_s'] - tok:.2f} | "
                               f"{100 * tok / row['total_s']:.0f}% |")  # fmt: skip

    served_lines = []
    if not args.no_serve:
        best = max((e for e in args.engines if e != "pytorch-unmerged"),
                   key=lambda e: summary[(e, max(args.batch_sizes))]["qps"], default=None)  # fmt: skip
        if best is not None:
            sq = queries[: args.serve_queries]
            for clients, per_request in ((16, 1), (4, 16)):
                print(f"serving {best}: {clients} clients x {per_request} queries/request ...", flush=True)
                s = serve_load(paths[best], sq, clients, per_request, args.threads, Path(tempfile.gettempdir()) / "qt_serve.log")  # fmt: skip
                in_acc, acc = accuracy(s["labels"], gold[: len(sq)])
                ref = [labels[i] for i in reference[max(args.batch_sizes)][: len(sq)]]
                agree = 100 * float(np.mean([a == b for a, b in zip(s["labels"], ref, strict=True)]))
                p50, p95, p99 = percentiles(s["latencies"])
                table.append(f"| served API ({best}), {clients} clients x {per_request} q/request | "
                             f"{s['mean_model_batch']:.1f} (mean model batch) | {len(sq)} | {len(sq) / s['wall_s']:,.0f} "
                             f"| {p50:.1f} | {p95:.1f} | {p99:.1f} | {in_acc:.2f} | {acc:.2f} | {agree:.2f} | "
                             f"{s['peak_rss_mb']:,.0f} (server) |")  # fmt: skip
            served_lines.append(
                "Served rows: `querytune serve` in its own process (`--max_batch 64 --max_wait_ms 5`, "
                f"{args.threads} threads) and an asyncio httpx client in this process, on the same cores; latency is "
                "per HTTP request as the client sees it."
            )

    ort = results.get("onnx-int8", {}).get("ort_profile") or results.get("onnx-fp32", {}).get("ort_profile")
    load_after = os.getloadavg()
    big = max(args.batch_sizes)
    target = summary.get(("onnx-int8", big))
    lines = [
        "# Inference benchmark: CLINC150 intent run",
        "",
        f"Measured on: {machine_description()}.",
        f"Started {started}; load average (1/5/15 min) before: {load_before[0]:.2f} / {load_before[1]:.2f} / "
        f"{load_before[2]:.2f}, after: {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}. Other "
        "processes shared these cores while it ran, so the timings are lower bounds of what the machine can do.",
        "",
        f"Run: `{run}` ({json.loads((run / 'querytune_run.json').read_text()).get('method')}, "
        f"{json.loads((run / 'querytune_run.json').read_text()).get('base_model')}). Queries: CLINC150 test "
        f"({len(queries)} of them, shuffled with seed 0; smaller batches over the first {min(args.latency_queries, len(queries))}). "
        f"{args.threads} threads per engine. Command: `python benchmarks/inference.py {' '.join(sys.argv[1:])}`.",
        "",
        "Latency is per batch call (tokenise + model + logits), agreement is top-1 agreement with the unmerged "
        "PyTorch run on the same queries, peak RSS is the engine process's (Python, torch and the model included).",
        "",
        *table,
        "",
        *served_lines,
        "",
        "## Against the target",
        "",
    ]
    if target:
        ref_acc = summary[("pytorch-unmerged", big)]["in_scope"] if ("pytorch-unmerged", big) in summary else None
        drop = f"{ref_acc - target['in_scope']:.2f}" if ref_acc is not None else "n/a"
        lines += [
            f"Target on 2 cores: >= 1,000 queries/s at batch 64, int8 agreement >= 99%, accuracy drop <= 0.5 point. "
            f"Measured (onnx-int8, batch {big}): {target['qps']:,.0f} queries/s, agreement {target['agreement']:.2f}%, "
            f"in-scope accuracy drop {drop} points.",
            "",
        ]
    lines += [
        "## Where the time goes",
        "",
        "Tokenizer alone on the same batches vs everything else:",
        "",
        *profile,
        "",
    ]
    if ort:
        lines += ["ONNX Runtime profile (20 batches of 64, kernel time by operator type):", "",
                  "| op | ms | share |", "|---|---:|---:|",
                  *[f"| {p['op']} | {p['ms']:.1f} | {100 * p['share']:.1f}% |" for p in ort], ""]  # fmt: skip
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
