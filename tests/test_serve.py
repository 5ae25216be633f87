"""`querytune serve` as a real server on loopback (a subprocess on a free port), called over HTTP with httpx:
predictions from a run, its ONNX export and a joint slot run; micro-batching seen in /metrics; bad input (strict
types, unknown fields, unprintable queries, a lone surrogate among concurrent good requests, bodies over the limit);
the API key; 503 when the queue is full; 504 on timeout; graceful shutdown that answers the request in flight; a
schemathesis fuzz of the live server from its own OpenAPI schema. The batching and failure isolation of the app
itself are also tested in-process, on a stand-in run whose model call fails on chosen queries."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from querytune.cli import main
from querytune.inference import LoadedRun
from querytune.serving.export import export_run

from .conftest import REPO, SLOT_WORDS, build_tiny_checkpoint, make_slot_rows, tiny_experiment, write_jsonl

QUERIES = ["where is my order 5", "cheap shoes", "return my lamp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m querytune serve ARGS` on a free loopback port; returns once /health answers."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}  # fmt: skip
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
    export_run(intent, fmt="openvino", output_dir=tmp / "intent-openvino")
    data = tmp / "slot_data"
    write_jsonl(data / "train.jsonl", make_slot_rows(24, 0))
    write_jsonl(data / "validation.jsonl", make_slot_rows(6, 1))
    write_jsonl(data / "test.jsonl", make_slot_rows(6, 2))
    model = build_tiny_checkpoint("bert", tmp / "slot_bert", extra_words=SLOT_WORDS)
    (tmp / "joint").mkdir()
    exp = tiny_experiment(tmp / "joint", model, data, task="intent_slots", method="lora", max_steps=3)
    assert main(["train", str(exp)]) == 0
    exports = {"onnx": tmp / "intent-onnx", "openvino": tmp / "intent-openvino"}
    return {"intent": intent, **exports, "joint": tmp / "joint" / "run"}


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def server(runs, tmp_path_factory, request):
    """Every test of the live server runs against one process and against `--workers 2`."""
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    args = [f"{name}={path}" for name, path in runs.items()]
    proc, url = start_server([*args, "--max_queries", "8", "--max_query_chars", "60", "--max_wait_ms", "50",
                              "--workers", str(request.param)], log)  # fmt: skip
    deadline = time.monotonic() + 60
    while request.param > 1 and len(workers_of(proc)) < request.param and time.monotonic() < deadline:
        time.sleep(0.2)
    assert request.param == 1 or len(workers_of(proc)) == request.param
    yield url
    assert stop_server(proc) == 0, log.read_text()[-3000:]


def workers_of(proc: subprocess.Popen) -> list[int]:
    """The pids of the uvicorn worker processes `serve --workers N` started (children of the server process)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return [int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]


def post(url: str, body: object, **kw) -> httpx.Response:
    """POST a JSON body as a client may: `json.dumps` escapes a lone surrogate ("\\ud800"), which JSON allows."""
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(url, content=json.dumps(body), headers=headers, **kw)


def test_health_and_metadata(server, runs):
    health = httpx.get(f"{server}/health").json()
    assert health == {"status": "ok", "runs": ["intent", "onnx", "openvino", "joint"], "pending_requests": 0}
    meta = httpx.get(f"{server}/metadata").json()
    assert set(meta["runs"]) == {"intent", "onnx", "openvino", "joint"}
    assert meta["limits"]["max_queries_per_request"] == 8
    assert meta["limits"]["max_body_bytes"] == 1 << 20 and meta["limits"]["timeout_s"] == 30
    intent, onnx, joint = meta["runs"]["intent"], meta["runs"]["onnx"], meta["runs"]["joint"]
    assert intent["method"] == "lora" and intent["format"] == "pytorch" and intent["merged"] is True
    assert onnx["format"] == "onnx" and onnx["task"] == "intent" and onnx["base_model"] == intent["base_model"]
    assert intent["labels"] == onnx["labels"] == ["order_status", "product_search", "return_refund", "store_locator"]
    assert "test_accuracy" in intent["metrics"] and intent["metrics"] == onnx["metrics"]
    assert meta["runs"]["openvino"]["format"] == "openvino" and meta["runs"]["openvino"]["labels"] == intent["labels"]
    assert joint["task"] == "intent_slots" and "B-brand" in joint["labels"] and "order_status" in joint["intents"]
    assert intent["takes_candidates"] is False and meta["api_key_required"] is False


