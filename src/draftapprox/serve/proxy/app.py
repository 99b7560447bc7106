"""The proxy's HTTP app: the two generation routes through `Proxy`, the engine's model list, `/health` that follows
the engine (503 naming it while it does not answer), `/metrics`, and every other route passed through to the engine
as it came."""

from __future__ import annotations

import asyncio
import contextlib
import json
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..app import answer_errors
from ..auth import authorized
from ..protocol import ApiError
from .handler import Proxy


async def _body(http: Request) -> dict:
    try:
        body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def create_proxy_app(proxy: Proxy, *, api_key: str | None = None, probe_every: float = 5.0) -> FastAPI:
    """The app serving `proxy`; while it runs, the engine is probed every `probe_every` seconds (every second while
    it does not answer), so `/health` and `/metrics` follow it going down and coming back."""
    link = proxy.link

    async def follow() -> None:
        while True:
            try:
                await asyncio.to_thread(link.refresh, True)
                if link.ready:
                    await asyncio.to_thread(link.verdict, link.model())
            except Exception as error:  # the loop must outlive whatever the engine answers
                link.lost(error)
            proxy.metrics.upstream_up.set(1 if link.ready else 0)
            await asyncio.sleep(probe_every if link.ready else link.retry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(follow())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            proxy.compressor.stop()
            await proxy.relay.close()

    app = FastAPI(title="draftapprox proxy", summary="SpecPC in front of an OpenAI-compatible engine",
                  lifespan=lifespan)
    app.state.api_key = api_key
    auth = [Depends(authorized)]

    def counted(response: Response) -> Response:
        proxy.metrics.requests.labels(str(response.status_code)).inc()
        return response

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(http: Request) -> Response:
        return counted(await proxy.chat(await _body(http), http))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(http: Request) -> Response:
        return counted(await proxy.completions(await _body(http), http))

    @app.get("/v1/models", dependencies=auth)
    async def models(http: Request) -> Response:
        """The engine's list, with the proxy's own name for its default model where it has one."""
        response = await proxy.relay.raw(http, "v1/models")
        try:
            listed = json.loads(response.body) if response.status_code == 200 and proxy.name else None
        except json.JSONDecodeError:
            listed = None
        if not isinstance(listed, dict) or not isinstance(listed.get("data", []), list):
            return response
        if proxy.name not in {m.get("id") for m in listed.get("data", []) if isinstance(m, dict)}:
            listed.setdefault("data", []).append({"id": proxy.name, "object": "model", "owned_by": "draftapprox",
                                                  "root": link.model(),
                                                  "max_model_len": link.context(link.model())})
        return JSONResponse(listed)

    @app.get("/health")
    async def health() -> JSONResponse:
        await asyncio.to_thread(link.refresh)
        state = await asyncio.to_thread(link.health)
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(proxy.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], dependencies=auth)
    async def passed_through(path: str, http: Request) -> Response:
        await link.answering()
        return await proxy.relay.raw(http, path)

    answer_errors(app, proxy.metrics)
    return app
