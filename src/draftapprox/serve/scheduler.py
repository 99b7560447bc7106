"""The engine of the server: one thread owns the models and schedules at the level of iterations, as vLLM does.

Each turn of its loop either admits the request at the head of the queue or runs one decode step of every running
sequence together (`generation.DecodeBatch`, each sequence on its own compressed cache). Admission is by memory:
a request reserves the KV bytes it will hold *after* compression (its kept prompt plus `max_tokens` positions), so a
method that keeps 256 pairs a head admits many more long requests than FullKV in the same pool. A request's
prefill, draft work included, runs in pieces of `prefill_chunk` tokens with a decode step of the running batch
between pieces (`forward.interleaved`), so running streams keep flowing while a long prompt is admitted.

The HTTP side talks to it only through `submit`/`cancel` and the events a job's `deliver` receives, called on the
engine thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import speculative as speculation
from ..cache import kv_bytes_per_token
from ..errors import DraftApproxError
from ..forward import PREFILL_CHUNK, interleaved
from ..generation import DecodeBatch, Result, Sampling, prepare
from ..methods import FullKV, Method
from ..models.loading import Pair
from .events import Failed
from .metrics import Metrics

log = logging.getLogger("draftapprox.serve")
AUTO_FIRST_PIECE = 16  # tokens of a prefill piece before its model's speed is known (auto prefill chunk)


@dataclass
class Token:
    """A new token of a job."""

    token: int


@dataclass
class Done:
    """The job ended normally; `result` has its text (stop strings cut) and record."""

    result: Result


Event = Token | Done | Failed


class Rejected(DraftApproxError):
    """A request the scheduler will not take: `status` 400 (can never fit), 429 (queue full) or 503 (stopping)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


_ids = itertools.count()


@dataclass
class Job:
    """One request as the engine sees it: token ids, a method, sampling, and where its events go."""

    ids: torch.Tensor  # (1, n)
    method: Method
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    deliver: Callable[[Event], None]
    timeout: float | None = None  # seconds from submission
    ignore_eos: bool = False
    speculative: int | str = 0  # draft tokens proposed per step (`speculative.parse`)
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.monotonic)
    need: int = 0  # KV bytes reserved while it runs
    cancelled: bool = False
    tokens: int = 0
    last_token: float | None = None

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.created > self.timeout


class _Abandoned(Exception):
    """Raised between prefill pieces when the job being prefilled was cancelled or timed out."""


