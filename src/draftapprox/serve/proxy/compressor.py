"""The draft's work for the proxy: one compression at a time on a worker thread (the draft is one shared model, and
the event loop must never block), at most `max_queue` waiting.

It fails open: a prompt whose compression raises, takes longer than `timeout` seconds (queue included), or finds the
queue full is forwarded uncut and counted, unless `on_error` is "fail", so the proxy never turns a request the engine
could have answered into an error of its own. A compression given up on still finishes on the worker; its result is
dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass

import torch
from fastapi import Request

from ... import parts
from ...generation import new_state
from ...methods import PromptMethod
from ...models.loading import Pair
from ..metrics import Metrics
from ..protocol import ApiError
from ..request import Disconnected, poll

log = logging.getLogger("draftapprox.serve")


@dataclass
class Kept:
    """The kept positions of a prompt (all of them when compression gave up: `fallback` says why)."""

    positions: list[int]
    seconds: float = 0.0  # the draft's time
    waited: float = 0.0  # time in the queue
    fallback: str | None = None  # "error", "timeout" or "queue_full"


class Compressor:
    def __init__(self, pair: Pair, metrics: Metrics, *, max_queue: int = 64, timeout: float | None = None,
                 on_error: str = "forward"):
        self.pair, self.metrics, self.max_queue = pair, metrics, max_queue
        self.timeout, self.on_error = timeout, on_error
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="draftapprox-draft")
        self._waiting = 0
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def keep(self, ids: list[int], method: PromptMethod, protected: set[int], http: Request | None) -> Kept:
        """The positions of `ids` to forward: `protected`, and those `method` keeps of the others on the draft (its
        budget counting the others alone, `parts.select`)."""
        with self._lock:
            full = self._waiting >= self.max_queue
            if not full:
                self._waiting += 1
                self.metrics.queue_depth.set(self._waiting)
        if full:
            return self._give_up(ids, "queue_full", f"the draft's queue is full ({self.max_queue} prompts waiting)",
                                 429, 0.0)
        began, abandoned = time.perf_counter(), threading.Event()
        try:
            future = self._worker.submit(self._run, ids, method, protected, abandoned)
        except RuntimeError:  # the worker is shut down: the server is stopping
            self._leave()
            raise ApiError(503, "the proxy is shutting down", type="server_error", code="unavailable") from None
        try:
            positions, seconds = await _wait(future, self.timeout, http)
        except TimeoutError:
            return self._give_up(ids, "timeout", f"compressing the prompt took longer than {self.timeout:g} s", 504,
                                 time.perf_counter() - began)
        except Disconnected:
            raise ApiError(499, "the client closed the request", code="client_closed") from None
        except Exception as error:  # one prompt's failure in the draft is that request's alone
            log.exception("compressing a prompt failed")
            return self._give_up(ids, "error", f"compressing the prompt failed: {type(error).__name__}: {error}", 500,
                                 time.perf_counter() - began)
        finally:  # given up on for any reason (a timeout, a client gone, a cancelled task): skip it if not begun
            abandoned.set()
        return Kept(positions, seconds, max(0.0, time.perf_counter() - began - seconds))

    def _run(self, ids: list[int], method: PromptMethod, protected: set[int],
             abandoned: threading.Event) -> tuple[list[int], float]:
        """On the worker thread; a prompt given up on while it waited is skipped."""
        try:
            if abandoned.is_set():
                return [], 0.0
            start = time.perf_counter()
            state = new_state(self.pair, torch.tensor([ids], dtype=torch.long), 1)
            return parts.select(state, method, protected), time.perf_counter() - start
        finally:
            self._leave()

    def _leave(self) -> None:
        with self._lock:
            self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)

    def _give_up(self, ids: list[int], reason: str, message: str, status: int, waited: float) -> Kept:
        self.metrics.compress_failures.labels(reason).inc()
        if self.on_error == "fail":
            headers = {"Retry-After": "5"} if status == 429 else None
            raise ApiError(status, message, type="server_error", code=reason, headers=headers)
        log.warning("%s: forwarding it uncut", message)
        return Kept(list(range(len(ids))), 0.0, waited, reason)


async def _wait(future: concurrent.futures.Future, timeout: float | None, http: Request | None):
    """The worker's result within `timeout` seconds, noticing a client that goes away meanwhile (`work.poll`)."""
    done: asyncio.Queue = asyncio.Queue(maxsize=1)
    wrapped = asyncio.wrap_future(future)
    wrapped.add_done_callback(done.put_nowait)
    wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when given up on
    return (await asyncio.wait_for(poll(done, http), timeout)).result()
