"""Inference benchmark of a CLINC150 intent run: eager PyTorch, ONNX fp32 (fused), ONNX int8 (the earlier default
setting on the plain graph, the packed-attention graph and the default setting), a distilled student, the served API
under concurrent load, and the physical limit. Prints and writes `benchmarks/results/inference.md`; `--raw FILE`
keeps the figures and `--render FILE` rewrites the markdown from them (a new `--note`) without measuring again.

python benchmarks/inference.py --run runs/bench-clinc150-speed/today --student runs/clinc150-student-3layer
python benchmarks/inference.py --run RUN --max_queries 200 --latency_queries 50 --serve_queries 200 \\
    --out /tmp/x.md --force_load                                  # smoke run

Each engine runs in its own process (so peak memory is its own) with `--threads` threads. The timed path is what
`querytune predict` does: tokenise, run the model, read the logits. Batch sizes below the largest run over the first
`--latency_queries` queries; the largest (64) runs over all, twice: one model call per 64 queries in arrival order
(padded to the longest, the earlier behaviour) and the same 64 cut into length-sorted model batches of
`--model_batch_size` (as `querytune serve` now does). Exports go to RUN/exports/bench-<engine> and are reused when
their marker says they were made the same way. `--repeats` rounds (default 3) run every engine and served row again:
on a 2-core machine queries/s moved by up to ~30% between back-to-back runs, so a row is the median of its rounds.

Hygiene: the script refuses to start while the 1-minute load average is above 1.5 (unless --force_load, which the
table then says), holds the machine-wide CPU lock while it measures, and records the load before and after.
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
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import OtherCpu, check_load, cpu_slot  # noqa: E402

# name -> (which run: "run" or "student", export options or None for the run itself, what the row shows)
ENGINES: dict[str, tuple[str, dict | None, str]] = {
    "pytorch-unmerged": ("run", None, "the run as trained (the reference)"),
    "pytorch-merged": ("run", {"fmt": "merged"}, "adapter merged into the base weights"),
    "onnx-fp32": ("run", {"fmt": "onnx"}, "ONNX, transformer fusions (where they verify)"),
    "onnx-int8-before": (
        "run",
        {"fmt": "onnx", "quantize": "int8", "optimize": False, "quantization": "dynamic-matmul-pc"},
        "int8, plain graph, dynamic, MatMul weights per channel (the earlier default)",
    ),  # fmt: skip
    "onnx-int8-packed": (
        "run",
        {"fmt": "onnx", "quantize": "int8", "quantization": "dynamic-matmul-pc-skip8"},
        "int8 on the packed-attention graph (Q, K, V fp32), the 8 most sensitive MatMuls fp32",
    ),  # fmt: skip
    "onnx-int8": ("run", {"fmt": "onnx", "quantize": "int8"}, "int8: the default setting (DEFAULT_QUANT)"),
    "openvino-fp32": ("run", {"engine": "openvino", "mode": "fp32"}, "OpenVINO, fp32, from the plain ONNX graph"),
    "openvino-int8": (
        "run",
        {"engine": "openvino", "mode": "int8"},
        "OpenVINO, NNCF post-training int8 (transformer preset, validation calibration)",
    ),
    "openvino-int8-ac": (
        "run",
        {"engine": "openvino", "mode": "int8-ac"},
        "OpenVINO, NNCF accuracy-controlled int8 (>= 99.5% top-1 agreement on validation)",
    ),
    "ct2-int8": ("run", {"engine": "ctranslate2", "compute_type": "int8"}, "CTranslate2, int8 (head in fp32)"),
    "ct2-int8-float32": (
        "run",
        {"engine": "ctranslate2", "compute_type": "int8_float32"},
        "CTranslate2, int8 weights, fp32 elsewhere (head in fp32)",
    ),
    "student-pytorch": ("student", None, "the distilled student as trained"),
    "student-onnx-int8": ("student", {"fmt": "onnx", "quantize": "int8"}, "the student, int8"),
    "student-openvino-int8-ac": (
        "student",
        {"engine": "openvino", "mode": "int8-ac"},
        "the student, OpenVINO accuracy-controlled int8",
    ),
    "student-ct2-int8": (
        "student",
        {"engine": "ctranslate2", "compute_type": "int8"},
        "the student, CTranslate2 int8",
    ),
}
# engines of other libraries (benchmarks/engines.py): optional, so only run when named with --engines
OTHER_ENGINES = {e for e, (_, options, _) in ENGINES.items() if options and "engine" in options}
TARGETS = ("6-layer int8 at >= 99.5% agreement: >= 1,200 queries/s at batch 64, batch-1 p50 <= 2.5 ms; served API "
           "(int8): >= 900 queries/s at 4 clients x 16 queries, >= 400 at 16 clients x 1 query; 3-layer distilled "
           "student, int8: >= 2,000 queries/s within 1 point of the teacher's in-scope accuracy; the best engine at "
           ">= 20% of the measured int8 GEMM peak")  # fmt: skip


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
    if args.path_kind == "run-unmerged":
        loaded = LoadedRun(args.path, merge=False, device="cpu")
    elif args.path_kind == "engine":
        from engines import EngineRun

        loaded = EngineRun(args.path, threads=args.threads)
    else:
        loaded = LoadedRun(args.path, device="cpu", threads=args.threads)
    load_s = time.perf_counter() - start
    loaded.logits(queries[:64], batch_size=64)  # warm-up
    loaded.logits(queries[:1], batch_size=1)
    result: dict = {"load_s": load_s, "rows": []}
    big = max(args.batch_sizes)
    # (batch of queries handed over, model batch size): arrival batches, and the largest cut into sorted model batches
    plans = [(bs, bs) for bs in args.batch_sizes] + [(big, args.model_batch_size)]
    for bs, model_bs in plans:
        subset = queries if bs == big else queries[: args.latency_queries]
        latencies, preds = [], []
        for i in range(0, len(subset), bs):
            chunk = subset[i : i + bs]
            t = time.perf_counter()
            logits = loaded.logits(chunk, batch_size=model_bs)
            latencies.append(time.perf_counter() - t)
            preds += np.argmax(logits, axis=-1).tolist()
        tokenize_s = 0.0  # the tokenizer alone on the same batches: the rest is the model (and the logits' copy)
        for i in range(0, len(subset), bs):
            t = time.perf_counter()
            loaded.tokenizer(subset[i : i + bs], truncation=True, max_length=64, padding=True, return_tensors="pt")
            tokenize_s += time.perf_counter() - t
        result["rows"].append({"batch_size": bs, "model_batch_size": model_bs, "num_queries": len(subset),
                               "total_s": sum(latencies), "latencies": latencies, "preds": preds,
                               "tokenize_s": tokenize_s})  # fmt: skip
    if args.profile and isinstance(getattr(loaded, "model", None), OnnxModel):
        result["ort_profile"] = ort_profile(args.path, queries, loaded, args.threads, args.model_batch_size)
    result["peak_rss_mb"] = peak_rss_mb(os.getpid())
    Path(args.result).write_text(json.dumps(result))


def ort_profile(path: str, queries: list[str], loaded, threads: int, model_batch_size: int) -> list[dict]:
    """ONNX Runtime's own profile of 20 batches of 64 (as sorted model batches): kernel time per operator type."""
    from querytune.batching import encoded_batches
    from querytune.inference import OnnxModel
    from querytune.runs import ONNX_FILE

    with tempfile.TemporaryDirectory() as tmp:
        model = OnnxModel(Path(path) / ONNX_FILE, threads, profile_prefix=str(Path(tmp) / "ort"))
        for i in range(0, min(len(queries), 20 * 64), 64):
            for _, enc in encoded_batches(loaded.tokenizer, queries[i : i + 64], None, model_batch_size, 64, "np"):
                model(**{k: enc[k] for k in model.inputs})
        events = json.loads(Path(model.session.end_profiling()).read_text())
    per_op: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"].get("op_name", "?")] += e["dur"]
    total = sum(per_op.values()) or 1
    return [{"op": op, "ms": us / 1000, "share": us / total} for op, us in per_op.most_common(12)]