class Scheduler:
    """Owns `pair` on a thread of its own; see the module docstring. Start with `start`, end with `stop`."""

    def __init__(self, pair: Pair, *, kv_cache_memory: int, max_queue: int = 64, prefill_chunk: int | None = None,
                 metrics: Metrics | None = None, static_decode: bool | None = None):
        if kv_cache_memory <= 0 or max_queue < 0 or (prefill_chunk is not None and prefill_chunk < 1):
            raise ValueError("kv_cache_memory and prefill_chunk must be positive, max_queue >= 0")
        self.pair, self.kv_cache_memory, self.max_queue = pair, kv_cache_memory, max_queue
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics or Metrics()
        self.per_token = kv_bytes_per_token(pair.target)
        self.draft_per_token = kv_bytes_per_token(pair.draft) if pair.draft is not None else 0
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._held = 0  # bytes reserved by running jobs and the one in prefill
        # fixed-shape decode steps, a CUDA graph per membership on a GPU (`DecodeBatch`'s `static`)
        self.static_decode = pair.target.device.type == "cuda" if static_decode is None else static_decode
        self._batch = DecodeBatch(pair, static=self.static_decode)
        self._prefilling: Job | None = None
        self._since_step = 0
        self._last_piece: dict[int, tuple[int, float]] = {}  # (tokens, seconds) of each model's last piece
        self._piece_began = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.step_seconds: deque[float] = deque(maxlen=256)  # recent decode steps, for `Retry-After`

    # --- the HTTP side ---------------------------------------------------------------------------------------

    def need(self, n: int, method: Method, max_tokens: int, speculative: int | str = 0) -> int:
        """KV bytes a request of `n` prompt tokens holds at most, after compression, by its last token; with
        speculative decoding, also the draft's cache of the whole prompt, its lookahead and its proposals."""
        kept = n if isinstance(method, FullKV) else min(method.tokens(n), n)
        draft = 0
        if speculative:
            ahead = (getattr(method, "lookahead", None) or 0) + speculation.MAX_AUTO
            draft = (n + max_tokens + ahead) * self.draft_per_token
        return (kept + max_tokens) * self.per_token + draft

    def submit(self, job: Job) -> None:
        """Queue a job, or raise `Rejected`: never fits the pool (400), queue full (429), stopping (503), or
        speculative decoding on a server of static steps (400)."""
        if job.speculative and self.static_decode:
            raise Rejected(400, "speculative decoding feeds several tokens a step; this server decodes with static "
                                "(CUDA-graph) steps (--static-decode)")
        job.need = self.need(job.ids.shape[1], job.method, job.max_tokens, job.speculative)
        if job.need > self.kv_cache_memory:
            raise Rejected(400, f"this request needs {_mib(job.need)} of KV cache ({job.ids.shape[1]} prompt tokens, "
                                f"{job.method.name}, max_tokens={job.max_tokens}), more than the server's "
                                f"--kv-cache-memory of {_mib(self.kv_cache_memory)}")
        with self._cond:
            if self._stopping:
                raise Rejected(503, "the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise Rejected(429, f"the queue is full ({self.max_queue} requests waiting); retry later",
                               retry_after=self._retry_after())
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away); its cache is freed within one scheduler step."""
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def held_bytes(self) -> int:
        """KV bytes reserved now by running requests (and the one being prefilled)."""
        return self._held

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="draftapprox-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop admitting; let queued and running requests finish for up to `timeout` seconds, then cancel them."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self._waiting or self._running or self._prefilling):
            time.sleep(0.05)
        with self._cond:
            for job in [*self._waiting, *self._running.values()]:
                job.cancelled = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    # --- the engine thread -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._stopping):
                    self._cond.wait()
                if self._stopping and not self._waiting and not self._running:
                    return
                job = self._admit()
            self._sweep()
            if job is not None:
                self._prefill(job)
            elif self._running:
                self._step()
            else:  # only cancelled jobs waited; let submitters in
                time.sleep(0.001)

    def _admit(self) -> Job | None:
        """The head of the queue if its reservation fits beside the running ones (first come, first served)."""
        while self._waiting and self._waiting[0].cancelled:
            self._waiting.popleft()
        if not self._waiting or self._held + self._waiting[0].need > self.kv_cache_memory:
            return None
        job = self._waiting.popleft()
        self.metrics.queue_depth.set(len(self._waiting))
        self._held += job.need
        self._prefilling = job
        return job

    def _sweep(self) -> None:
        """End cancelled and timed-out jobs, waiting or running, and free what they held."""
        now = time.monotonic()
        with self._cond:
            gone = [j for j in self._waiting if j.cancelled or j.expired(now)]
            for job in gone:
                self._waiting.remove(job)
            self.metrics.queue_depth.set(len(self._waiting))
        for job in gone:
            if not job.cancelled:
                job.deliver(Failed(408, f"the request timed out after {job.timeout:g} s in the queue", "timeout"))
        for job in [j for j in self._running.values() if j.cancelled or j.expired(now)]:
            self._batch.leave(job.id)
            self._release(job)
            if not job.cancelled:
                job.deliver(Failed(408, f"the request timed out after {job.timeout:g} s", "timeout"))
        self._gauges()

    def _prefill(self, job: Job) -> None:
        self._since_step = 0
        try:
            with interleaved(self._piece, self._between):
                prepared = prepare(self.pair, job.ids, job.method, max_new_tokens=job.max_tokens,
                                   sampling=job.sampling, stop=job.stop, ignore_eos=job.ignore_eos,
                                   speculative=job.speculative)
        except _Abandoned:
            self._held -= job.need
            if not job.cancelled:
                job.deliver(Failed(408, f"the request timed out after {job.timeout:g} s in its prefill", "timeout"))
            return
        except DraftApproxError as error:
            self._held -= job.need
            job.deliver(Failed(400, str(error), "invalid_request_error"))
            return
        except Exception as error:  # one request's failure must not take the server down
            log.exception("request %s failed in its prefill", job.id)
            self._held -= job.need
            job.deliver(Failed(500, f"{type(error).__name__}: {error}"))
            return
        finally:
            self._prefilling = None
        record = prepared.record
        self.metrics.prompt_tokens.inc(record.prompt_tokens)
        self.metrics.kept_tokens.inc(record.kept_tokens or record.budget_tokens or record.prompt_tokens)
        actual = record.kv_bytes_kept + job.max_tokens * self.per_token
        if prepared.drafter is not None:
            actual += record.kv_bytes_draft + (job.max_tokens + speculation.MAX_AUTO) * self.draft_per_token
        self._held += actual - job.need  # the estimate becomes what the cache really holds
        job.need = actual
        self._running[job.id] = job
        self._batch.join(prepared, key=job.id)
        self._gauges()

    def _piece(self, model) -> int:
        """Prompt tokens the next prefill piece may run: small only while some stream waits for its next token.

        `prefill_chunk` None (auto) steers each model's pieces toward about three recent decode steps of time:
        the next piece is the last one scaled by how far its time was from that budget. A piece has a fixed cost
        (the weights are read once a piece) besides its per-token one, so the steering converges where a
        per-token rate would undershoot. The running streams' gaps then stay near four steps, on a CPU where a
        16-token piece of the 1.5B takes half a second as on a GPU where a thousand take milliseconds."""
        self._piece_began = time.perf_counter()
        if not self._running:
            return PREFILL_CHUNK
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        last = self._last_piece.get(id(model))
        if last is None or not self.step_seconds:
            return AUTO_FIRST_PIECE
        tokens, seconds = last
        budget = 3 * sorted(self.step_seconds)[len(self.step_seconds) // 2]
        return max(AUTO_FIRST_PIECE, min(PREFILL_CHUNK, int(tokens * min(2.0, budget / max(seconds, 1e-6)))))

    def _between(self, model, tokens: int) -> None:
        """Between two prefill pieces: abandon a cancelled prefill, or run a decode step once enough ran."""
        self._last_piece[id(model)] = (tokens, time.perf_counter() - self._piece_began)
        job = self._prefilling
        if job is not None and (job.cancelled or job.expired(time.monotonic())):
            raise _Abandoned
        self._since_step += tokens
        if self._running and (self.prefill_chunk is None or self._since_step >= self.prefill_chunk):
            self._since_step = 0
            self._sweep()
            if self._running:
                self._step()

    def _step(self) -> None:
        began = time.perf_counter()
        try:
            steps = self._batch.step()
        except Exception as error:  # a failed batch forward fails its members, not the server
            log.exception("a decode step failed")
            for job in list(self._running.values()):
                self._release(job)
                job.deliver(Failed(500, f"{type(error).__name__}: {error}"))
            self._batch = DecodeBatch(self.pair, static=self.static_decode)
            return
        now, seconds = time.monotonic(), time.perf_counter() - began
        self.step_seconds.append(seconds)
        self.metrics.decode_step.labels(str(len(steps))).observe(seconds)
        for step in steps:
            job = self._running[step.key]
            job.tokens += len(step.tokens)
            self.metrics.generation_tokens.inc(len(step.tokens))
            if job.last_token is None:
                self.metrics.ttft.observe(now - job.created)
            else:  # tokens that come together arrive together: their gap is the step's
                self.metrics.itl.observe(now - job.last_token)
            job.last_token = now
            for token in step.tokens:
                job.deliver(Token(token))
            if step.result is not None:
                self._release(job)
                self.metrics.e2e.observe(now - job.created)
                self.metrics.speculated(step.result.record.proposed_tokens, step.result.record.accepted_tokens)
                job.deliver(Done(step.result))
        self._gauges()

    def _release(self, job: Job) -> None:
        if self._running.pop(job.id, None) is not None:
            self._held -= job.need

    def _gauges(self) -> None:
        self.metrics.running.set(len(self._running))
        self.metrics.kv_bytes.set(self._batch.kv_bytes())  # the running jobs are the batch's members

    def _retry_after(self) -> float:
        """Seconds until a queue slot is likely free: the queue's tokens at the recent step rate, at least 1."""
        step = sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else 1.0
        return max(1.0, round(step * min((j.max_tokens for j in self._waiting), default=1)))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
