"""What every request of the HTTP API goes through before a route: the body-size limit (413 before the body is
read), the Prometheus request counter and latency, the API key (401), and the handlers that turn a validation error
into 422 and any other exception into a 500 whose body carries no exception text."""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from querytune.serving.metrics import Metrics
from querytune.serving.schemas import ServeSettings, error

logger = logging.getLogger(__name__)
ENDPOINTS = ("/predict", "/search", "/health", "/metadata", "/metrics")


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
                await _send(send, error(400, "bad Content-Length header"))
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
        return error(413, f"request body too large: more than {self.limit} bytes (max_body_bytes)",
                      headers={"Connection": "close"})  # fmt: skip


async def _send(send: Any, response: Response) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class Unauthorized(Exception):
    """A request without the API key (answered 401 by the app's handler)."""


def install(app: FastAPI, settings: ServeSettings, metrics: Metrics) -> list:
    """Add the body limit, request metrics and error handlers to `app`; returns the dependencies that guard an
    endpoint with the API key (none without one)."""
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
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
        return error(422, f"invalid request: {where}", detail=errors)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # starlette's and FastAPI's own refusals (a body that is not UTF-8: 400; an unknown path: 404; a wrong
        # method: 405) in the API's error body; FastAPI's HTTPException is a subclass of starlette's
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error(500, "internal error (see the server log)")

    def check_key(request: Request) -> None:
        """401 unless the request carries the API key (constant-time comparison)."""
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise Unauthorized()

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
        return error(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                     headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    return [Depends(check_key)] if settings.api_key else []
