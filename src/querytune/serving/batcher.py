"""The micro-batcher of the HTTP API: one worker per loaded run collects the requests that arrive within
`max_wait_ms` (up to `max_batch` queries) and scores them in one model call in the run's own thread, so the event loop
keeps accepting requests. A batch whose model call raises is scored again request by request: a bad request fails
alone (`ScoringError`: 422 for its own fault, 500 for the model's) and its neighbours are answered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from querytune.batching import predict_queued
from querytune.serving.metrics import Metrics
from querytune.serving.schemas import DEFAULT_TOP_K, ServeSettings

logger = logging.getLogger(__name__)


class ScoringError(Exception):
    """A request that failed on its own, scored alone: its HTTP status and a message safe to send back."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# What a model call raises for a bad input (a text the tokenizer refuses, a task's ValueError): the request's fault.
_INPUT_ERRORS = (ValueError, TypeError, UnicodeError)


def scoring_error(err: Exception) -> ScoringError:
    if isinstance(err, _INPUT_ERRORS):
        text = str(err).encode("ascii", "backslashreplace").decode()[:300]
        return ScoringError(422, f"the request could not be scored: {text}")
    return ScoringError(500, "internal error while scoring the request (see the server log)")


@dataclass
class _Item:
    queries: list[str]
    top_k: int | None
    future: asyncio.Future
    inputs: dict[str, Any] = field(default_factory=dict)  # the task inputs of the request (its candidates)


class MicroBatcher:
    """Collects queued requests for up to `max_wait_ms` / `max_batch` queries and scores them in one model call.

    A batch whose model call raises is scored again request by request, so a bad request fails alone and its
    neighbours are answered."""

    def __init__(self, name: str, loaded: Any, settings: ServeSettings, metrics: Metrics) -> None:
        self.name, self.loaded, self.settings, self.metrics = name, loaded, settings, metrics
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        # One thread per model: model calls of one run never overlap, and the event loop stays free.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}")
        # A task with inputs of its own (a cross-encoder ranks each request's candidates) scores requests one by one.
        self.inputs = [spec.name for spec in loaded.task.request_inputs if spec.in_requests]
        self.busy = False
        self._carry: _Item | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    async def submit(self, queries: list[str], top_k: int | None, inputs: dict[str, Any] | None = None) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        given = {name: (inputs or {}).get(name) for name in self.inputs}
        await self.queue.put(_Item(queries, top_k, future, given))
        return await future

    def _predict(self, items: list[_Item]) -> list[dict[str, Any]]:
        """One model call for the collected requests (one per request for a task with inputs of its own)."""
        if self.inputs:
            return [r for item in items for r in self.loaded.task.predict(
                self.loaded, item.queries, top_k=item.top_k or 0, batch_size=self.settings.max_batch,
                **item.inputs)]  # fmt: skip
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
        failure = scoring_error(err)
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