# --- the served API under load
def serve_load(export_dir: Path, queries: list[str], clients: int, per_request: int, threads: int,
               model_batch_size: int, log: Path, workers: int = 1) -> dict:  # fmt: skip
    """`querytune serve` (`workers` processes of `threads` threads) driven by `clients` concurrent clients, each
    sending `per_request` queries a request until `queries` are all answered. Peak RSS is the sum of each server
    process's own peak (the workers' and their parent's)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "querytune", "serve", f"bench={export_dir}", "--port", str(port), "--threads",
           str(threads), "--max_batch", "64", "--model_batch_size", str(model_batch_size), "--max_wait_ms", "5",
           "--max_pending", "1024", "--workers", str(workers)]  # fmt: skip
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
        for _ in range(600):  # every worker has loaded its runs (uvicorn logs each one's startup)
            if log.read_text().count("Application startup complete") >= workers:
                break
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
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        hwm = peak_rss_mb(proc.pid) + sum(peak_rss_mb(int(pid)) for pid in children)  # each process's own peak
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)

    def metric(name: str) -> float:
        return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name))

    calls, batched = metric('querytune_batch_size_count{run="bench"}'), metric('querytune_batch_size_sum{run="bench"}')
    return {"wall_s": wall, "latencies": latencies, "labels": [labels[i] for i in range(len(queries))],
            "peak_rss_mb": hwm, "mean_batch": batched / max(calls, 1)}  # fmt: skip


# --- the physical limit: FLOPs per query against the cores' measured GEMM throughput
def encoder_flops(config: dict, tokens: int) -> float:
    """Multiply-adds x 2 of one query of `tokens` tokens through a BERT-style encoder and its classification head:
    per layer Q, K, V, O projections (8 n H^2), scores and weighted values (4 n^2 H), feed-forward (4 n H I)."""
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    labels = len(config.get("id2label") or {}) or 2
    per_layer = 8 * tokens * h * h + 4 * tokens * tokens * h + 4 * tokens * h * inter
    return layers * per_layer + 2 * h * h + 2 * h * labels  # + pooler and classifier on one token


def gemm_peak(threads: int, seconds: float = 3.0) -> dict[str, float]:
    """Best of repeated square GEMMs (FLOP/s): fp32 (torch.matmul) and int8 -> int32 (torch._int_mm where the CPU
    build has it), on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    peaks: dict[str, float] = {}
    size = 1024
    products = {
        "fp32": (torch.matmul, torch.randn(size, size), torch.randn(size, size)),
        "int8": (getattr(torch, "_int_mm", None), torch.randint(-128, 127, (size, size), dtype=torch.int8),
                 torch.randint(-128, 127, (size, size), dtype=torch.int8)),
    }  # fmt: skip
    for name, (op, a, b) in products.items():
        try:
            op(a, b)
        except (RuntimeError, TypeError, NotImplementedError) as err:  # no int8 GEMM in this torch build
            peaks[f"{name}_error"] = str(err)[:120]  # type: ignore[assignment]
            continue
        best, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            op(a, b)
            best = min(best, time.perf_counter() - t)
        peaks[name] = 2 * size**3 / best
    return peaks


