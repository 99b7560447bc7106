"""The proxy on a tiny draft, in front of a real OpenAI-compatible engine: our own server on tiny models (it takes
token-id prompts and has `/tokenize`, as vLLM does). llama.cpp and vLLM themselves are in their own modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from draftapprox.methods import make
from draftapprox.models.loading import Pair, pair_from_models
from draftapprox.serve.metrics import Metrics
from draftapprox.serve.proxy.app import create_proxy_app
from draftapprox.serve.proxy.budgets import Budgets
from draftapprox.serve.proxy.compressor import Compressor
from draftapprox.serve.proxy.handler import Proxy
from draftapprox.serve.proxy.link import Link, Upstream
from draftapprox.serve.proxy.prefix import PrefixLedger
from draftapprox.serve.proxy.relay import Relay
from tests.conftest import tiny_model, tiny_tokenizer

from ..conftest import running, running_app, tiny_service

PC = {"method": "specpc", "budget": 0.25, "settings": {"window": 4, "start_layer": 1}}
TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]


def tool_chat() -> list[dict]:
    """An agent's chat for the real engines: a tool call, its long result, then a question that needs another."""
    call = {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'}}
    result = "\n".join(f"{i}. the meeting about the {w} budget moved to room {100 + i}"
                       for i, w in enumerate(["travel", "cloud", "hiring", "office", "training"] * 12))
    return [{"role": "system", "content": "You read files with the tools you have."},
            {"role": "user", "content": "Read notes.txt please."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": result},
            {"role": "user", "content": "Now read todo.txt."}]


def tiny_proxy(url: str, *, tokenizer=None, method: str | None = "specpc", **options) -> Proxy:
    """A proxy on a tiny draft; prefix reuse off unless asked, so that a prompt asked twice is cut twice."""
    tok = tokenizer or tiny_tokenizer(chat=True)
    draft = pair_from_models(tiny_model("qwen2", layers=3, heads=4, kv_heads=4, seed=1), tok).target
    default = make(method, 0.25, window=4, start_layer=1) if method else None
    return proxy_for(url, Pair(draft, tok, draft), default, **{"min_prompt_tokens": 32, **options})


def proxy_for(url: str, pair: Pair, method, *, min_prompt_tokens: int = 1024, max_queue: int = 8,
              messages: bool = False, timeout: float = 600, allow_text: bool = False, prefix_reuse: bool = False,
              compress_timeout: float | None = None, on_error: str = "forward",
              budgets: Budgets | None = None) -> Proxy:
    """The proxy `draftapprox serve --upstream url` builds, on the draft of `pair`."""
    metrics = Metrics()
    link = Link(Upstream(url, timeout=timeout), pair.tokenizer, allow_text=allow_text, retry=0.2)
    return Proxy(pair, link, Compressor(pair, metrics, max_queue=max_queue, timeout=compress_timeout,
                                        on_error=on_error),
                 Relay(link), metrics, method, budgets or Budgets(), "proxied", min_prompt_tokens, messages,
                 PrefixLedger() if prefix_reuse else None)


@contextlib.contextmanager
def serving_proxy(proxy: Proxy, probe_every: float = 0.5) -> Iterator[str]:
    with running_app(create_proxy_app(proxy, probe_every=probe_every)) as url:
        yield url


@pytest.fixture(scope="module")
def engine():
    service = tiny_service(method="fullkv", budget=None)
    with running(service) as url:
        yield url, service


@pytest.fixture(scope="module")
def proxy(engine):
    with serving_proxy(tiny_proxy(engine[0])) as url:
        yield url


def metric(url: str, sample: str) -> float:
    """A sample's value on the server's /metrics, its labels written out (0 if absent)."""
    import httpx

    for line in httpx.get(url.removesuffix("/v1") + "/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == sample:
            return float(value)
    return 0.0


class Tap:
    """An observer between the proxy and the engine: it records the body of every request the engine receives
    and relays requests and answers unchanged (streams included), so a test can read what the engine was sent."""

    def __init__(self, engine_url: str):
        from starlette.applications import Starlette
        from starlette.responses import StreamingResponse
        from starlette.routing import Route

        self.root, self.bodies = engine_url.removesuffix("/v1"), []

        async def relay(request):
            import json

            import httpx

            raw = await request.body()
            self.bodies.append((request.url.path, json.loads(raw) if raw else None))
            client = httpx.AsyncClient(timeout=None)
            upstream = await client.send(client.build_request(
                request.method, self.root + request.url.path, params=request.query_params, content=raw,
                headers={"content-type": request.headers.get("content-type", "application/json")}), stream=True)

            async def body():
                try:
                    async for piece in upstream.aiter_raw():
                        yield piece
                finally:
                    await upstream.aclose()
                    await client.aclose()

            return StreamingResponse(body(), upstream.status_code,
                                     media_type=upstream.headers.get("content-type"))

        self.app = Starlette(routes=[Route("/{path:path}", relay, methods=["GET", "POST"])])

    def sent(self, path: str) -> dict:
        """The last body the engine received on `path`."""
        return next(body for where, body in reversed(self.bodies) if where.endswith(path))


@contextlib.contextmanager
def tapped(engine_url: str) -> Iterator[tuple[Tap, str]]:
    tap = Tap(engine_url)
    with running_app(tap.app) as url:
        yield tap, url
