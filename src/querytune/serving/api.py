"""An HTTP JSON API over finished runs and exports (FastAPI + uvicorn), with micro-batching and Prometheus metrics.

querytune serve RUN_OR_EXPORT_DIR [NAME=DIR ...] [--host 127.0.0.1 --port 8000]

POST /predict {"queries": ["where is my package"], "top_k": 3, "runs": null}
  -> {"runs": [...], "results": [{"query": ..., "predictions": {RUN: <the task's predict result>}}]}
  A rerank (cross-encoder) run also takes "candidates": the documents it ranks for every query.
POST /search {"query": "angle bracket", "top_k": 10} -> products by a run that searches a catalogue (serving/search.py).
GET /health, GET /metadata (base model, method, labels, metrics per run), GET /metrics (Prometheus).

Requests that arrive within `max_wait_ms` of each other are scored in one model call (up to `max_batch` queries):
one asyncio worker per run collects them from a queue and runs the model in its own thread, so the event loop keeps
accepting requests. At most `max_pending` requests wait or run at once; more get 503. On SIGINT/SIGTERM uvicorn stops
accepting connections and the requests already in flight are answered before the workers stop.

One bad request never fails another: each is validated on its own before it is queued (strict types, no unknown
fields, queries with a printable character, limits), and a batch whose model call raises is scored again request
by request, so only the request at fault fails (422, or 500 for a model failure; 500 bodies carry no exception
text). A body over `max_body_bytes` gets 413 before it is read, a request not answered within `timeout_s` gets 504,
and with an API key every endpoint but /health needs it (401). /metadata shows no path of the serving machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from querytune.serving.batcher import MicroBatcher, ScoringError
from querytune.serving.metrics import Metrics
from querytune.serving.middleware import install
from querytune.serving.schemas import (
    ERRORS,
    AsciiJSONResponse,
    PredictRequest,
    PredictResponse,
    ServeSettings,
    error,
    request_inputs,
)
from querytune.serving.search import register_search
from querytune.validation import PRINTABLE_PATTERN, query_problem

__all__ = ["ServeSettings", "create_app", "run_names", "serve", "serving_metadata", "worker_app"]

logger = logging.getLogger(__name__)


def _public(value: Any) -> Any:
    """A model name as /metadata shows it: a Hub id as it is, a local path by its folder name only."""
    if isinstance(value, str) and (os.path.isabs(value) or os.sep in value and Path(value).exists()):
        return Path(value).name
    return value


def _takes(loaded: Any) -> set[str]:
    """The names of the request inputs a loaded run's task takes."""
    return {getattr(spec, "name", spec) for spec in loaded.task.request_inputs}


def serving_metadata(loaded: Any) -> dict[str, Any]:
    """What `GET /metadata` says about a loaded run or export (no paths of the serving machine)."""
    info = loaded.info or {}
    task = loaded.task
    meta = {
        "task": loaded.config.data.task,
        "base_model": _public(info.get("base_model", loaded.config.model.model_name_or_path)),
        "method": loaded.method,
        "format": loaded.format,
        "quantize": info.get("quantize"),
        "merged": loaded.merged,
        "labels": task.labels,
        "metrics": {k: v for k, v in info.get("metrics", {}).items() if not (isinstance(v, str) and os.path.isabs(v))},
        **{f"takes_{name}": name in _takes(loaded) for name in request_inputs()},
    }
    extra = getattr(task, "metadata", None)  # what the task adds (the joint task's intents)
    return meta | (extra() if extra else {})


