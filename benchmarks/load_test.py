"""Load test of the served API: a CLINC150-style intent run behind `querytune serve` on loopback, driven by locust
(headless) for `--duration` with a mix of good and bad `POST /predict` requests. Checks that every request is
answered exactly once (each request sent got one response, and the server counted as many as locust sent) and every
good one correctly (its own queries echoed back with the label `querytune predict` gives them); writes p50 / p99
latency and the error counts per kind of request to `benchmarks/results/load_test.md`.

python benchmarks/load_test.py --run runs/bench-clinc150/lora --data ../shared/data/clinc150          # 2 minutes
python benchmarks/load_test.py --run RUN --duration 10s --out /tmp/load_test.md                      # smoke run

Good requests hold 1-4 test queries; bad ones are an empty query, a lone surrogate, zero-width characters, a string
top_k, an unknown field, malformed JSON, an over-long query, too many queries, a body over `--max_body_bytes`, an
unknown run (`benchmarks/locustfile_serve.py`). locust runs as a subprocess (gevent patches the process it is
imported in), and so does the server; both share the machine, so latencies include the load generator's CPU use.
Needs `pip install -e ".[bench]"` (locust). Exits 1 when a check fails; timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("locustfile_serve.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_queries(run: Path, data: str | None, n: int) -> tuple[list[str], dict[str, str]]:
    """Up to n distinct test queries of the run's dataset (or `data`) and the label `querytune predict` gives each."""
    from querytune.inference import LoadedRun

    loaded = LoadedRun(run)
    if data:
        loaded.config.data.dataset_name = data
        loaded.config.data.train_file = loaded.config.data.validation_file = loaded.config.data.test_file = None
    split = loaded.config.data.test_split or loaded.config.data.validation_split
    texts, _ = loaded.task.verification_texts(loaded, split)
    queries = list(dict.fromkeys(t for t in texts if t.strip()))[:n]
    predicted = loaded.predict(queries, top_k=1, batch_size=1)  # one by one: no padding
    if "label" not in predicted[0]:
        raise SystemExit(f"{run} is a {loaded.config.data.task} run: the load test needs a classification run")
    return queries, {p["query"]: p["label"] for p in predicted}


