"""`POST /search`: one query in, the catalogue's best products out, through a run that searches a catalogue.

POST /search {"query": "angle bracket", "top_k": 10, "run": null}
  -> {"run": NAME, "query": ..., "mode": "hybrid", "hits": [{"rank": 1, "id": ..., "title": ..., "score": ...}]}

A retrieval run searches in its `retrieval_mode` (dense, BM25, or hybrid with the fusion saved in it); a rerank run
whose `rerank_first_stage` is bm25, dense or hybrid searches with that first stage and reorders its top
`retrieval_top_k` with the cross-encoder. `run` picks one of the loaded runs (default: the first that searches).
Catalogues, embeddings and indexes are loaded when the app is created, before the server takes requests; each
search runs in its run's model thread (`executor_of`), so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from querytune.serving.schemas import ERRORS
from querytune.validation import query_problem

logger = logging.getLogger(__name__)
MAX_TOP_K = 1000


class SearchRequest(BaseModel):
    query: str = Field(description="the search query")
    top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="products to return (best first)")
    run: str | None = Field(None, description="name of the loaded run to search with (default: the first that can)")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def register_search(app: FastAPI, runs: dict[str, Any], max_query_chars: int,
                    executor_of: Callable[[str], Executor | None] = lambda name: None,
                    dependencies: list | None = None) -> None:  # fmt: skip
    """Add `POST /search` to `app` over the loaded runs that can search (see the module docstring); `dependencies`
    guard it as the app's other endpoints are (the API key)."""
    searchable, unavailable = {}, {}
    for name, loaded in runs.items():
        reason = loaded.task.search_unsupported()
        if reason is None:
            try:
                loaded.task.prepare_search(loaded)
                searchable[name] = loaded
                continue
            except Exception as err:  # noqa: BLE001  (e.g. a rerank export whose catalogue data is elsewhere)
                reason = f"its catalogue could not be loaded ({type(err).__name__}: {err})"
                logger.warning("run %s serves /predict but not /search: %s", name, reason)
        unavailable[name] = reason

    statuses = (400, 401, 404, 413, 422, 500) if dependencies else (400, 404, 413, 422, 500)

    @app.post("/search", dependencies=dependencies or [], responses={s: ERRORS[s] for s in statuses})
    async def search(body: SearchRequest) -> Any:
        if not searchable:
            reasons = "; ".join(f"{n}: {reason}" for n, reason in unavailable.items())
            return _error(404, f"no loaded run searches a catalogue ({reasons})")
        name = body.run or next(iter(searchable))
        if name not in runs:
            return _error(404, f"unknown run {name!r}; loaded: {list(runs)}")
        if name not in searchable:
            return _error(422, f"run: {name!r} cannot search: {unavailable[name]}")
        problem = query_problem(body.query, max_query_chars)  # the rule of /predict and `querytune predict`
        if problem:
            return _error(422, f"query {problem}")
        query = body.query.strip()
        loaded = searchable[name]
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                executor_of(name), lambda: loaded.task.search(loaded, [query], top_k=body.top_k)
            )
        except ValueError as err:  # what a task refuses
            return _error(422, str(err))
        except Exception as err:  # noqa: BLE001  (a model failure is a 500 with its message, never a dropped socket)
            return _error(500, f"search failed: {type(err).__name__}: {err}")
        return {"run": name, **results[0]}