def test_metadata_shows_no_path_of_the_serving_machine(server, runs):
    """Run directories and the base model's local folder are names only (the tiny model lives under /tmp)."""
    text = httpx.get(f"{server}/metadata").text
    strings: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                strings.append(k)
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            strings.append(value)

    walk(json.loads(text))
    assert not [s for s in strings if s.startswith("/") or os.sep + "tmp" in s or str(runs["intent"].parent) in s]
    assert str(runs["intent"]) not in text and "pytest" not in text


def test_predict_matches_each_runs_own_predict(server, runs):
    response = httpx.post(f"{server}/predict", json={"queries": QUERIES, "top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["runs"] == ["intent", "onnx", "openvino", "joint"] and [r["query"] for r in body["results"]] == QUERIES
    expected = LoadedRun(runs["intent"]).predict(QUERIES, top_k=2)
    for result, want in zip(body["results"], expected, strict=True):
        for name in ("intent", "onnx", "openvino"):
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
        ({"queries": ["cheap shoes"] * 9}, 422, "too many queries: 9 > 8"),
        ({"queries": "cheap shoes"}, 422, "invalid request: body.queries"),
        ({"queries": ["cheap shoes"], "top_k": 0}, 422, "invalid request: body.top_k"),
        ({"queries": ["cheap shoes"], "runs": ["nope"]}, 404, "unknown run(s) ['nope']"),
        ({}, 422, "invalid request: body.queries: Field required"),
        # strict types: no coercion of a string, a boolean or a fraction into top_k (2.0 is JSON's integer 2)
        ({"queries": ["cheap shoes"], "top_k": "3"}, 422, "body.top_k: Input should be a valid integer"),
        ({"queries": ["cheap shoes"], "top_k": True}, 422, "body.top_k: Input should be a valid integer"),
        ({"queries": ["cheap shoes"], "top_k": 2.5}, 422, "body.top_k: Input should be a valid integer"),
        # the schema says runs has at least one item (found by schemathesis' checks: it was answered 200)
        ({"queries": ["cheap shoes"], "runs": []}, 422, "runs is empty"),
        ({"queries": ["cheap shoes"], "top_k": 51}, 422, "body.top_k"),
        ({"queries": [3]}, 422, "body.queries.0: Input should be a valid string"),
        ({"queries": ["cheap shoes"], "topk": 3}, 422, "body.topk: Extra inputs are not permitted"),
        ({"queries": ["cheap shoes"], "candidates": ["red shoes"]}, 422, "take no candidates (task intent)"),
        # nothing printable: control characters, zero-width characters, a lone surrogate
        ({"queries": ["ok", "\x00\x07\x1b"]}, 422, "query 1 has no printable character"),
        ({"queries": ["\u200b\u200c\ufeff "]}, 422, "query 0 has no printable character"),
        ({"queries": ["\ud800"]}, 422, "query 0 is not valid text: it holds a lone surrogate (U+D800)"),
    ],
)
def test_bad_input_gets_a_clear_4xx(server, body, status, message):
    response = post(f"{server}/predict", body)
    assert response.status_code == status and message in response.json()["error"], response.text
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_a_whole_float_top_k_is_that_integer(server):
    """JSON Schema's integer admits 2.0: the schema and the server agree (schemathesis found 50.0 refused)."""
    whole, int_ = (post(f"{server}/predict", {"queries": ["cheap shoes"], "runs": ["intent"], "top_k": k}) for k in
                   (2.0, 2))  # fmt: skip
    assert whole.status_code == int_.status_code == 200 and whole.json() == int_.json()
    assert len(whole.json()["results"][0]["predictions"]["intent"]["top_k"]) == 2


