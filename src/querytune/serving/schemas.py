"""What the HTTP API takes and answers: its settings, the request and response models, and the error body.

The `POST /predict` request holds the queries, `top_k`, `runs` and one field per input that some task's predict
takes besides the queries (`candidates`), generated from the tasks' declarations (`querytune.tasks.TaskInput`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from querytune.tasks import declared_inputs

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


def _whole_number(value: Any) -> Any:
    """JSON Schema's `integer` admits 50.0: a float with no fraction is that integer. Strings and booleans stay
    invalid (strict types)."""
    if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
        return int(value)
    return value


class _PredictFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    queries: list[str] = Field(description="the queries to label (a batch)")
    top_k: Annotated[int, BeforeValidator(_whole_number)] | None = Field(
        None, ge=1, le=50, description="labels per query (default 3); rerank: documents (all)"
    )
    runs: list[str] | None = Field(None, description="names of the loaded runs to ask (default: all)")


def request_inputs() -> dict[str, Any]:
    """The task inputs a request can carry (lists of texts), by name."""
    return {name: spec for name, (spec, _) in declared_inputs().items() if spec.in_requests}


PredictRequest = create_model(
    "PredictRequest",
    __base__=_PredictFields,
    __doc__="A /predict request. Types are strict (\"3\", true or 2.0 are no top_k) and unknown fields are refused.",
    **{name: (list[str] | None, Field(None, description=f"{spec.help}: only for runs whose task takes them"))
       for name, spec in request_inputs().items()},
)  # fmt: skip


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


ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in (
    (400, "the body cannot be read (not UTF-8)"), (401, "missing or wrong API key (with --api_key_env)"), (404, "unknown run"),
    (413, "a body over max_body_bytes"), (422, "invalid request (more queries than max_queries_per_request, a query "
    "too long, empty or unprintable, ...)"), (500, "internal error"), (503, "busy or shutting down"),
    (504, "not answered within timeout_s"))}  # fmt: skip


def error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The API's error body, `{"error": message, ...}`."""
    return AsciiJSONResponse(status_code=status, content={"error": message, **extra}, headers=headers)