def create_app(runs: dict[str, Any], settings: ServeSettings | None = None) -> FastAPI:
    """The API over loaded runs and exports (`querytune.inference.LoadedRun`, by name)."""
    if not runs:
        raise ValueError("serve needs at least one run or export directory")
    settings = settings or ServeSettings()
    metrics = Metrics()
    state: dict[str, Any] = {"pending": 0, "draining": False, "batchers": {}}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batchers = {name: MicroBatcher(name, loaded, settings, metrics) for name, loaded in runs.items()}
        for b in batchers.values():
            b.start()
        state["batchers"] = batchers
        yield
        # uvicorn has stopped accepting connections and waited for open requests; finish anything still queued.
        state["draining"] = True
        deadline = time.monotonic() + settings.drain_timeout_s
        while (state["pending"] or not all(b.idle for b in batchers.values())) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for b in batchers.values():
            await b.stop()
        metrics.process_exited()

    app = FastAPI(title="querytune", lifespan=lifespan, default_response_class=AsciiJSONResponse)
    app.openapi = lambda: _openapi(app, settings, runs)
    app.state.settings = settings
    app.state.metrics = metrics
    guarded = install(app, settings, metrics)
    _add_info_routes(app, runs, settings, metrics, state, guarded)
    _add_predict(app, runs, settings, metrics, state, guarded)
    # POST /search (serving/search.py): runs that search a catalogue; searches run in the run's model thread.
    register_search(app, runs, settings.max_query_chars,
                    lambda name: getattr(state["batchers"].get(name), "executor", None), guarded)  # fmt: skip
    return app


def _add_info_routes(app: FastAPI, runs: dict[str, Any], settings: ServeSettings, metrics: Metrics,
                     state: dict[str, Any], guarded: list) -> None:  # fmt: skip
    """GET /health, /metadata and /metrics."""
    metadata = {name: serving_metadata(loaded) for name, loaded in runs.items()}

    @app.get("/health", responses={200: {"description": "up (or draining)"}})
    async def health() -> dict[str, Any]:
        return {"status": "draining" if state["draining"] else "ok", "runs": list(runs),
                "pending_requests": state["pending"]}  # fmt: skip

    @app.get("/metadata", dependencies=guarded, responses={401: ERRORS[401]})
    async def get_metadata() -> dict[str, Any]:
        limits = {k: getattr(settings, k) for k in ("max_batch", "max_wait_ms", "max_queries_per_request",
                                                    "max_query_chars", "max_pending", "max_body_bytes",
                                                    "timeout_s")}  # fmt: skip
        return {"runs": metadata, "limits": limits, "api_key_required": bool(settings.api_key)}

    @app.get("/metrics", dependencies=guarded, response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"},
                        401: ERRORS[401]})  # fmt: skip
    async def get_metrics() -> Response:
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)


def _request_problem(body: Any, runs: dict[str, Any], settings: ServeSettings) -> tuple[int, str] | None:
    """What is wrong with a /predict request before it is queued (status and message), or None."""
    inputs = {name: getattr(body, name) for name in request_inputs() if getattr(body, name) is not None}
    if not body.queries:
        return 422, "queries is empty: send at least one query"
    if body.runs is not None and not body.runs:
        return 422, "runs is empty: name at least one loaded run, or leave runs out to ask them all"
    if len(body.queries) > settings.max_queries_per_request:
        return 422, (f"too many queries: {len(body.queries)} > {settings.max_queries_per_request} per request; "
                     "split the batch")  # fmt: skip
    for name, texts in inputs.items():
        if len(texts) > settings.max_queries_per_request:
            return 422, f"too many {name}: {len(texts)} > {settings.max_queries_per_request}"
    specs = request_inputs()
    for kind, texts in (("query", body.queries), *((specs[n].item, t) for n, t in inputs.items())):
        for i, text in enumerate(texts):
            problem = query_problem(text, settings.max_query_chars)
            if problem:
                return 422, f"{kind} {i} {problem}"
    names = body.runs or list(runs)
    unknown = [n for n in names if n not in runs]
    if unknown:
        return 404, f"unknown run(s) {unknown}; loaded: {list(runs)}"
    for name in inputs:
        refuse = [n for n in names if name not in _takes(runs[n])]
        if refuse:
            return 422, (f"{name}: run(s) {refuse} take no {name} (task {runs[refuse[0]].config.data.task}); ask "
                         f'only runs that take {name}, with "runs"')  # fmt: skip
    return None