def test_a_bad_query_among_concurrent_good_ones_fails_alone(server, runs):
    """12 concurrent good requests and one holding a lone surrogate, in one batching window (50 ms): the 12 get their
    own right answers, the bad one a 422. (Before, the tokenizer's error failed the whole batch: 12 x 500.)"""
    good = [f"track package {i}" for i in range(12)]
    expected = {r["query"]: r["label"] for r in LoadedRun(runs["intent"]).predict(good)}

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            bodies = [{"queries": [q], "runs": ["intent"]} for q in good]
            bodies.insert(6, {"queries": ["track \ud800 package"], "runs": ["intent"]})
            return await asyncio.gather(*(client.post("/predict", content=json.dumps(b),
                                                      headers={"content-type": "application/json"})
                                          for b in bodies))  # fmt: skip

    for _ in range(3):  # the failure was systematic: 3 out of 3
        responses = asyncio.run(fire())
        bad = responses.pop(6)
        assert bad.status_code == 422 and "lone surrogate" in bad.json()["error"], bad.text
        assert [r.status_code for r in responses] == [200] * 12
        for query, response in zip(good, responses, strict=True):
            result = response.json()["results"][0]
            assert result["query"] == query and result["predictions"]["intent"]["label"] == expected[query]


def _raw_http(url: str, payload: bytes, timeout: float = 20) -> bytes:
    """Send raw bytes to the server and read what comes back until it closes the connection or `timeout`."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and len(b"".join(chunks)) > 200:
                    break
    return b"".join(chunks)


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    """A 60 MB Content-Length is refused at once, with only a byte of the body sent: the server never waits for the
    rest. A chunked body (no length) is refused as soon as it passes the limit."""
    start = time.monotonic()
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000000\r\n\r\n{"
    answer = _raw_http(server, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"request body too large: more than 1048576 bytes" in answer and time.monotonic() - start < 10
    chunk = b"x" * 65536
    chunked = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunked += b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(17))  # 1.06 MiB, no final chunk
    answer = _raw_http(server, chunked)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    small = json.dumps({"queries": ["cheap shoes"], "runs": ["intent"]}).encode()
    ok = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    ok += b"Connection: close\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)
    assert _raw_http(server, ok).startswith(b"HTTP/1.1 200"), "a small chunked body is read and answered"
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_the_schema_pattern_admits_exactly_the_queries_the_server_accepts():
    """Every assigned code point alone, and inside texts: the OpenAPI pattern (ECMA-262 with Unicode property
    escapes, read here by the `regex` module) matches where `query_problem` (what /predict, /search and `querytune
    predict` check) finds nothing wrong, and only there. Code points this Python's Unicode database leaves
    unassigned are refused by both when `regex`'s database agrees, and compared no further."""
    import unicodedata

    import regex

    from querytune.validation import PRINTABLE_PATTERN, query_problem

    pattern = regex.compile(PRINTABLE_PATTERN)
    disagree = [cp for cp in range(sys.maxunicode + 1)
                if (unicodedata.category(chr(cp)) != "Cn" or pattern.search(chr(cp)) is None)
                and (pattern.search(chr(cp)) is not None) != (query_problem(chr(cp)) is None)]  # fmt: skip
    assert not disagree, [hex(cp) for cp in disagree[:20]]
    for text in ("\x00\x01 \u200b\ufeff", "  \t", "\U0001f600", "\x07 café \x07", "\U000e0001", "\u2028\u00a0"):
        assert (pattern.search(text) is not None) == (query_problem(text) is None), repr(text)


