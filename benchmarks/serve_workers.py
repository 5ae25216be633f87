"""The served API with one process of 2 threads against 2 worker processes of 1 thread (`querytune serve --workers`).
Writes `benchmarks/results/serve_workers.md`.

    python benchmarks/serve_workers.py                                    # trains and exports the model it serves
    python benchmarks/serve_workers.py --queries 600 --rounds 1 --out /tmp/x.md   # a smoke run

The model is a 6-layer MiniLM intent run (the quickstart experiment on its demo corpus, `--max_steps 30`: its speed
is that of any MiniLM run; the accuracy is not what is measured here) exported to ONNX int8 with the default setting, trained once
into `runs/bench-serve-workers`. Queries: CLINC150 test, shuffled with seed 0. Scenarios: 16 clients x 1 query and
4 clients x 16 queries (each client sends its next request when the last is answered), and one client x 1 query
(batch-1 latency). Each configuration x scenario runs `--rounds` times in rounds over all of them; queries/s is the
median round's, latency percentiles pool the rounds. The server has `--max_batch 64 --model_batch_size 16
--max_wait_ms 5` in every row.

Hygiene: holds the machine-wide CPU lock, refuses to start above a 1-minute load average of 1.5 (unless
--force_load), records the load before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import check_load, cpu_slot, load_average, train  # noqa: E402
from inference import serve_load  # noqa: E402

CONFIGS = {"1 x 2 threads": (1, 2), "2 x 1 thread": (2, 1)}  # name -> (workers, threads per worker)
SCENARIOS = {"16 clients x 1 query": (16, 1), "4 clients x 16 queries": (4, 16), "1 client x 1 query": (1, 1)}


def host_speed() -> tuple[float, list[str]]:
    """The machine's fp32 GEMM throughput with 2 threads (GFLOP/s) and its AVX flags, for comparing tables measured
    on other hosts."""
    import torch

    torch.set_num_threads(2)
    a = torch.rand(1024, 1024)
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    gemm = 20 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9
    flags = sorted(
        {f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("avx2", "avx512f", "avx512_vnni"))}
    )
    return gemm, flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=2000, help="queries per scenario and round")
    parser.add_argument("--single_queries", type=int, default=300, help="queries of the 1-client scenario")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench-serve-workers"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "clinc150"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_workers.md"))
    parser.add_argument("--force_load", action="store_true")
    args = parser.parse_args()

    runs = Path(args.runs)
    run, export = runs / "run", runs / "onnx-int8"
    if not (export / "querytune_export.json").is_file():
        runs.mkdir(parents=True, exist_ok=True)
        train(REPO / "experiments" / "quickstart.yaml", run, ["--max_steps", "30", "--report_to", "none"],
              runs / "train.log", args.force_load)  # fmt: skip
        subprocess.run([sys.executable, "-m", "querytune", "export", str(run), "--format", "onnx", "--quantize",
                        "int8", "--output_dir", str(export)], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    texts = [json.loads(line)["text"] for line in (Path(args.data) / "test.jsonl").read_text().splitlines() if line]
    random.Random(0).shuffle(texts)

    rows: dict[tuple[str, str], list[dict]] = {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with cpu_slot(), tempfile.TemporaryDirectory() as tmp:
        load_before = check_load(args.force_load)
        gemm, flags = host_speed()
        for r in range(args.rounds):
            for config, (workers, threads) in CONFIGS.items():
                for scenario, (clients, per_request) in SCENARIOS.items():
                    n = args.single_queries if clients == 1 else args.queries
                    queries = texts[(r * n) % len(texts) :][:n]
                    result = serve_load(export, queries, clients, per_request, threads, 16,
                                        Path(tmp) / "server.log", workers=workers)  # fmt: skip
                    result["queries"] = len(queries)
                    rows.setdefault((config, scenario), []).append(result)
                    qps = len(queries) / result["wall_s"]
                    print(f"round {r + 1}: {config}, {scenario}: {qps:,.0f} queries/s", flush=True)
        load_after = load_average()

    lines = ["# Serving with worker processes: 1 process x 2 threads against 2 processes x 1 thread", "",
             f"`python benchmarks/serve_workers.py --queries {args.queries} --rounds {args.rounds}` at commit "
             f"{commit.stdout.strip()}{' (with uncommitted changes in src)' if dirty else ''}. "
             f"Measured on: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only; Python "
             f"{platform.python_version()}; started {started}; load average (1 min) before {load_before:.2f}, after "
             f"{load_after:.2f} (the benchmark's own server and clients included); fp32 GEMM 1024^3 with 2 threads: "
             f"{gemm:.0f} GFLOP/s; CPU flags: {', '.join(flags) or 'none of avx2 / avx512'}. Compare absolute figures "
             "with other tables only on the same kind of host.", "",
             "Model: MiniLM-L6 intent run (`experiments/quickstart.yaml`, 30 steps), ONNX int8 export, default "
             "setting. Queries: CLINC150 test, shuffled. Server: `querytune serve EXPORT --workers W --threads T "
             "--max_batch 64 --model_batch_size 16 --max_wait_ms 5`. The clients run in the benchmark's process, on "
             "the same 2 cores. "
             f"{args.rounds} round(s): queries/s is the median round's (range over rounds); latency percentiles pool "
             "every request of every round. Peak RSS: the sum of each server process's own peak.", "",
             "| server | clients | queries / round | queries/s | range | p50 ms | p99 ms | mean model batch | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for (config, scenario), results in rows.items():
        qps = sorted(res["queries"] / res["wall_s"] for res in results)
        lat = np.percentile(np.concatenate([res["latencies"] for res in results]) * 1000, [50, 99])
        lines.append(f"| {config} | {scenario} | {results[0]['queries']} | {qps[len(qps) // 2]:,.0f} | "
                     f"{qps[0]:,.0f}-{qps[-1]:,.0f} | {lat[0]:.1f} | {lat[1]:.1f} | "
                     f"{np.mean([res['mean_batch'] for res in results]):.1f} | "
                     f"{max(res['peak_rss_mb'] for res in results):,.0f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