def _add_predict(app: FastAPI, runs: dict[str, Any], settings: ServeSettings, metrics: Metrics,
                 state: dict[str, Any], guarded: list) -> None:  # fmt: skip
    """POST /predict: each request checked on its own, then queued to every asked run's micro-batcher."""

    @app.post("/predict", dependencies=guarded, response_model=PredictResponse,
              responses={k: v for k, v in ERRORS.items() if k != 401 or settings.api_key})  # fmt: skip
    async def predict(body: PredictRequest) -> Any:
        problem = _request_problem(body, runs, settings)
        if problem:
            return error(*problem)
        if state["draining"]:
            return error(503, "server is shutting down")
        if state["pending"] >= settings.max_pending:
            return error(503, f"server busy: {state['pending']} requests pending (max_pending "
                              f"{settings.max_pending}); retry shortly", headers={"Retry-After": "1"})  # fmt: skip
        names = body.runs or list(runs)
        inputs = {name: getattr(body, name) for name in request_inputs()}
        metrics.request_queries.observe(len(body.queries))
        state["pending"] += 1
        metrics.pending.set(state["pending"])
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*(state["batchers"][n].submit(body.queries, body.top_k, inputs) for n in names)),
                settings.timeout_s,
            )
        except TimeoutError:
            return error(504, f"not answered within {settings.timeout_s:g} s (timeout_s)")
        except ScoringError as err:
            return error(err.status, err.message)
        finally:
            state["pending"] -= 1
            metrics.pending.set(state["pending"])
        results = []
        for i, query in enumerate(body.queries):
            per_run = {n: {k: v for k, v in answer[i].items() if k != "query"}
                       for n, answer in zip(names, answers, strict=True)}  # fmt: skip
            results.append({"query": query, "predictions": per_run})
        return {"runs": names, "results": results}


def _openapi(app: FastAPI, settings: ServeSettings, runs: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI schema, with this server's real limits on a request: how many queries, how long, which run
    names, and a task input (`candidates`) only where a loaded run takes it. The checks stay the app's own (422 for
    too many queries, the messages above); the schema says what will pass them, for clients and for fuzzers."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        props = schema["components"]["schemas"]["PredictRequest"]["properties"]
        text = {
            "type": "string",
            "minLength": 1,
            "maxLength": settings.max_query_chars,
            "pattern": PRINTABLE_PATTERN,
        }
        texts = {"type": "array", "items": text, "minItems": 1, "maxItems": settings.max_queries_per_request}
        props["queries"].update(texts)
        schema["components"]["schemas"]["SearchRequest"]["properties"]["query"].update(text)
        # pydantic writes top_k's bounds as "ge" / "le" (its BeforeValidator hides them from JSON Schema)
        props["top_k"]["anyOf"][0] = {"type": "integer", "minimum": 1, "maximum": 50}
        props["runs"]["anyOf"][0].update(items={"type": "string", "enum": list(runs)}, minItems=1)
        for name in request_inputs():
            if any(name in _takes(loaded) for loaded in runs.values()):
                props[name]["anyOf"][0].update(texts)
            else:
                props[name] = {"type": "null", "description": f"no loaded run takes {name}"}
        app.openapi_schema = schema
    return app.openapi_schema


def run_names(paths: list[str]) -> dict[str, Path]:
    """`NAME=DIR` or `DIR` (named after the folder, or parent/folder where two folders share a name)."""
    named: dict[str, Path] = {}
    for spec in paths:
        name, sep, path = spec.partition("=")
        if not sep:
            path, p = spec, Path(spec)
            name = p.resolve().name
            if p.resolve().parent.name == "exports":  # runs/x/exports/onnx-int8 -> x/onnx-int8
                name = f"{p.resolve().parent.parent.name}/{name}"
            if name in named:
                name = f"{p.resolve().parent.name}/{name}"
        if not name or name in named:
            raise ValueError(f"two runs are named {name!r}; name them with NAME=DIR")
        named[name] = Path(path)
    return named