def test_fuzz_the_live_server_from_its_openapi_schema(server, tmp_path):
    """schemathesis generates requests from the server's own OpenAPI schema (valid and invalid bodies, edge values)
    and runs every check it has: no 5xx, no response outside the schema, no status the schema does not list, schema-
    valid requests accepted and invalid ones refused. Bounded: 40 examples per operation, one worker, a 6-minute cap."""
    pytest.importorskip("schemathesis")
    schemathesis = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    before = httpx.get(f"{server}/metrics").text
    proc = subprocess.run(
        [schemathesis, "run", f"{server}/openapi.json", "--checks", "all", "--max-examples", "40", "--workers", "1",
         "--seed", "42", "--request-timeout", "30", "--wait-for-schema", "30", "--generation-database", "none",
         "--no-color", "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=360, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Tested: 5" in proc.stdout  # /predict, /search (404 here: no run searches), /health, /metadata, /metrics
    # every generated case passed; the one warning allowed is /search's 404 (no run here searches a catalogue)
    assert re.search(r"(\d+) generated, \1 passed", proc.stdout), proc.stdout[-3000:]
    after = httpx.get(f"{server}/metrics").text
    answered = _metric(after, 'querytune_requests_total{endpoint="/predict",status="200"}') - _metric(
        before, 'querytune_requests_total{endpoint="/predict",status="200"}')  # fmt: skip
    assert answered > 10, "the fuzzer's valid requests should reach the models and be answered"
    assert not [
        line for line in after.splitlines() if line.startswith("querytune_requests_total") and 'status="5' in line
    ]


def test_malformed_json_is_a_4xx(server):
    response = httpx.post(f"{server}/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "invalid request" in response.json()["error"]
    for path in ("/predict", "/search"):  # not UTF-8 (found by schemathesis: starlette's own 400 body, on /search)
        response = httpx.post(f"{server}{path}", content=b"p\xff\x1b", headers={"content-type": "application/json"})
        assert response.status_code == 400 and "error parsing the body" in response.json()["error"], response.text
    unknown = httpx.get(f"{server}/nowhere")
    assert unknown.status_code == 404 and unknown.json() == {"error": "Not Found"}


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


def test_two_workers_hold_their_limits_drain_on_sigint_and_replace_a_dead_worker(runs, tmp_path):
    """`--workers 2 --max_pending 1` and a 1.5 s batching window: of 6 concurrent requests at most one per worker is
    taken, the rest get 503; workers killed with SIGKILL are replaced and the replacements answer; SIGINT lets
    the requests in flight on both workers finish before the server exits 0."""
    proc, url = start_server([str(runs["onnx"]), "--max_pending", "1", "--max_wait_ms", "1500", "--workers", "2"],
                             tmp_path / "log")  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(workers_of(proc)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        first = workers_of(proc)
        assert len(first) == 2

        async def burst(n: int) -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                return await asyncio.gather(*(client.post("/predict", json={"queries": [f"track package {i}"]})
                                              for i in range(n)))  # fmt: skip

        answers = asyncio.run(burst(6))
        codes = sorted(r.status_code for r in answers)
        assert set(codes) <= {200, 503} and 1 <= codes.count(200) <= 2 and codes.count(503) >= 4, codes

        for dead in first:  # both original workers, one after the other: only their replacements are left
            os.kill(dead, signal.SIGKILL)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and (len(workers_of(proc)) < 2 or dead in workers_of(proc)):
                time.sleep(0.2)
        replaced = workers_of(proc)
        assert len(replaced) == 2 and not set(first) & set(replaced), (first, replaced)
        again = [httpx.post(f"{url}/predict", json={"queries": ["return my lamp"]}, timeout=90) for _ in range(3)]
        assert [r.status_code for r in again] == [200] * 3, [r.text for r in again]

        async def drain() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                tasks = [asyncio.create_task(client.post("/predict", json={"queries": [f"return lamp {i}"]}))
                         for i in range(6)]  # fmt: skip
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGINT)
                return await asyncio.gather(*tasks)

        answers = asyncio.run(drain())
        taken = [r for r in answers if r.status_code == 200]
        assert taken and all(r.status_code in (200, 503) for r in answers)
        assert {r.json()["results"][0]["query"] for r in taken} <= {f"return lamp {i}" for i in range(6)}
        assert proc.wait(timeout=60) == 0
    finally:
        stop_server(proc)


def test_the_workers_listener_gives_each_connection_tcp_nodelay(runs, monkeypatch):
    """With `--workers`, uvicorn binds the listener itself (`Config.bind_socket`, protocol left at 0) and asyncio then
    never sets TCP_NODELAY on the connections it accepts: each response on a keep-alive connection waited for the
    client's delayed ACK (about 40 ms on Linux). `serve --workers` hands uvicorn's process manager a listener that
    reports IPPROTO_TCP (`tcp_listener`); checked here through asyncio's own accept path."""
    import uvicorn

    from querytune.serving.api import tcp_listener

    async def accepted_nodelay(sock: socket.socket) -> int:
        loop = asyncio.get_running_loop()
        got: asyncio.Future = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                got.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await loop.create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            writer.close()
            server.close()

    config = uvicorn.Config("querytune.serving.api:worker_app", host="127.0.0.1", port=0, workers=2)
    # uvicorn's own listener: the bug (when uvicorn fixes it upstream, `tcp_listener` can go)
    assert asyncio.run(accepted_nodelay(config.bind_socket())) == 0
    listener = tcp_listener(config.bind_socket())
    assert listener.proto == socket.IPPROTO_TCP and listener.get_inheritable(), "workers inherit the listener"
    assert asyncio.run(accepted_nodelay(listener)) != 0

    # and `serve --workers 2` is what hands uvicorn's process manager such a listener
    import uvicorn.supervisors

    from querytune.serving.api import serve

    handed: list[socket.socket] = []

    class Recorder:
        def __init__(self, config, sockets):
            handed.extend(sockets)

        def run(self):
            assert asyncio.run(accepted_nodelay(handed[0])) != 0

    monkeypatch.setattr(uvicorn.supervisors, "Multiprocess", Recorder)
    serve([f"intent={runs['intent']}"], port=0, workers=2)
    assert [s.proto for s in handed] == [socket.IPPROTO_TCP]


def test_serve_refuses_bad_directories_before_starting(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing"), "--port", "1"]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["serve", f"a={tmp_path}", f"a={tmp_path}"]) == 2
    assert "two runs are named 'a'" in capsys.readouterr().err


def test_rerank_run_ranks_each_requests_candidates(tmp_path, ranking_bert, ranking_data):  # noqa: F811
    from .conftest import ranking_experiment

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


def test_api_key_timeout_and_limits_from_the_command_line(runs, tmp_path):
    """`serve --api_key_env NAME --max_body_bytes N --timeout_s S`: 401 without the key (constant-time compare of
    'Authorization: Bearer' or 'X-API-Key'), /health open; 413 over the body limit; 504 when a request waits longer
    than the timeout (a 2 s batching window against a 0.5 s timeout)."""
    args = [f"intent={runs['intent']}", "--api_key_env", "QT_TEST_KEY", "--max_body_bytes", "300", "--timeout_s",
            "0.5", "--max_wait_ms", "2000"]  # fmt: skip
    proc, url = start_server(args, tmp_path / "log", env={"QT_TEST_KEY": "s3cret-key"})
    try:
        body = {"queries": ["cheap shoes"]}
        assert post(f"{url}/predict", body).status_code == 401
        wrong = post(f"{url}/predict", body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/metadata").status_code == 401 and httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200
        for headers in ({"authorization": "Bearer s3cret-key"}, {"x-api-key": "s3cret-key"}):
            meta = httpx.get(f"{url}/metadata", headers=headers)
            assert meta.status_code == 200 and meta.json()["api_key_required"] is True
            assert "s3cret" not in meta.text
            slow = httpx.post(f"{url}/predict", json=body, headers=headers, timeout=30)
            assert slow.status_code == 504 and "not answered within 0.5 s" in slow.json()["error"]
        big = httpx.post(f"{url}/predict", json={"queries": ["x" * 400]}, headers={"x-api-key": "s3cret-key"})
        assert big.status_code == 413 and "more than 300 bytes" in big.json()["error"]
    finally:
        assert stop_server(proc) == 0
    assert main(["serve", str(runs["intent"]), "--api_key_env", "QT_UNSET_KEY_VARIABLE"]) == 2


# --- the app in-process, on a stand-in run: batching and failure isolation, 500 bodies
class StandInRun:
    """What the app needs of a loaded run; its model call fails on queries holding `fail_on` with `error`."""

    def __init__(self, fail_on: str | None = None, error: type[Exception] = ValueError, delay: float = 0.0) -> None:
        self.task = SimpleNamespace(request_inputs=(), default_top_k=3, labels=["even", "odd"],
                                    search_unsupported=lambda: "a stand-in intent run has no catalogue")  # fmt: skip
        model = SimpleNamespace(model_name_or_path="/home/someone/models/bert")
        self.config = SimpleNamespace(data=SimpleNamespace(task="intent"), model=model)
        self.info = {"base_model": "/home/someone/models/bert", "metrics": {"test_accuracy": 0.5}}
        self.method, self.format, self.merged = "full", "pytorch", False
        self.fail_on, self.error, self.delay = fail_on, error, delay
        self.calls: list[list[str]] = []

    def predict(self, texts: list[str], top_k: int | None = None, batch_size: int = 64) -> list[dict]:
        self.calls.append(list(texts))
        time.sleep(self.delay)
        if self.fail_on and any(self.fail_on in t for t in texts):
            raise self.error(f"internal detail /srv/secret {self.fail_on}")
        return [{"query": t, "label": ["even", "odd"][len(t) % 2], "score": 1.0, "top_k": []} for t in texts]


@contextlib.contextmanager
def live_app(runs: dict, **settings):
    """The app over stand-in runs, served by uvicorn in a thread on a free loopback port."""
    import uvicorn

    from querytune.serving.api import ServeSettings, create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runs, ServeSettings(**settings)), host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


async def _fire(url: str, queries: list[str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post("/predict", json={"queries": [q]}) for q in queries))


@pytest.mark.parametrize(("error", "status"), [(ValueError, 422), (TypeError, 422), (RuntimeError, 500)])
def test_a_failing_batch_is_rescored_request_by_request(error, status):
    """The model call of a batch raises because of one request: every request is scored again alone, the good ones
    are answered, and only the bad one fails: 422 for an input error (with the error's message: a task's ValueError
    says what the request lacks), 500 for anything else, with no exception text."""
    run = StandInRun(fail_on="boom", error=error)
    queries = [f"query number {i}" for i in range(12)]
    queries.insert(5, "boom here")
    with live_app({"m": run}, max_wait_ms=300) as url:
        responses = asyncio.run(_fire(url, queries))
        metrics = httpx.get(f"{url}/metrics").text
    bad = responses.pop(5)
    assert bad.status_code == status
    if status == 500:
        assert bad.json() == {"error": "internal error while scoring the request (see the server log)"}
    else:
        assert bad.json()["error"].startswith("the request could not be scored: internal detail")
    assert [r.status_code for r in responses] == [200] * 12
    for q, r in zip([q for q in queries if q != "boom here"], responses, strict=True):
        assert r.json()["results"][0] == {"query": q, "predictions": {"m": {"label": ["even", "odd"][len(q) % 2],
                                                                           "score": 1.0, "top_k": []}}}  # fmt: skip
    assert max(len(c) for c in run.calls) > 1, "the requests were never batched"
    assert sum(1 for c in run.calls if c == ["boom here"]) == 1, "the bad request was not scored alone"
    assert 'querytune_batch_retries_total{run="m"}' in metrics


def test_stand_in_metadata_and_timeouts():
    run = StandInRun(delay=1.0)
    with live_app({"m": run}, timeout_s=0.2) as url:
        meta = httpx.get(f"{url}/metadata").json()
        assert meta["runs"]["m"]["base_model"] == "bert" and "/home" not in json.dumps(meta)
        slow = httpx.post(f"{url}/predict", json={"queries": ["a"]})
        assert slow.status_code == 504
        time.sleep(1.2)  # the model call finishes after its client has gone: nothing breaks
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "runs": ["m"], "pending_requests": 0}
