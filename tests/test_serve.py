"""`querytune serve` as a real server on loopback (a subprocess on a free port), called over HTTP with httpx:
predictions from a run, its ONNX export and a joint slot run; micro-batching seen in /metrics; bad input; 503 when
the queue is full; graceful shutdown that answers the request in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from querytune.cli import main
from querytune.inference import LoadedRun
from querytune.serving.export import export_run

from .conftest import REPO, build_tiny_checkpoint, tiny_experiment, write_jsonl
from .test_ranking import ranking_bert, ranking_data  # noqa: F401  (fixtures: the tiny ranking corpus and model)
from .test_slots import SLOT_WORDS, make_slot_rows

QUERIES = ["where is my order 5", "cheap shoes", "return my lamp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m querytune serve ARGS` on a free loopback port; returns once /health answers."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    fh = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "querytune", "serve", *args, "--port", str(port), "--threads", "1"],
                            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not start:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert, tiny_data) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve_runs")
    (tmp / "intent").mkdir()
    exp = tiny_experiment(tmp / "intent", tiny_bert, tiny_data, method="lora", max_steps=4)
    assert main(["train", str(exp)]) == 0
    intent = tmp / "intent" / "run"
    export_run(intent, fmt="onnx", output_dir=tmp / "intent-onnx")
    data = tmp / "slot_data"
    write_jsonl(data / "train.jsonl", make_slot_rows(24, 0))
    write_jsonl(data / "validation.jsonl", make_slot_rows(6, 1))
    write_jsonl(data / "test.jsonl", make_slot_rows(6, 2))
    model = build_tiny_checkpoint("bert", tmp / "slot_bert", extra_words=SLOT_WORDS)
    (tmp / "joint").mkdir()
    exp = tiny_experiment(tmp / "joint", model, data, task="intent_slots", method="lora", max_steps=3)
    assert main(["train", str(exp)]) == 0
    return {"intent": intent, "onnx": tmp / "intent-onnx", "joint": tmp / "joint" / "run"}


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    args = [f"{name}={path}" for name, path in runs.items()]
    proc, url = start_server([*args, "--max_queries", "8", "--max_query_chars", "60", "--max_wait_ms", "50"], log)
    yield url
    assert stop_server(proc) == 0, log.read_text()[-3000:]


def test_health_and_metadata(server, runs):
    health = httpx.get(f"{server}/health").json()
    assert health == {"status": "ok", "runs": ["intent", "onnx", "joint"], "pending_requests": 0}
    meta = httpx.get(f"{server}/metadata").json()
    assert set(meta["runs"]) == {"intent", "onnx", "joint"} and meta["limits"]["max_queries_per_request"] == 8
    intent, onnx, joint = meta["runs"]["intent"], meta["runs"]["onnx"], meta["runs"]["joint"]
    assert intent["method"] == "lora" and intent["format"] == "pytorch" and intent["merged"] is True
    assert onnx["format"] == "onnx" and onnx["task"] == "intent" and onnx["base_model"] == intent["base_model"]
    assert intent["labels"] == onnx["labels"] == ["order_status", "product_search", "return_refund", "store_locator"]
    assert "test_accuracy" in intent["metrics"] and intent["metrics"] == onnx["metrics"]
    assert joint["task"] == "intent_slots" and "B-brand" in joint["labels"] and "order_status" in joint["intents"]


def test_predict_matches_each_runs_own_predict(server, runs):
    response = httpx.post(f"{server}/predict", json={"queries": QUERIES, "top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["runs"] == ["intent", "onnx", "joint"] and [r["query"] for r in body["results"]] == QUERIES
    expected = LoadedRun(runs["intent"]).predict(QUERIES, top_k=2)
    for result, want in zip(body["results"], expected, strict=True):
        for name in ("intent", "onnx"):
            got = result["predictions"][name]
            assert got["label"] == want["label"] and got["score"] == pytest.approx(want["score"], abs=1e-4)
            assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
        joint = result["predictions"]["joint"]
        assert set(joint) == {"intent", "intent_score", "top_k", "spans"} and len(joint["top_k"]) == 2
    one = httpx.post(f"{server}/predict", json={"queries": ["red nike boots"], "runs": ["joint"], "top_k": 1}).json()
    assert one["runs"] == ["joint"] and set(one["results"][0]["predictions"]) == {"joint"}
    for span in one["results"][0]["predictions"]["joint"]["spans"]:
        assert "red nike boots"[span["start"] : span["end"]] == span["text"]


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_concurrent_requests_are_micro_batched(server):
    before = httpx.get(f"{server}/metrics").text
    n = 24

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            return await asyncio.gather(*(client.post("/predict", json={"queries": [f"cheap shoes {i}"],
                                                                        "runs": ["onnx"]}) for i in range(n)))  # fmt: skip

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["results"][0]["query"] for r in responses] == [f"cheap shoes {i}" for i in range(n)]
    after = httpx.get(f"{server}/metrics").text
    calls = _metric(after, 'querytune_batch_size_count{run="onnx"}') - _metric(before, 'querytune_batch_size_count{run="onnx"}')  # fmt: skip
    queries = _metric(after, 'querytune_batch_size_sum{run="onnx"}') - _metric(before, 'querytune_batch_size_sum{run="onnx"}')  # fmt: skip
    assert queries == n and calls < n, f"{n} single-query requests took {calls} model calls"
    assert _metric(after, 'querytune_requests_total{endpoint="/predict",status="200"}') >= n
    assert "querytune_request_latency_seconds_bucket" in after


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"queries": []}, 422, "queries is empty"),
        ({"queries": ["ok", "  "]}, 422, "query 1 is empty"),
        ({"queries": ["x" * 61]}, 422, "query 0 is too long: 61 characters > 60"),
        ({"queries": ["cheap shoes"] * 9}, 413, "too many queries: 9 > 8"),
        ({"queries": "cheap shoes"}, 422, "invalid request: body.queries"),
        ({"queries": ["cheap shoes"], "top_k": 0}, 422, "invalid request: body.top_k"),
        ({"queries": ["cheap shoes"], "runs": ["nope"]}, 404, "unknown run(s) ['nope']"),
        ({}, 422, "invalid request: body.queries: Field required"),
    ],
)
def test_bad_input_gets_a_clear_4xx(server, body, status, message):
    response = httpx.post(f"{server}/predict", json=body)
    assert response.status_code == status and message in response.json()["error"], response.text
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_malformed_json_is_a_4xx(server):
    response = httpx.post(f"{server}/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "invalid request" in response.json()["error"]


def test_full_queue_gets_503_and_shutdown_drains_in_flight(runs, tmp_path):
    """max_pending 1 and a 1.5 s batching window: a second request is refused while the first waits; SIGINT then
    lets the first one finish before the server exits."""
    proc, url = start_server([str(runs["onnx"]), "--max_pending", "1", "--max_wait_ms", "1500"], tmp_path / "log")
    try:

        async def scenario() -> tuple[httpx.Response, httpx.Response, float]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                first = asyncio.create_task(client.post("/predict", json={"queries": ["track package 7"]}))
                await asyncio.sleep(0.4)
                second = await client.post("/predict", json={"queries": ["cheap shoes"]})
                proc.send_signal(signal.SIGINT)  # graceful shutdown with the first request in flight
                sent = time.monotonic()
                answer = await first
                return answer, second, time.monotonic() - sent

        first, second, _ = asyncio.run(scenario())
        assert second.status_code == 503 and "server busy" in second.json()["error"]
        assert second.headers["retry-after"] == "1"
        assert first.status_code == 200 and first.json()["results"][0]["query"] == "track package 7"
        assert proc.wait(timeout=30) == 0
    finally:
        stop_server(proc)


def test_serve_refuses_bad_directories_before_starting(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing"), "--port", "1"]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["serve", f"a={tmp_path}", f"a={tmp_path}"]) == 2
    assert "two runs are named 'a'" in capsys.readouterr().err


def test_rerank_run_ranks_each_requests_candidates(tmp_path, ranking_bert, ranking_data):  # noqa: F811
    from .test_ranking import ranking_experiment

    exp = ranking_experiment(tmp_path, ranking_bert, ranking_data, "rerank", method="lora", max_steps=3)
    assert main(["train", str(exp)]) == 0
    export_run(tmp_path / "run", fmt="onnx", output_dir=tmp_path / "onnx")
    proc, url = start_server([f"rerank={tmp_path / 'onnx'}"], tmp_path / "log")
    try:
        candidates = ["blue tent pack", "red shoes set", "red lamp"]
        body = httpx.post(f"{url}/predict", json={"queries": ["red shoes", "blue tent"], "candidates": candidates})
        assert body.status_code == 200, body.text
        expected = LoadedRun(tmp_path / "run").task
        run = LoadedRun(tmp_path / "run")
        for result in body.json()["results"]:
            want = expected.predict(run, [result["query"]], top_k=0, candidates=candidates)[0]["ranked"]
            got = result["predictions"]["rerank"]["ranked"]
            assert [h["text"] for h in got] == [h["text"] for h in want]
            assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=1e-4)
        top1 = httpx.post(f"{url}/predict", json={"queries": ["red shoes"], "candidates": candidates, "top_k": 1})
        assert len(top1.json()["results"][0]["predictions"]["rerank"]["ranked"]) == 1
        missing = httpx.post(f"{url}/predict", json={"queries": ["red shoes"]})
        assert missing.status_code == 422 and "no candidates" in missing.json()["error"]
        empty = httpx.post(f"{url}/predict", json={"queries": ["red shoes"], "candidates": ["ok", ""]})
        assert empty.status_code == 422 and "candidate 1 is empty" in empty.json()["error"]
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    finally:
        assert stop_server(proc) == 0