WORKER_ENV = "QUERYTUNE_SERVE_WORKER"  # what each `serve --workers N` worker loads (JSON), set by `serve`


def serve(paths: list[str], host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
          threads: int | None = None, log_level: str = "info", trust_remote_code: bool = False,
          allow_status: tuple[str, ...] | str | None = ("finished",), workers: int = 1) -> None:  # fmt: skip
    """Load every run or export (errors before the server starts), then serve until SIGINT/SIGTERM.

    `workers` > 1: uvicorn's process manager starts that many worker processes on one socket, each loading its own
    copy of every run with `threads` threads (default: the cores divided among the workers) and its own
    micro-batcher; a worker that dies is replaced. The limits (`max_pending`, the body and query limits, the timeout)
    hold per worker; `/metrics` sums all workers.
    """
    import uvicorn

    from querytune import progress
    from querytune.inference import load_run

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    settings = settings or ServeSettings()
    progress.set_enabled(False)  # the server's model calls are short: no bars in its log
    named = run_names(paths)
    if workers > 1 and threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
    runs = {name: load_run(path, threads, trust_remote_code=trust_remote_code, allow_status=allow_status)
            for name, path in named.items()}  # fmt: skip
    timeout = int(settings.drain_timeout_s)
    if workers == 1:
        uvicorn.run(create_app(runs, settings), host=host, port=port, log_level=log_level,
                    timeout_graceful_shutdown=timeout)  # fmt: skip
        return
    del runs  # loaded once here only to refuse a bad run before any worker starts
    import dataclasses
    import tempfile

    from querytune.serving.metrics import MULTIPROC_ENV

    spec = {"runs": {name: str(Path(path).resolve()) for name, path in named.items()}, "threads": threads,
            "trust_remote_code": trust_remote_code, "allow_status": allow_status,
            "settings": dataclasses.asdict(settings)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="querytune-metrics-") as metrics_dir:
        os.environ[WORKER_ENV], os.environ[MULTIPROC_ENV] = json.dumps(spec), metrics_dir
        try:
            from uvicorn.supervisors import Multiprocess

            # uvicorn.run's workers path, with a listener that keeps TCP_NODELAY (`tcp_listener`)
            config = uvicorn.Config("querytune.serving.api:worker_app", factory=True, workers=workers, host=host,
                                    port=port, log_level=log_level, timeout_graceful_shutdown=timeout)  # fmt: skip
            with contextlib.suppress(KeyboardInterrupt):
                Multiprocess(config, sockets=[tcp_listener(config.bind_socket())]).run()
        finally:
            os.environ.pop(WORKER_ENV, None)
            os.environ.pop(MULTIPROC_ENV, None)


def tcp_listener(sock: socket.socket) -> socket.socket:
    """`sock` as a socket that reports IPPROTO_TCP (the same file descriptor), so that its accepted connections get
    TCP_NODELAY. asyncio sets TCP_NODELAY on an accepted connection only when the listener says IPPROTO_TCP, and
    uvicorn's `Config.bind_socket` (the `--workers` path) leaves the protocol at 0 (uvicorn issue 3149): every response
    on a keep-alive connection then waited for the client's delayed ACK, about 40 ms on Linux."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto != socket.IPPROTO_TCP:
        inheritable = sock.get_inheritable()
        sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
        sock.set_inheritable(inheritable)
    return sock


def worker_app() -> FastAPI:
    """One `serve --workers N` worker's app (uvicorn's factory): loads the runs that `serve` checked."""
    from querytune import progress
    from querytune.inference import load_run

    progress.set_enabled(False)
    spec = json.loads(os.environ[WORKER_ENV])
    allow = spec["allow_status"]
    runs = {name: load_run(path, spec["threads"], trust_remote_code=spec["trust_remote_code"],
                           allow_status=tuple(allow) if isinstance(allow, list) else allow)
            for name, path in spec["runs"].items()}  # fmt: skip
    return create_app(runs, ServeSettings(**spec["settings"]))
