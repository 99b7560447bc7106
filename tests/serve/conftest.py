"""A real server on a loopback port, serving tiny random models, for the official `openai` client to talk to."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from draftapprox.methods import make
from draftapprox.models.loading import pair_from_models
from draftapprox.serve.app import create_app
from draftapprox.serve.local import LocalBackend
from draftapprox.serve.metrics import Metrics
from draftapprox.serve.responses import Service
from draftapprox.serve.scheduler import Scheduler
from tests.conftest import close_draft, tiny_model, tiny_tokenizer

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(service: Service, api_key: str | None = None, shutdown_timeout: float = 5.0,
            port: int | None = None) -> Iterator[str]:
    """Serve `service` on a loopback port (a free one unless given) in a thread; yields the base URL (`.../v1`)."""
    with running_app(create_app(service, api_key=api_key, shutdown_timeout=shutdown_timeout), port) as url:
        yield url


@contextlib.contextmanager
def running_app(app, port: int | None = None) -> Iterator[str]:
    """Serve an ASGI `app` on a loopback port in a thread; yields the base URL (`.../v1`)."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def tiny_service(method: str = "speckv", budget: int | float | None = 16, kv_cache_memory: int = 64 * 2**20,
                 max_queue: int = 64, prefill_chunk: int = 64, request_timeout: float | None = None,
                 context: int = 2048, static_decode: bool | None = None, close: bool = False, **knobs) -> Service:
    """`close`: a draft that mostly agrees with the target (speculative decoding), instead of an unrelated one."""
    target = tiny_model("qwen2", layers=4, seed=0, context=context)
    draft = close_draft(target) if close else tiny_model("qwen2", layers=3, heads=4, kv_heads=4, seed=1,
                                                          context=context)
    pair = pair_from_models(target, tiny_tokenizer(chat=True), draft)
    scheduler = Scheduler(pair, kv_cache_memory=kv_cache_memory, max_queue=max_queue, prefill_chunk=prefill_chunk,
                          metrics=Metrics(), static_decode=static_decode)
    if method != "fullkv":
        knobs = {"window": 4, **knobs}
    default = make(method, budget, **knobs)
    return Service(pair, LocalBackend(scheduler), MODEL, default, lookahead=4, request_timeout=request_timeout)


def words(n: int, seed: int = 0) -> str:
    """A prompt of `n` tokens of the tiny tokenizer."""
    import random

    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(500)}" for _ in range(n))


def wait_for(condition, seconds: float = 20) -> bool:
    """Whether `condition()` came true within `seconds` (the server frees what a request held within a step)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Service]]:
    service = tiny_service()
    with running(service) as url:
        yield url, service
