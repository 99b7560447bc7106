"""The HTTP application: routes, OpenAI-style errors for everything that goes wrong, the scheduler's lifetime, and
`serve_app`, which serves it (or the proxy's app, `proxy.app`) with uvicorn.

Nothing here touches a tensor: routes turn bodies into token ids and work (`responses`), our own scheduler
(`local`) runs it.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .metrics import Metrics
from .protocol import ApiError, error_body
from .responses import Service
from .routes import chat, completions, info, tokenize

log = logging.getLogger("draftapprox.serve")


def create_app(service: Service, *, api_key: str | None = None, shutdown_timeout: float = 30.0) -> FastAPI:
    """The app serving `service`; its backend starts with the app and stops (finishing or cancelling what runs,
    within `shutdown_timeout` seconds) when the app shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.backend.start()
        try:
            yield
        finally:
            service.backend.stop(shutdown_timeout)

    app = FastAPI(title="draftapprox", summary="Draft-based approximate inference behind the OpenAI API",
                  lifespan=lifespan)
    app.state.service, app.state.api_key = service, api_key
    for module in (completions, chat, info, tokenize):
        app.include_router(module.router)
    answer_errors(app, service.metrics)
    return app


def answer_errors(app: FastAPI, metrics: Metrics) -> None:
    """Every error as an OpenAI error body with its status, counted by status (shared with the proxy's app)."""

    def answer(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        metrics.requests.labels(str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return answer(error.status, error.body(), error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('msg')}", None
        elif first.get("type") == "extra_forbidden":
            message, param = f"unknown field {'.'.join(where)!r}", ".".join(where)
        else:
            message = f"{'.'.join(where) or 'body'}: {first.get('msg')}"
            param = ".".join(where) or None
        return answer(400, error_body(message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return answer(error.status_code, error_body(str(error.detail), kind), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return answer(500, error_body(f"{type(error).__name__}: {error}", "server_error"))


def serve_app(app: FastAPI, *, host: str, port: int, shutdown_timeout: float, log_level: str = "info") -> None:
    """Serve `app` until SIGINT/SIGTERM: uvicorn stops accepting, lets open requests finish for `shutdown_timeout`
    seconds, then the app's lifespan stops what is left."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=max(1, int(shutdown_timeout)))
    uvicorn.Server(config).run()


