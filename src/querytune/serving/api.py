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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field

from querytune.batching import predict_queued
from querytune.serving.search import register_search

logger = logging.getLogger(__name__)
DEFAULT_TOP_K = 3


@dataclass
class ServeSettings:
    """Limits and batching of the API."""

    max_batch: int = 64  # queries collected per batch
    model_batch_size: int = 16  # queries per model call: a collected batch is scored in length-sorted model batches
    max_wait_ms: float = 5.0  # how long the first queued request waits for others to join its batch
    max_queries_per_request: int = 64
    max_query_chars: int = 512
    max_pending: int = 256  # requests waiting or running at once; beyond this: 503
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "model_batch_size", "max_queries_per_request", "max_query_chars", "max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


class PredictRequest(BaseModel):
    queries: list[str] = Field(description="the queries to label (a batch)")
    top_k: int | None = Field(None, ge=1, le=50, description="labels per query (default 3); rerank: documents (all)")
    runs: list[str] | None = Field(None, description="names of the loaded runs to ask (default: all)")
    candidates: list[str] | None = Field(None, description="rerank runs: the documents to rank for every query")


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


@dataclass
class _Item:
    queries: list[str]
    top_k: int | None
    future: asyncio.Future
    candidates: list[str] | None = None


class MicroBatcher:
    """Collects queued requests for up to `max_wait_ms` / `max_batch` queries and scores them in one model call."""

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

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            self.busy = True
            try:
                self.metrics.batch_size.labels(self.name).observe(sum(len(item.queries) for item in items))
                try:
                    results = await loop.run_in_executor(self.executor, self._predict, items)
                except Exception as err:  # noqa: BLE001  (answer every waiting request with the error)
                    if not isinstance(err, ValueError):  # ValueError: the request's fault, answered as a 422
                        logger.exception("run %s failed on a batch of %d requests", self.name, len(items))
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(err)
                    continue
                start = 0
                for item in items:
                    part = results[start : start + len(item.queries)]
                    start += len(item.queries)
                    for r in part:
                        if "top_k" in r:
                            r["top_k"] = r["top_k"][: item.top_k or DEFAULT_TOP_K]
                    if not item.future.done():  # a client that went away cancelled its future
                        item.future.set_result(part)
            finally:
                self.busy = False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, **extra})


def serving_metadata(loaded: Any) -> dict[str, Any]:
    """What `GET /metadata` says about a loaded run or export."""
    info = loaded.info or {}
    task = loaded.task
    meta = {
        "path": str(loaded.run_dir),
        "task": loaded.config.data.task,
        "base_model": info.get("base_model", loaded.config.model.model_name_or_path),
        "method": loaded.method,
        "format": loaded.format,
        "quantize": info.get("quantize"),
        "merged": loaded.merged,
        "labels": task.labels,
        "metrics": info.get("metrics", {}),
    }
    if getattr(task, "intents", None) is not None:
        meta["intents"] = task.intents
    return meta


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

    app = FastAPI(title="querytune", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics

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
        errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str})
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
        return _error(422, f"invalid request: {where}", detail=errors)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "draining" if state["draining"] else "ok", "runs": list(runs),
                "pending_requests": state["pending"]}  # fmt: skip

    @app.get("/metadata")
    async def get_metadata() -> dict[str, Any]:
        limits = {k: getattr(settings, k) for k in ("max_batch", "max_wait_ms", "max_queries_per_request",
                                                    "max_query_chars", "max_pending")}  # fmt: skip
        return {"runs": metadata, "limits": limits}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
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
                if not text.strip():
                    return _error(422, f"{kind} {i} is empty")
                if len(text) > settings.max_query_chars:
                    return _error(422, f"{kind} {i} is too long: {len(text)} characters > {settings.max_query_chars}")
        names = body.runs or list(runs)
        unknown = [n for n in names if n not in runs]
        if unknown:
            return _error(404, f"unknown run(s) {unknown}; loaded: {list(runs)}")
        if state["draining"]:
            return _error(503, "server is shutting down")
        if state["pending"] >= settings.max_pending:
            return JSONResponse(status_code=503, headers={"Retry-After": "1"},
                                content={"error": f"server busy: {state['pending']} requests pending "
                                                  f"(max_pending {settings.max_pending}); retry shortly"})  # fmt: skip
        metrics.request_queries.observe(len(body.queries))
        state["pending"] += 1
        metrics.pending.set(state["pending"])
        try:
            answers = await asyncio.gather(
                *(state["batchers"][n].submit(body.queries, body.top_k, body.candidates) for n in names)
            )
        except ValueError as err:  # what a task refuses (e.g. a rerank run asked without candidates)
            return _error(422, str(err))
        except Exception as err:  # noqa: BLE001  (a model failure is a 500 with its message, never a dropped socket)
            return _error(500, f"prediction failed: {type(err).__name__}: {err}")
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
          threads: int | None = None, log_level: str = "info",
          allow_status: tuple[str, ...] | str | None = ("finished",)) -> None:  # fmt: skip
    """Load every run or export (errors before the server starts), then serve until SIGINT/SIGTERM."""
    import uvicorn

    from querytune.inference import load_run

    named = run_names(paths)
    runs = {name: load_run(path, threads, allow_status=allow_status) for name, path in named.items()}
    app = create_app(runs, settings)
    timeout = int((settings or ServeSettings()).drain_timeout_s)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=timeout)