# --- the report
def accuracy(pred_labels: list[str], gold: list[str], oos: str = "oos") -> tuple[float, float]:
    """(in-scope accuracy, accuracy over all queries) in %."""
    pairs = list(zip(pred_labels, gold, strict=True))
    in_scope = [p == g for p, g in pairs if g != oos]
    return 100 * float(np.mean(in_scope)) if in_scope else float("nan"), 100 * float(
        np.mean([p == g for p, g in pairs])
    )


def ensure_engine(run: Path, engine: str, options: dict, data: Path, threads: int) -> Path:
    """RUN/exports/bench-<engine> for another library's engine (reused when its `engine.json` matches)."""
    import engines

    out = run / "exports" / f"bench-{engine}"
    if options["engine"] == "ctranslate2":
        print(f"converting {engine} to {out} ...", flush=True)
        engines.make_ctranslate2(run, out, options["compute_type"])
        return out
    onnx = ensure_export(run, "onnx-fp32-plain", {"fmt": "onnx", "optimize": False})
    rows = [json.loads(line) for line in (data / "validation.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    reference = np.empty(0)
    if options["mode"] != "fp32" and not engines.made_as(out, {"engine": "openvino", "mode": options["mode"]}):
        from querytune.inference import LoadedRun

        reference = np.argmax(LoadedRun(run, merge=False, device="cpu", threads=threads).logits(texts), axis=-1)
    print(f"making {engine} in {out} ...", flush=True)
    info = engines.make_openvino(onnx, out, options["mode"], run, texts, reference, threads=threads)
    if "validation_agreement" in info:
        print(f"{engine}: validation agreement {100 * info['validation_agreement']:.2f}%", flush=True)
    return out


def ensure_export(run: Path, engine: str, options: dict) -> Path:
    """RUN/exports/bench-<engine>, made with `options` (reused when its marker says it was made the same way)."""
    from querytune.runs import is_export, read_export
    from querytune.serving.export import DEFAULT_QUANT, export_run

    out = run / "exports" / f"bench-{engine}"
    want_quant = options.get("quantization") or (DEFAULT_QUANT if options.get("quantize") else None)
    if is_export(out):
        info = read_export(out)
        optimized = (info.get("optimizer") or {}).get("reason") != "--no_optimize"
        same = (info.get("format") == options["fmt"] and info.get("quantize") == options.get("quantize")
                and (info.get("quantization") or {}).get("setting", {}).get("name") == want_quant
                and (options["fmt"] != "onnx" or optimized == options.get("optimize", True)))  # fmt: skip
        if same:
            return out
    print(f"exporting {engine} to {out} ...", flush=True)
    export_run(run, output_dir=out, overwrite=True, verify_samples=500, **options)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(REPO / "runs/bench-clinc150-speed/today"), help="the 6-layer run")
    parser.add_argument("--student", default=None, help="a distilled student of --run (adds the student rows)")
    parser.add_argument("--student_quantization", default=None,
                        help="the student's int8 setting (default DEFAULT_QUANT; quantization.py --run STUDENT chooses)")  # fmt: skip
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/clinc150"))
    parser.add_argument("--max_queries", type=int, default=None, help="use the first N (shuffled) test queries")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--model_batch_size", type=int, default=16, help="sorted model batches of the largest batch")
    parser.add_argument("--latency_queries", type=int, default=1000,
                        help="batch sizes below the largest run over this many queries")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds over all engines (and served rows): queries/s is the median, with its range")  # fmt: skip
    parser.add_argument("--engines", nargs="+", default=None, choices=list(ENGINES),
                        help="default: all that apply, except other libraries' engines (OpenVINO, CTranslate2)")  # fmt: skip
    parser.add_argument("--serve_queries", type=int, default=1000, help="queries sent to the served API")
    parser.add_argument("--serve_model_batch_sizes", type=int, nargs="+", default=[64, 16],
                        help="served rows per model batch size (64: one call per collected batch, as before)")  # fmt: skip
    parser.add_argument("--no_serve", action="store_true")
    parser.add_argument("--force_load", action="store_true", help="measure even if the machine is busy (noted)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/inference.md"))
    parser.add_argument("--note", default=None, help="a markdown file appended after the targets (what the rows say)")
    parser.add_argument("--raw", default=None, help="also save the measurements (JSON) here, for --render")
    parser.add_argument("--render", default=None, metavar="RAW",
                        help="measure nothing: rewrite --out from a --raw file (with the current --note)")  # fmt: skip
    # internal: one engine in its own process
    parser.add_argument("--worker", dest="engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--path_kind", help=argparse.SUPPRESS)
    parser.add_argument("--queries_file", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return worker(args)

    if args.render:
        raw = json.loads(Path(args.render).read_text())
    else:
        raw = json.loads(json.dumps(measure(args)))  # the same figures --render would read back
        if args.raw:
            Path(args.raw).write_text(json.dumps(raw))
    render(args, raw)


def measure(args: argparse.Namespace) -> dict:
    """Every engine in its own process, then the served API and the peak GEMM throughput: the raw figures."""
    load_before_1 = check_load(args.force_load)
    from querytune.report import machine_description

    runs = {"run": Path(args.run), "student": Path(args.student) if args.student else None}
    engines = args.engines or [
        e for e, (src, _, _) in ENGINES.items() if runs[src] is not None and e not in OTHER_ENGINES
    ]
    missing = [e for e in engines if runs[ENGINES[e][0]] is None]
    if missing:
        raise SystemExit(f"engines {missing} need --student")
    with cpu_slot():
        load_before = os.getloadavg()
        others = OtherCpu()
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        rows = [json.loads(line) for line in (Path(args.data) / "test.jsonl").read_text().splitlines()]
        random.Random(0).shuffle(rows)  # the file is sorted by intent; batches should mix intents and lengths
        rows = rows[: args.max_queries] if args.max_queries else rows
        queries, gold = [r["text"] for r in rows], [r["intent"] for r in rows]
        labels = {src: json.loads((run / "label_map.json").read_text())["labels"] for src, run in runs.items() if run}

        paths: dict[str, Path] = {}
        for engine in engines:
            src, options, _ = ENGINES[engine]
            if engine == "student-onnx-int8" and args.student_quantization:
                options = {**options, "quantization": args.student_quantization}
            if options is None:
                paths[engine] = runs[src]
            elif "engine" in options:
                paths[engine] = ensure_engine(runs[src], engine, options, Path(args.data), args.threads)
            else:
                paths[engine] = ensure_export(runs[src], engine, options)

        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            qfile = Path(tmp) / "queries.json"
            qfile.write_text(json.dumps(queries))
            # Rounds: every engine once per round, so that a slow spell of the machine touches all engines alike.
            for round_ in range(args.repeats):
                for engine in engines:
                    print(f"benchmarking {engine} (round {round_ + 1} of {args.repeats}) ...", flush=True)
                    res = Path(tmp) / f"{engine}.json"
                    options = ENGINES[engine][1]
                    kind = "run-unmerged" if options is None else "engine" if "engine" in options else "loaded"
                    cmd = [sys.executable, __file__, "--worker", engine, "--path", str(paths[engine]), "--path_kind",
                           kind, "--queries_file", str(qfile), "--result", str(res), "--threads", str(args.threads),
                           "--latency_queries", str(args.latency_queries), "--model_batch_size",
                           str(args.model_batch_size), "--batch_sizes", *map(str, args.batch_sizes),
                           *(["--profile"] if round_ == 0 else [])]  # fmt: skip
                    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
                           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}  # fmt: skip
                    subprocess.run(cmd, check=True, env=env, cwd=REPO)
                    result = json.loads(res.read_text())
                    if round_ == 0:
                        results[engine] = result
                        for row in result["rows"]:
                            row["round_total_s"] = [row["total_s"]]
                        continue
                    first = results[engine]
                    first["peak_rss_mb"] = max(first["peak_rss_mb"], result["peak_rss_mb"])
                    for row, again in zip(first["rows"], result["rows"], strict=True):
                        row["round_total_s"].append(again["total_s"])
                        row["latencies"] += again["latencies"]

            served = []
            int8 = next((e for e in ("onnx-int8", "onnx-int8-before") if e in engines), None)
            if not args.no_serve and int8:
                sq = queries[: args.serve_queries]
                for round_ in range(args.repeats):
                    at = 0
                    for mbs in args.serve_model_batch_sizes:
                        for clients, per_request in ((16, 1), (4, 16)):
                            print(f"serving {int8}: {clients} clients x {per_request} q/request, model batches of "
                                  f"{mbs} (round {round_ + 1})", flush=True)  # fmt: skip
                            s = serve_load(paths[int8], sq, clients, per_request, args.threads, mbs,
                                           Path(tmp) / "serve.log")  # fmt: skip
                            if round_ == 0:
                                s["round_wall_s"] = [s["wall_s"]]
                                served.append((int8, mbs, clients, per_request, len(sq), s))
                            else:
                                first = served[at][5]
                                first["round_wall_s"].append(s["wall_s"])
                                first["latencies"] += s["latencies"]
                                first["peak_rss_mb"] = max(first["peak_rss_mb"], s["peak_rss_mb"])
                            at += 1
            peaks = gemm_peak(args.threads)
        load_after = os.getloadavg()
        other_cores = others.cores()
    from querytune.runs import read_export

    settings = {e: (read_export(p).get("quantization") or {}).get("setting", {}).get("name")
                for e, p in paths.items() if ENGINES[e][1] is not None and e not in OTHER_ENGINES}  # fmt: skip
    for e in engines:
        if e in OTHER_ENGINES:
            made = json.loads((paths[e] / "engine.json").read_text())
            if "validation_agreement" in made:
                settings[e] = f"validation agreement {100 * made['validation_agreement']:.2f}%"
    served_reference = reference_answers(runs["run"], queries[: args.serve_queries], args.threads) if served else []
    return {"command": " ".join(sys.argv[1:]), "machine": machine_description(), "started": started,
            "load_before_1": load_before_1, "load_before": load_before, "load_after": load_after,
            "other_cores": other_cores, "runs": {k: str(v) if v else None for k, v in runs.items()},
            "engines": engines, "queries": queries, "gold": gold, "labels": labels, "results": results,
            "served": served, "served_reference": served_reference, "peaks": peaks, "settings": settings, "batch_sizes": args.batch_sizes, "threads": args.threads,
            "model_batch_size": args.model_batch_size, "latency_queries": args.latency_queries,
            "repeats": args.repeats}  # fmt: skip


