"""Sending a request to the upstream and relaying its answer: a JSON body or a stream of server-sent events passed
through line by line, each JSON object rewritten on its way; the engine's errors come back with their own status,
body and headers. Not reaching the engine is a 502 (and tells the link), an engine silent for longer than its
timeout a 504, both in OpenAI's error shape.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Protocol

import anyio
import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ..protocol import ApiError, error_body
from .link import Link

# Headers that belong to one hop, or that the proxy sets itself.
_HOP = {"host", "content-length", "authorization", "connection", "keep-alive", "accept-encoding",
        "transfer-encoding", "content-encoding", "te", "trailer", "upgrade", "proxy-authorization", "date",
        "server"}


class Rewrite(Protocol):
    """How the engine's answer is made ours: a whole JSON answer, each streamed object (into none, one or several:
    an object may be held back until a later one), and what is left when the stream ends."""

    def whole(self, data: dict) -> dict: ...

    def chunk(self, data: dict) -> list[dict]: ...

    def end(self) -> list[dict]: ...


def _headers(headers: httpx.Headers | dict) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP and k.lower() != "content-type"}


class Relay:
    def __init__(self, link: Link):
        self.link = link
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # no cap on connections: the engine's own admission decides
            timeout = httpx.Timeout(self.link.upstream.timeout, connect=10.0, pool=None)
            self._client = httpx.AsyncClient(timeout=timeout, headers=self.link.upstream.headers(),
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return self._client

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._http().send(request, stream=True)
        except httpx.HTTPError as error:
            raise self._failure(error) from None

    def _failure(self, error: httpx.HTTPError) -> ApiError:
        url = self.link.upstream.url
        if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
            self.link.lost(error)
        elif isinstance(error, httpx.TimeoutException):
            return ApiError(504, f"the upstream {url} sent nothing for {self.link.upstream.timeout:g} s",
                            type="server_error", code="timeout")
        return ApiError(502, f"the upstream {url} cannot be reached: {error or type(error).__name__}",
                        type="server_error", code="upstream_unavailable")

    async def _read(self, response: httpx.Response) -> bytes:
        try:
            return await response.aread()
        except httpx.HTTPError as error:
            raise self._failure(error) from None
        finally:
            await response.aclose()

    async def post(self, path: str, body: dict, rewrite: Rewrite, http: Request | None = None) -> Response:
        """POST `body` to the upstream's `path`, with the client's own headers; its answer, rewritten."""
        headers = _headers(http.headers) if http is not None else {}
        response = await self._send(self._http().build_request("POST", f"{self.link.upstream.url}{path}", json=body,
                                                               headers=headers))
        kind = response.headers.get("content-type", "")
        passed = _headers(response.headers)
        if response.status_code == 200 and kind.startswith("text/event-stream"):
            return StreamingResponse(self._events(response, rewrite), media_type="text/event-stream",
                                     headers=passed, background=BackgroundTask(_close, response))
        raw = await self._read(response)
        if response.status_code == 200:
            try:
                data = json.loads(raw)
            except json.JSONDecodeError:
                data = None
            if isinstance(data, dict):
                return JSONResponse(rewrite.whole(data), headers=passed)
        return Response(raw, response.status_code, headers=passed, media_type=kind or None)

    async def _events(self, response: httpx.Response, rewrite: Rewrite) -> AsyncIterator[str]:
        def data(objects: list[dict]) -> str:
            return "".join(f"data: {json.dumps(o)}\n\n" for o in objects)

        ended = raw = False  # raw: a line of the engine's own is open, its blank line still to come
        try:
            async for line in response.aiter_lines():
                if not line:
                    if raw:
                        yield "\n"
                    raw = False
                    continue
                payload = line[5:].strip() if line.startswith("data:") else None
                if payload == "[DONE]":
                    ended = True
                    yield data(rewrite.end())
                elif payload:
                    try:
                        chunk = json.loads(payload)
                    except json.JSONDecodeError:
                        chunk = None
                    if isinstance(chunk, dict):
                        yield data(rewrite.chunk(chunk))
                        continue
                raw = True
                yield line + "\n"
            if not ended:
                yield data(rewrite.end())
        except httpx.HTTPError as error:
            what = (f"sent nothing for {self.link.upstream.timeout:g} s" if isinstance(error, httpx.TimeoutException)
                    else f"failed mid-answer: {error}")
            yield data(rewrite.end()) + _sse_error(f"the upstream {self.link.upstream.url} {what}")
        finally:  # a client that went away lands here too: the engine's stream is closed, so it stops
            await _close(response)

    async def raw(self, http: Request, path: str) -> Response:
        """Any other route, passed through as it came (the engine's tokenizer, embeddings, its own extensions)."""
        url = f"{self.link.upstream.root}/{path}"
        if http.url.query:
            url += f"?{http.url.query}"
        headers = {**_headers(http.headers), "content-type": http.headers.get("content-type", "application/json")}
        request = self._http().build_request(http.method, url, content=await http.body(), headers=headers)
        response = await self._send(request)
        raw = await self._read(response)
        return Response(raw, response.status_code, headers=_headers(response.headers),
                        media_type=response.headers.get("content-type"))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


async def _close(response: httpx.Response) -> None:
    """Close the engine's stream even while the task closing it is being cancelled (a client gone)."""
    with anyio.CancelScope(shield=True):
        await response.aclose()


def _sse_error(message: str) -> str:
    return f"data: {json.dumps(error_body(message, 'server_error'))}\n\n"
