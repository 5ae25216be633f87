"""Scoring query logs of any size: streamed in chunks (bounded memory), text / JSON lines / parquet in and out, a killed
job resumed without rescoring what was written, and Ray Data's `map_batches` giving the same rows as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from querytune.cli import main
from querytune.inference import LoadedRun
from querytune.scoring import score_file

from .conftest import REPO, make_rows, tiny_experiment

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def intent_run(tmp_path_factory, tiny_bert, tiny_data) -> Path:
    from querytune.config import load_config
    from querytune.train import run

    tmp = tmp_path_factory.mktemp("scoring")
    return run(load_config(tiny_experiment(tmp, tiny_bert, tiny_data, max_steps=4))).output_dir


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> tuple[Path, list[str]]:
    """A query log of 2,500 lines with blank ones between (skipped)."""
    folder = tmp_path_factory.mktemp("log")
    queries = [r["text"] for r in make_rows(625, 7)]
    (folder / "log.txt").write_text("".join(q + ("\n\n" if i % 97 == 0 else "\n") for i, q in enumerate(queries)))
    return folder / "log.txt", queries


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_log_streams_in_chunks_and_equals_one_call(intent_run, log, tmp_path):
    src, queries = log
    loaded = LoadedRun(intent_run)
    expected = loaded.predict(queries)
    calls = []
    real = loaded.predict
    loaded.predict = lambda texts, **kw: calls.append(len(texts)) or real(texts, **kw)
    counts = score_file(loaded, src, tmp_path / "out.jsonl", chunk_size=400)
    assert counts == {"skipped": 0, "scored": len(queries)}
    assert max(calls) == 400 and sum(calls) == len(queries), "read, scored and written 400 at a time"
    assert _jsonl(tmp_path / "out.jsonl") == expected, "the same rows, in the log's order"


def test_parquet_in_and_out(intent_run, log, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, queries = log
    pq.write_table(pa.table({"q": queries, "other": list(range(len(queries)))}), tmp_path / "log.parquet")
    assert main(["predict", str(intent_run), "--file", str(tmp_path / "log.parquet"), "--column", "q", "--output",
                 str(tmp_path / "out.parquet"), "--chunk_size", "1000"]) == 0  # fmt: skip
    parts = sorted((tmp_path / "out.parquet").glob("part-*.parquet"))
    assert len(parts) == 3, "one part per chunk"
    table = pq.ParquetDataset(tmp_path / "out.parquet").read()
    assert table.column("query").to_pylist() == queries
    expected = LoadedRun(intent_run).predict(queries)
    assert [json.loads(p) for p in table.column("prediction").to_pylist()] == expected
    assert main(["predict", str(intent_run), "--file", str(tmp_path / "log.parquet"), "--output",
                 str(tmp_path / "x.jsonl")]) == 2, "a missing column is an error naming the columns there are"  # fmt: skip


@pytest.mark.slow
def test_a_killed_job_resumes_without_rescoring(intent_run, log, tmp_path):
    """SIGKILL after the second chunk: rerunning the same command scores only the rest, and the output equals an
    uninterrupted job's, line for line."""
    src, queries = log
    out = tmp_path / "out.jsonl"
    hook = tmp_path / "hold.py"
    hook.write_text(
        "import os, sys, time\n"
        "from querytune import scoring\n"
        "from querytune.cli import main\n"
        "real, seen = scoring.Sink.write, []\n"
        "def write(self, results):\n"
        "    real(self, results)\n"
        "    seen.append(len(results))\n"
        "    if len(seen) == 2:\n"
        "        open(sys.argv[1], 'w').write('held')\n"
        "        time.sleep(3600)\n"
        "scoring.Sink.write = write\n"
        "sys.exit(main(sys.argv[2:]))\n"
    )  # fmt: skip
    argv = ["predict", str(intent_run), "--file", str(src), "--output", str(out), "--chunk_size", "500"]
    flag = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, str(hook), str(flag), *argv], env=ENV, cwd=REPO)
    deadline = time.monotonic() + 300
    while not flag.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with out.open("a") as fh:
        fh.write('{"query": "a line cut by the kill')  # a partial last line is dropped and scored again
    assert len(out.read_text().splitlines()) == 1001
    resumed = subprocess.run([sys.executable, "-m", "querytune", *argv], env=ENV, cwd=REPO, capture_output=True,
                             text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(queries) - 1000} queries scored, 1000 already there" in resumed.stderr
    assert _jsonl(out) == LoadedRun(intent_run).predict(queries)


def test_stdout_gets_the_results_and_only_them(intent_run, log, tmp_path):
    src, queries = log
    proc = subprocess.run([sys.executable, "-m", "querytune", "predict", str(intent_run), "first query", "--file",
                           str(src), "--chunk_size", "700"], env=ENV, cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["query"] for r in rows] == ["first query", *queries], "arguments first, then the log"


@pytest.mark.slow
def test_ray_data_map_batches_gives_the_same_rows(intent_run, log, tmp_path):
    """A local Ray cluster, `map_batches` over the exported model: the rows of one process, row for row."""
    ray = pytest.importorskip("ray", reason="pip install 'querytune[ray]'")
    from querytune.scoring import RayScorer
    from querytune.serving.export import export_run

    src, queries = log
    export_run(intent_run, fmt="onnx", output_dir=tmp_path / "onnx")
    # 4 logical CPUs: the 2 scoring actors hold one each, and Ray Data's own tasks (the repartition) need the others
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {
        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}})  # fmt: skip
    try:
        ds = ray.data.from_items([{"text": q} for q in queries]).repartition(4)
        scored = ds.map_batches(RayScorer, fn_constructor_kwargs={"run_dir": str(tmp_path / "onnx")}, batch_size=300,
                                num_cpus=1, concurrency=2, batch_format="pandas")  # fmt: skip
        rows = scored.to_pandas()
    finally:
        ray.shutdown()
    by_query = dict(zip(rows["query"], rows["prediction"], strict=True))
    expected = score_file(LoadedRun(tmp_path / "onnx"), src, tmp_path / "one.jsonl", chunk_size=1000)
    assert expected["scored"] == len(queries) == len(rows)
    for r in _jsonl(tmp_path / "one.jsonl"):
        assert json.loads(by_query[r["query"]]) == r