def predict_requests(url: str) -> float:
    """The server's own count of /predict requests (every status), from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('querytune_requests_total{endpoint="/predict"'))  # fmt: skip


def start_server(run: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "querytune", "serve", f"bench={run}", "--port", str(port), "--threads",
           str(args.threads), "--max_body_bytes", str(args.max_body_bytes)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start; see {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run",
        default=str(REPO / "runs/bench-clinc150/lora"),
        help="a finished intent run (default: the CLINC150 LoRA run of benchmarks/clinc150_methods.py)",
    )
    parser.add_argument("--data", default=None, help="dataset of the test queries (default: the run's own)")
    parser.add_argument("--duration", default="120s", help="locust's run time, e.g. 120s or 2m (default 120s)")
    parser.add_argument("--users", type=int, default=8, help="concurrent locust users (default 8)")
    parser.add_argument("--wait_s", type=float, default=0.0, help="each user waits up to this between requests")
    parser.add_argument("--num_queries", type=int, default=500, help="distinct test queries to draw from")
    parser.add_argument("--threads", type=int, default=1, help="server threads (torch)")
    parser.add_argument("--max_body_bytes", type=int, default=65536, help="the server's body limit")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/load_test.md"))
    args = parser.parse_args()

    from querytune.report import machine_description

    run = Path(args.run)
    if not run.is_dir():
        raise SystemExit(f"--run {run}: no such run directory (train one, e.g. with benchmarks/clinc150_methods.py)")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    print(f"predicting {args.num_queries} test queries one by one for the expected labels ...", flush=True)
    queries, expected = test_queries(run, args.data, args.num_queries)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        proc, url = start_server(run, args, tmp / "server.log")
        try:
            limits = httpx.get(f"{url}/metadata", timeout=30).json()["limits"]
            (tmp / "cases.json").write_text(json.dumps({"run": "bench", "queries": queries, "expected": expected,
                                                        "limits": limits}))  # fmt: skip
            before = predict_requests(url)
            env = {**os.environ, "QT_LOAD_CASES": str(tmp / "cases.json"), "QT_LOAD_OUT": str(tmp / "outcomes.json"),
                   "QT_LOAD_WAIT_S": str(args.wait_s)}  # fmt: skip
            cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(args.users), "-r",
                   str(args.users), "-t", args.duration, "--host", url, "--only-summary", "--stop-timeout", "10",
                   "--exit-code-on-error", "0"]  # fmt: skip
            print(f"locust: {args.users} users for {args.duration} against {url} ...", flush=True)
            locust = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
            if locust.returncode != 0:
                raise SystemExit(f"locust failed ({locust.returncode}):\n{locust.stderr[-3000:]}")
            server_count = predict_requests(url) - before
        finally:
            proc.send_signal(signal.SIGINT)
            server_exit = proc.wait(timeout=60)
        record = json.loads((tmp / "outcomes.json").read_text())
    load_after = os.getloadavg()[0]

    sent_by_kind, outcomes, latency = record["sent"], record["outcomes"], record["latency_ms"]
    sent = sum(sent_by_kind.values())
    no_response = sum(v for k, v in outcomes.items() if k.endswith("no response"))
    answered = sum(len(v) for v in latency.values()) - no_response
    ok = {
        kind: outcomes.get("good right" if kind == "good" else f"{kind} expected status", 0) for kind in sent_by_kind
    }
    good_sent, good_right = sent_by_kind.get("good", 0), ok.get("good", 0)
    bad_kinds = [kind for kind in sent_by_kind if kind != "good"]
    bad_sent, bad_right = sum(sent_by_kind[k] for k in bad_kinds), sum(ok[k] for k in bad_kinds)
    checks = {
        "every request got exactly one response (none without, none twice)": no_response == 0 and answered == sent,
        "the server counted as many /predict requests as locust sent": server_count == sent,
        "every good request got its own queries back with the expected labels": good_right == good_sent > 0,
        "every bad request got the status the API promises": bad_right == bad_sent > 0,
        "the server exited cleanly on SIGINT": server_exit == 0,
    }
    table = ["| kind | requests | not as expected | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
    every = [t for times in latency.values() for t in times]
    for kind in [*sorted(sent_by_kind), "all"]:
        times = every if kind == "all" else latency.get(kind, [])
        count = sent if kind == "all" else sent_by_kind[kind]
        wrong = count - (sum(ok.values()) if kind == "all" else ok[kind])
        p50, p99 = np.percentile(times, [50, 99]) if times else (float("nan"), float("nan"))
        table.append(f"| {kind} | {count:,} | {wrong:,} | {p50:.0f} | {p99:.0f} |")
    lines = [
        "# Served API under load (locust)",
        "",
        f"`python benchmarks/load_test.py --run {args.run} --duration {args.duration} --users {args.users}` "
        f"({started}). Measured on: {machine_description()}.",
        "",
        f"`querytune serve` ({args.threads} torch thread, `--max_body_bytes {args.max_body_bytes}`, other limits at "
        f"their defaults) on loopback; locust {args.users} users, no think time beyond `--wait_s {args.wait_s}`, "
        "half good requests (1-4 test queries each), half bad ones of ten kinds; locust shares the machine with the "
        f"server. Load average before / after: {load_before:.2f} / {load_after:.2f}. Latency percentiles are "
        "computed from every request's response time as locust measured it (client side, so they include the "
        "load generator's own CPU use).",
        "",
        *table,
        "",
        f"Requests sent: {sent:,}; answered: {answered:,}; counted by the server: {server_count:,.0f}; without a "
        f"response: {no_response}; good requests answered right: {good_right:,} of {good_sent:,}.",
        "",
        *[f"- {'pass' if passed else 'FAIL'}: {what}" for what, passed in checks.items()],
        "",
        "Outcomes by kind: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(outcomes.items())),
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
