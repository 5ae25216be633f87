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
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from querytune.batching import predict_queued
from querytune.serving.search import register_search
from querytune.validation import query_problem

logger = logging.getLogger(__name__)
DEFAULT_TOP_K = 3


@dataclass
class ServeSettings:
    """Limits, batching and access of the API."""

    max_batch: int = 64  # queries collected per batch
    model_batch_size: int = 16  # queries per model call: a collected batch is scored in length-sorted model batches
    max_wait_ms: float = 5.0  # how long the first queued request waits for others to join its batch
    max_queries_per_request: int = 64
    max_query_chars: int = 512
    max_pending: int = 256  # requests waiting or running at once; beyond this: 503
    drain_timeout_s: float = 30.0
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are read
    timeout_s: float = 30.0  # a request not answered in time gets 504
    api_key: str | None = field(default=None, repr=False)  # required on every endpoint but /health when set

    def __post_init__(self) -> None:
        for name in ("max_batch", "model_batch_size", "max_queries_per_request", "max_query_chars", "max_pending",
                     "max_body_bytes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


class PredictRequest(BaseModel):
    """A /predict request. Types are strict ("3", true or 2.0 are no top_k) and unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    queries: list[str] = Field(description="the queries to label (a batch)")
    top_k: int | None = Field(None, ge=1, le=50, description="labels per query (default 3); rerank: documents (all)")
    runs: list[str] | None = Field(None, description="names of the loaded runs to ask (default: all)")
    candidates: list[str] | None = Field(
        None, description="the documents to rank for every query: only for runs whose task takes them (rerank)"
    )


class QueryResult(BaseModel):
    query: str
    predictions: dict[str, dict[str, Any]] = Field(description="each run's prediction for the query, by run name")


class PredictResponse(BaseModel):
    runs: list[str]
    results: list[QueryResult]


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in one line")
    detail: list[dict[str, Any]] | None = Field(None, description="validation errors (422): loc, msg, type")


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a name or text holding a lone surrogate (valid in JSON, not in
    UTF-8) can never break the encoding of a response, and so never turns an error into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class Metrics:
    """The Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("querytune_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("querytune_request_latency_seconds", "request latency", ["endpoint"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=self.registry)  # fmt: skip
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
        self.batch_size = Histogram("querytune_batch_size", "queries per model call", ["run"], buckets=sizes,
                                    registry=self.registry)  # fmt: skip
        self.request_queries = Histogram("querytune_request_queries", "queries per /predict request", buckets=sizes,
                                         registry=self.registry)  # fmt: skip
        self.pending = Gauge("querytune_pending_requests", "/predict requests waiting or running",
                             registry=self.registry)  # fmt: skip
        self.retries = Counter("querytune_batch_retries", "batches that failed and were re-scored request by request",
                               ["run"], registry=self.registry)  # fmt: skip


class ScoringError(Exception):
    """A request that failed on its own, scored alone: its HTTP status and a message safe to send back."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# What a model call raises for a bad input (a text the tokenizer refuses, a task's ValueError): the request's fault.
_INPUT_ERRORS = (ValueError, TypeError, UnicodeError)


def _scoring_error(err: Exception) -> ScoringError:
    if isinstance(err, _INPUT_ERRORS):
        text = str(err).encode("ascii", "backslashreplace").decode()[:300]
        return ScoringError(422, f"the request could not be scored: {text}")
    return ScoringError(500, "internal error while scoring the request (see the server log)")


@dataclass
class _Item:
    queries: list[str]
    top_k: int | None
    future: asyncio.Future
    candidates: list[str] | None = None


class MicroBatcher:
    """Collects queued requests for up to `max_wait_ms` / `max_batch` queries and scores them in one model call.

    A batch whose model call raises is scored again request by request, so a bad request fails alone and its
    neighbours are answered."""

    def __init__(self, name: str, loaded: Any, settings: ServeSettings, metrics: Metrics) -> None:
        self.name, self.loaded, self.settings, self.metrics = name, loaded, settings, metrics
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        # One thread per model: model calls of one run never overlap, and the event loop stays free.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        # A cross-encoder (rerank) ranks each request's own candidates: its requests are scored one by one.
        self.takes_candidates = "candidates" in loaded.task.request_inputs
        self.busy = False
        self._carry: _Item | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    async def submit(self, queries: list[str], top_k: int | None, candidates: list[str] | None = None) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Item(queries, top_k, future, candidates if self.takes_candidates else None))
        return await future

    def _predict(self, items: list[_Item]) -> list[dict[str, Any]]:
        """One model call for the collected requests (one per request for a cross-encoder)."""
        if self.takes_candidates:
            return [r for item in items for r in self.loaded.task.predict(
                self.loaded, item.queries, top_k=item.top_k or 0, batch_size=self.settings.max_batch,
                candidates=item.candidates)]  # fmt: skip
        top_k = max(item.top_k or self.loaded.task.default_top_k for item in items)
        texts = [q for item in items for q in item.queries]
        return predict_queued(self.loaded, texts, top_k, self.settings.model_batch_size)

    @property
    def idle(self) -> bool:
        return self.queue.empty() and self._carry is None and not self.busy

    async def _get(self, timeout: float) -> _Item | None:
        """The next queued request, or None after `timeout` s; an item that arrives as time runs out is never lost
        (asyncio.wait_for could drop it in Python < 3.12)."""
        getter = asyncio.ensure_future(self.queue.get())
        try:
            done, _ = await asyncio.wait({getter}, timeout=timeout)
        except asyncio.CancelledError:  # the worker is stopping
            getter.cancel()
            raise
        if getter in done:
            return getter.result()
        getter.cancel()
        try:
            return await getter  # finished before the cancel took effect
        except asyncio.CancelledError:
            return None

    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        first = self._carry or await self.queue.get()
        self._carry = None
        items, size = [first], len(first.queries)
        deadline = loop.time() + self.settings.max_wait_ms / 1000
        while size < self.settings.max_batch:
            item = await self._get(max(0.0, deadline - loop.time()))
            if item is None:
                break
            if size + len(item.queries) > self.settings.max_batch:
                self._carry = item  # starts the next batch
                break
            items.append(item)
            size += len(item.queries)
        return items

    def _deliver(self, item: _Item, part: list[dict[str, Any]]) -> None:
        for r in part:
            if "top_k" in r:
                r["top_k"] = r["top_k"][: item.top_k or DEFAULT_TOP_K]
        if not item.future.done():  # a client that went away (or timed out) cancelled its future
            item.future.set_result(part)

    def _fail(self, item: _Item, err: Exception) -> None:
        failure = _scoring_error(err)
        if failure.status == 500:
            logger.error("run %s failed on a request of %d queries", self.name, len(item.queries), exc_info=err)
        if not item.future.done():
            item.future.set_exception(failure)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [item for item in await self._collect() if not item.future.done()]
            if not items:
                continue
            self.busy = True
            try:
                self.metrics.batch_size.labels(self.name).observe(sum(len(item.queries) for item in items))
                try:
                    results = await loop.run_in_executor(self.executor, self._predict, items)
                except Exception as err:  # noqa: BLE001  (find the request at fault: score each alone)
                    if len(items) == 1:
                        self._fail(items[0], err)
                        continue
                    self.metrics.retries.labels(self.name).inc()
                    logger.warning("run %s: a batch of %d requests failed (%s); scoring them one by one", self.name,
                                   len(items), type(err).__name__)  # fmt: skip
                    for item in items:
                        try:
                            part = await loop.run_in_executor(self.executor, self._predict, [item])
                        except Exception as alone:  # noqa: BLE001
                            self._fail(item, alone)
                        else:
                            self._deliver(item, part)
                    continue
                start = 0
                for item in items:
                    self._deliver(item, results[start : start + len(item.queries)])
                    start += len(item.queries)
            finally:
                self.busy = False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True)


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return AsciiJSONResponse(status_code=status, content={"error": message, **extra}, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes gets 413 before it is read: at once when its
    Content-Length says so, or as soon as a chunked body passes the limit (only up to `limit` bytes are buffered)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _send(send, _error(400, "bad Content-Length header"))
            elif int(length) > self.limit:
                await _send(send, self._too_large())
            else:  # the HTTP server delivers no more than Content-Length bytes
                await self.app(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await _send(send, self._too_large())
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> JSONResponse:
        return _error(413, f"request body too large: more than {self.limit} bytes (max_body_bytes)",
                      headers={"Connection": "close"})  # fmt: skip


async def _send(send: Any, response: Response) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def _public(value: Any) -> Any:
    """A model name as /metadata shows it: a Hub id as it is, a local path by its folder name only."""
    if isinstance(value, str) and (os.path.isabs(value) or os.sep in value and Path(value).exists()):
        return Path(value).name
    return value


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
        "takes_candidates": "candidates" in task.request_inputs,
    }
    if getattr(task, "intents", None) is not None:
        meta["intents"] = task.intents
    return meta


_ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (401, "missing or wrong API key (with --api_key_env)"), (404, "unknown run"), (413, "too many queries, or a "
    "body over max_body_bytes"), (422, "invalid request"), (500, "internal error"), (503, "busy or shutting down"),
    (504, "not answered within timeout_s"))}  # fmt: skip


def create_app(runs: dict[str, Any], settings: ServeSettings | None = None) -> FastAPI:
    """The API over loaded runs and exports (`querytune.inference.LoadedRun`, by name)."""
    if not runs:
        raise ValueError("serve needs at least one run or export directory")
    settings = settings or ServeSettings()
    metrics = Metrics()
    metadata = {name: serving_metadata(loaded) for name, loaded in runs.items()}
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

    app = FastAPI(title="querytune", lifespan=lifespan, default_response_class=AsciiJSONResponse)
    app.openapi = lambda: _openapi(app, settings, runs)
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        endpoint = (
            request.url.path
            if request.url.path in ("/predict", "/search", "/health", "/metadata", "/metrics")
            else "other"
        )
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # loc / msg / type only: `input` and `ctx` would echo the request (or an exception) back
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type"))}
                  for e in exc.errors()]  # fmt: skip
        where = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
        return _error(422, f"invalid request: {where}", detail=errors)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error(500, "internal error (see the server log)")

    def check_key(request: Request) -> None:
        """401 unless the request carries the API key (constant-time comparison)."""
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise _Unauthorized()

    guarded = [Depends(check_key)] if settings.api_key else []

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                      headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    @app.get("/health", responses={200: {"description": "up (or draining)"}})
    async def health() -> dict[str, Any]:
        return {"status": "draining" if state["draining"] else "ok", "runs": list(runs),
                "pending_requests": state["pending"]}  # fmt: skip

    @app.get("/metadata", dependencies=guarded, responses={401: _ERRORS[401]})
    async def get_metadata() -> dict[str, Any]:
        limits = {k: getattr(settings, k) for k in ("max_batch", "max_wait_ms", "max_queries_per_request",
                                                    "max_query_chars", "max_pending", "max_body_bytes",
                                                    "timeout_s")}  # fmt: skip
        return {"runs": metadata, "limits": limits, "api_key_required": bool(settings.api_key)}

    @app.get("/metrics", dependencies=guarded, response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"},
                        401: _ERRORS[401]})  # fmt: skip
    async def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict", dependencies=guarded, response_model=PredictResponse,
              responses={k: v for k, v in _ERRORS.items() if k != 401 or settings.api_key})  # fmt: skip
    async def predict(body: PredictRequest) -> Any:
        if not body.queries:
            return _error(422, "queries is empty: send at least one query")
        if len(body.queries) > settings.max_queries_per_request:
            return _error(413, f"too many queries: {len(body.queries)} > {settings.max_queries_per_request} per "
                               "request; split the batch")  # fmt: skip
        if body.candidates is not None and len(body.candidates) > settings.max_queries_per_request:
            return _error(413, f"too many candidates: {len(body.candidates)} > {settings.max_queries_per_request}")
        for kind, texts in (("query", body.queries), ("candidate", body.candidates or [])):
            for i, text in enumerate(texts):
                problem = query_problem(text, settings.max_query_chars)
                if problem:
                    return _error(422, f"{kind} {i} {problem}")
        names = body.runs or list(runs)
        unknown = [n for n in names if n not in runs]
        if unknown:
            return _error(404, f"unknown run(s) {unknown}; loaded: {list(runs)}")
        if body.candidates is not None:
            refuse = [n for n in names if "candidates" not in runs[n].task.request_inputs]
            if refuse:
                return _error(422, f"candidates: run(s) {refuse} take no candidates (task "
                                   f"{runs[refuse[0]].config.data.task}); ask only runs that rank candidates, with "
                                   '"runs"')  # fmt: skip
        if state["draining"]:
            return _error(503, "server is shutting down")
        if state["pending"] >= settings.max_pending:
            return _error(503, f"server busy: {state['pending']} requests pending (max_pending "
                               f"{settings.max_pending}); retry shortly", headers={"Retry-After": "1"})  # fmt: skip
        metrics.request_queries.observe(len(body.queries))
        state["pending"] += 1
        metrics.pending.set(state["pending"])
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*(state["batchers"][n].submit(body.queries, body.top_k, body.candidates)
                                 for n in names)),
                settings.timeout_s,
            )  # fmt: skip
        except TimeoutError:
            return _error(504, f"not answered within {settings.timeout_s:g} s (timeout_s)")
        except ScoringError as err:
            return _error(err.status, err.message)
        finally:
            state["pending"] -= 1
            metrics.pending.set(state["pending"])
        results = []
        for i, query in enumerate(body.queries):
            per_run = {
                n: {k: v for k, v in answer[i].items() if k != "query"}
                for n, answer in zip(names, answers, strict=True)
            }
            results.append({"query": query, "predictions": per_run})
        return {"runs": names, "results": results}

    # POST /search (serving/search.py): runs that search a catalogue; searches run in the run's model thread.
    register_search(app, runs, settings.max_query_chars,
                    lambda name: getattr(state["batchers"].get(name), "executor", None))  # fmt: skip
    return app


def _openapi(app: FastAPI, settings: ServeSettings, runs: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI schema, with this server's real limits on a request: how many queries, how long, which run
    names, and `candidates` only where a loaded run takes them. The checks stay the app's own (413 for too many
    queries, the messages above); the schema says what will pass them, for clients and for fuzzers."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        props = schema["components"]["schemas"]["PredictRequest"]["properties"]
        text = {"type": "string", "minLength": 1, "maxLength": settings.max_query_chars, "pattern": r"\S"}
        texts = {"type": "array", "items": text, "minItems": 1, "maxItems": settings.max_queries_per_request}
        props["queries"].update(texts)
        props["runs"]["anyOf"][0].update(items={"type": "string", "enum": list(runs)}, minItems=1)
        if any("candidates" in loaded.task.request_inputs for loaded in runs.values()):
            props["candidates"]["anyOf"][0].update(texts)
        else:
            props["candidates"] = {"type": "null", "description": "no loaded run takes candidates"}
        app.openapi_schema = schema
    return app.openapi_schema


class _Unauthorized(Exception):
    """A request without the API key (answered 401 by the app's handler)."""


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


def serve(paths: list[str], host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
          threads: int | None = None, log_level: str = "info", trust_remote_code: bool = False,
          allow_status: tuple[str, ...] | str | None = ("finished",)) -> None:  # fmt: skip
    """Load every run or export (errors before the server starts), then serve until SIGINT/SIGTERM."""
    import uvicorn

    from querytune import progress
    from querytune.inference import load_run

    progress.set_enabled(False)  # the server's model calls are short: no bars in its log
    named = run_names(paths)
    runs = {name: load_run(path, threads, trust_remote_code=trust_remote_code, allow_status=allow_status)
            for name, path in named.items()}  # fmt: skip
    app = create_app(runs, settings)
    timeout = int((settings or ServeSettings()).drain_timeout_s)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=timeout)