def reference_answers(run: Path, queries: list[str], threads: int) -> list[str]:
    """The PyTorch run's answers as the API gives them (an intent, or the OOS label where the run's OOS detector
    rejects the query): what a served answer is compared with. Untimed, after the measurements."""
    from querytune.inference import LoadedRun

    return [r["label"] for r in LoadedRun(run, merge=False, device="cpu", threads=threads).predict(queries, top_k=1)]


def render(args: argparse.Namespace, raw: dict) -> None:
    """The markdown tables of `measure`'s figures, with `--note` after the targets."""
    from querytune.models import load_tokenizer

    runs = {k: Path(v) if v else None for k, v in raw["runs"].items()}
    engines, queries, gold, labels = raw["engines"], raw["queries"], raw["gold"], raw["labels"]
    results, served, peaks = raw["results"], raw["served"], raw["peaks"]
    load_before, load_after, other_cores = raw["load_before"], raw["load_after"], raw["other_cores"]
    load_before_1, started = raw["load_before_1"], raw["started"]
    args.batch_sizes, args.threads = raw["batch_sizes"], raw["threads"]
    args.model_batch_size, args.latency_queries = raw["model_batch_size"], raw["latency_queries"]

    # --- tables
    tokenizer = load_tokenizer(str(runs["run"]))
    counts = [len(ids) for ids in tokenizer(queries, truncation=True, max_length=64)["input_ids"]]
    from querytune.batching import arrival_batches, padding_waste, sorted_batches

    big = max(args.batch_sizes)
    arrival = arrival_batches(len(counts), big)
    within = [
        [g[i] for i in b] for g in arrival for b in sorted_batches([counts[j] for j in g], args.model_batch_size)
    ]
    waste = {"arrival": padding_waste(counts, arrival), "sorted": padding_waste(counts, within),
             "all_sorted": padding_waste(counts, list(sorted_batches(counts, big)))}  # fmt: skip

    def reference_of(engine: str) -> str:
        return "student-pytorch" if engine.startswith("student") else "pytorch-unmerged"

    summary: dict = {}
    served_qps: list[tuple[int, int, int, float]] = []
    repeats = raw.get("repeats", 1)
    qps_head = f"queries/s (median of {repeats}) | range" if repeats > 1 else "queries/s | range"
    table = [f"| engine | batch | model batches | queries | {qps_head} | p50 ms | p95 ms | p99 ms | in-scope acc % | "
             "acc % | agreement % | peak RSS MB |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

    def rates(n: int, seconds: list[float]) -> tuple[float, str]:
        values = [n / t for t in seconds]
        return float(np.median(values)), (f"{min(values):,.0f}-{max(values):,.0f}" if len(values) > 1 else "")

    time_split = ["| engine | batch 64: total s | tokenizer s | model + rest s | tokenizer share |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
    for engine in engines:
        r = results[engine]
        ref_engine = reference_of(engine)
        names = labels["student" if engine.startswith("student") else "run"]
        for row in r["rows"]:
            bs, mbs, n = row["batch_size"], row["model_batch_size"], row["num_queries"]
            pred = [names[i] for i in row["preds"]]
            in_acc, acc = accuracy(pred, gold[:n])
            ref_rows = results.get(ref_engine, {}).get("rows", [])
            ref = next((x["preds"] for x in ref_rows if x["batch_size"] == bs and x["model_batch_size"] == mbs), None)
            agree = 100 * float(np.mean(np.asarray(row["preds"]) == np.asarray(ref))) if ref else float("nan")
            p50, p95, p99 = percentiles(row["latencies"])
            qps, spread = rates(n, row.get("round_total_s", [row["total_s"]]))
            summary[(engine, bs, mbs)] = {"qps": qps, "in_scope": in_acc, "agreement": agree, "p50": p50}
            cut = "1 (arrival order)" if mbs >= bs else f"{-(-bs // mbs)} x <= {mbs}, sorted"
            table.append(f"| {engine} | {bs} | {cut} | {n} | {qps:,.0f} | {spread} | {p50:.1f} | {p95:.1f} | {p99:.1f} | "
                         f"{in_acc:.2f} | {acc:.2f} | {agree:.2f} | {r['peak_rss_mb']:,.0f} |")  # fmt: skip
            if bs == big and mbs == bs:
                tok = row["tokenize_s"]
                time_split.append(f"| {engine} | {row['total_s']:.2f} | {tok:.2f} | {row['total_s'] - tok:.2f} | "
                                  f"{100 * tok / row['total_s']:.0f}% |")  # fmt: skip
    for engine, mbs, clients, per_request, n, s in served:
        in_acc, acc = accuracy(s["labels"], gold[:n])
        ref = raw.get("served_reference")[:n] if raw.get("served_reference") else None
        agree = 100 * float(np.mean([a == b for a, b in zip(s["labels"], ref, strict=True)])) if ref else float("nan")
        p50, p95, p99 = percentiles(s["latencies"])
        qps, spread = rates(n, s.get("round_wall_s", [s["wall_s"]]))
        served_qps.append((clients, per_request, mbs, qps))
        table.append(f"| served API ({engine}), {clients} clients x {per_request} q/request | {s['mean_batch']:.1f} "
                     f"(mean collected) | model batches of <= {mbs}, sorted | {n} | {qps:,.0f} | {spread} | {p50:.1f} | "
                     f"{p95:.1f} | {p99:.1f} | {in_acc:.2f} | {acc:.2f} | {agree:.2f} | "
                     f"{s['peak_rss_mb']:,.0f} (server) |")  # fmt: skip

    # the physical limit
    limit_lines = ["| model | FLOPs per query (mean) | fp32 limit q/s | int8 limit q/s |", "|---|---:|---:|---:|"]
    # torch._int_mm without an int8 kernel for this CPU (no VNNI) runs a reference loop far below the fp32 peak: then
    # the int8 engines' share is taken of the fp32 limit, and the page says so.
    int8_probe = isinstance(peaks.get("int8"), float) and peaks["int8"] >= peaks.get("fp32", 0.0)
    limit_name = "int8 limit" if int8_probe else "fp32 limit (the int8 probe found no fast int8 GEMM here)"
    int8_limit: dict[str, float] = {}
    for src, run in runs.items():
        if run is None:
            continue
        config = json.loads((run / "config.json").read_text())
        flops = float(np.mean([encoder_flops(config, c) for c in counts]))
        if isinstance(peaks.get("int8" if int8_probe else "fp32"), float):
            int8_limit[src] = peaks["int8" if int8_probe else "fp32"] / flops
        cells = [f"{peaks[k] / flops:,.0f}" if k in peaks else "n/a" for k in ("fp32", "int8")]
        limit_lines.append(f"| {run.name} ({config['num_hidden_layers']} layers) | {flops / 1e6:,.1f} M | "
                           f"{cells[0]} | {cells[1]} |")  # fmt: skip
    peak_text = ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" if isinstance(v, float) else f"{k}: {v}"
                          for k, v in peaks.items())  # fmt: skip

    forced = load_before_1 > 1.5
    busy = other_cores > 0.2  # the load average after the run counts this benchmark's own threads
    lines = [
        "# Inference benchmark: CLINC150 intent run",
        "",
        f"Measured on: {raw['machine']}.",
        f"Started {started}; load average (1/5/15 min) before: {load_before[0]:.2f} / {load_before[1]:.2f} / "
        f"{load_before[2]:.2f}, after: {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} (the "
        f"benchmark's own threads included); other processes used {other_cores:.2f} cores on average while it ran."
        + (
            " Measured with --force_load on a busy machine: the timings are lower bounds, not results."
            if forced
            else " Other processes shared these cores (> 0.2 core): the timings are lower bounds."
            if busy
            else ""
        ),  # fmt: skip
        "",
        f"Run: `{runs['run']}`"
        + (f"; student: `{runs['student']}`" if runs["student"] else "")
        + ". Queries: CLINC150 "
        f"test ({len(queries)}, shuffled with seed 0; batches below {big} over the first "
        f"{min(args.latency_queries, len(queries))}). {args.threads} threads per engine. Command: "
        f"`python benchmarks/inference.py {raw['command']}`.",
        "",
        f"Each engine (and each served row) ran {repeats} time(s), in rounds over all of them: queries/s is the median "
        "round's, with the range over the rounds; latency percentiles pool the rounds' batch calls (tokenise + model + "
        "logits). Agreement is top-1 agreement with the PyTorch run of the same model (the student's own for student "
        "rows) on the same queries; peak RSS is the engine process's.",
        "",
        *[f"- {e}: {ENGINES[e][2]}" + (f" (`{n}`)" if (n := raw.get("settings", {}).get(e)) else "") for e in engines],
        "",
        *table,
        "",
        "Served rows: `querytune serve` in its own process (`--max_batch 64 --max_wait_ms 5`, "
        f"{args.threads} threads) and an asyncio httpx client in this process, on the same cores; latency is per HTTP "
        "request as the client sees it. The API answers an intent or, where the run's OOS detector rejects the query, "
        "the OOS label: its accuracy and agreement are against the PyTorch run's answers under the same detector."
        if served
        else "",
        "",
        "## Padding",
        "",
        f"Padding tokens per real token over these {len(counts)} queries (mean {np.mean(counts):.1f} tokens, max "
        f"{max(counts)}): {waste['arrival']:.2f} in batches of {big} in arrival order (one model call each, as before), "
        f"{waste['sorted']:.2f} when each batch of {big} is cut into length-sorted model batches of "
        f"{args.model_batch_size}, {waste['all_sorted']:.2f} when all queries are sorted first (`querytune predict`, "
        "`eval` and the export check: batches by token count).",
        "",
        "## Against the targets",
        "",
        f"Targets on 2 cores: {TARGETS}.",
        "",
    ]
    for engine in [e for e in engines if "int8" in e]:
        for mbs in (big, args.model_batch_size):
            s = summary.get((engine, big, mbs))
            if s is None:
                continue
            ref = summary.get(("student-pytorch" if engine.startswith("student") else "pytorch-unmerged", big, mbs))
            drop = f"{ref['in_scope'] - s['in_scope']:.2f}" if ref else "n/a"
            limit = int8_limit.get("student" if engine.startswith("student") else "run")
            share = f", {100 * s['qps'] / limit:.0f}% of the {limit_name}" if limit else ""
            lines.append(f"- {engine}, batch {big} ({'one call' if mbs == big else f'model batches of {mbs}'}): "
                         f"{s['qps']:,.0f} queries/s, agreement {s['agreement']:.2f}%, in-scope accuracy drop {drop} "
                         f"point(s){share}")  # fmt: skip
        one = summary.get((engine, 1, 1))
        if one is not None:
            lines.append(f"- {engine}, batch 1: p50 {one['p50']:.1f} ms, agreement {one['agreement']:.2f}%")
    teacher = summary.get(("pytorch-unmerged", big, big))
    student = summary.get(("student-onnx-int8", big, args.model_batch_size))
    if teacher and student:
        lines.append(f"- student int8 in-scope accuracy {student['in_scope']:.2f} vs the teacher's "
                     f"{teacher['in_scope']:.2f} (gap {teacher['in_scope'] - student['in_scope']:.2f} point)")  # fmt: skip
    for clients, per_request, mbs, qps in served_qps:
        lines.append(f"- served API, {clients} clients x {per_request} q/request, model batches of {mbs}: "
                     f"{qps:,.0f} queries/s")  # fmt: skip
    if args.note:
        lines += ["", Path(args.note).read_text().strip()]
    lines += [
        "",
        "## The physical limit",
        "",
        f"Peak GEMM throughput measured here ({args.threads} threads, best of repeated 1024^3 products): {peak_text}. "
        "FLOPs per query from each test query's token count (no padding): per layer 8nH^2 (Q, K, V, O) + 4n^2H "
        "(scores, weighted values) + 4nHI (feed-forward), plus pooler and classifier. The limit is the peak divided "
        "by the FLOPs per query: what the cores could do if every cycle went to useful multiply-adds.",
        "",
        *limit_lines,
        "",
        "## Where the time goes",
        "",
        "Tokenizer alone on the same batches vs everything else (first round):",
        "",
        *time_split,
        "",
    ]
    for engine in engines:
        prof = results[engine].get("ort_profile")
        if prof:
            lines += [f"ONNX Runtime profile of {engine} (20 batches of 64 in sorted model batches of "
                      f"{args.model_batch_size}, kernel time by operator type):", "", "| op | ms | share |",
                      "|---|---:|---:|", *[f"| {p['op']} | {p['ms']:.1f} | {100 * p['share']:.1f}% |" for p in prof],
                      ""]  # fmt: skip
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
