"""The scheduler without HTTP: admission by KV bytes after compression, and prefill interleaved with decoding."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from draftapprox.generation import Sampling
from draftapprox.methods import FullKV, SpecKV
from draftapprox.serve.scheduler import Done, Failed, Job, Rejected, Token

from .conftest import tiny_service


class Recorder:
    """Collects a job's events on the engine thread, with how many jobs were running at each token."""

    def __init__(self, scheduler):
        self.scheduler, self.events, self.running_at_token = scheduler, [], []
        self.finished = threading.Event()

    def __call__(self, event) -> None:
        self.events.append((time.monotonic(), event))
        if isinstance(event, Token):
            self.running_at_token.append(len(self.scheduler._running))
        if isinstance(event, Done | Failed):
            self.finished.set()


def job(scheduler, n: int, method, max_tokens: int, seed: int = 0) -> tuple[Job, Recorder]:
    ids = torch.randint(0, 500, (1, n), generator=torch.Generator().manual_seed(seed))
    recorder = Recorder(scheduler)
    return Job(ids, method, max_tokens, Sampling(), [], recorder, ignore_eos=True), recorder


@pytest.fixture
def service():
    service = tiny_service(kv_cache_memory=1)  # replaced per test
    yield service
    service.backend.scheduler.stop(5)


def most_running(service, method, count: int) -> int:
    scheduler = service.backend.scheduler
    recorders = []
    for i in range(count):
        j, r = job(scheduler, 1000, method, 200, seed=i)
        scheduler.submit(j)
        recorders.append(r)
    for r in recorders:
        assert r.finished.wait(120)
        assert isinstance(r.events[-1][1], Done)
    assert scheduler.held_bytes() == 0
    return max(max(r.running_at_token) for r in recorders)


def test_admission_follows_the_bytes_held_after_compression(service):
    scheduler = service.backend.scheduler
    # two FullKV requests fit, and ten SpecKV ones; each lives long enough (200 tokens) to see the others admitted
    scheduler.kv_cache_memory = scheduler.need(1000, FullKV(), 200) * 2
    scheduler.prefill_chunk = 256  # few decode steps per admission: the first is still running when the last joins
    scheduler.start()
    full = most_running(service, FullKV(), 8)
    compressed = most_running(service, SpecKV(24, window=4, lookahead=2), 8)
    assert full <= 2 and compressed == 8


def test_a_request_that_can_never_fit_is_refused_naming_the_limit(service):
    scheduler = service.backend.scheduler
    scheduler.kv_cache_memory = scheduler.need(100, FullKV(), 10)
    j, _ = job(scheduler, 101, FullKV(), 10)
    with pytest.raises(Rejected, match="--kv-cache-memory") as refused:
        scheduler.submit(j)
    assert refused.value.status == 400


@pytest.mark.parametrize("chunk", [16, None], ids=["16", "auto"])
def test_streams_keep_flowing_while_a_long_prompt_is_prefilled(service, chunk):
    scheduler = service.backend.scheduler
    scheduler.kv_cache_memory, scheduler.prefill_chunk = 2**30, chunk
    scheduler.start()
    running, first = job(scheduler, 50, FullKV(), 400)
    scheduler.submit(running)
    while len(first.events) < 20:  # a steady stream first
        time.sleep(0.01)
    long_job, second = job(scheduler, 1500, FullKV(), 2, seed=1)
    submitted = time.monotonic()
    scheduler.submit(long_job)
    assert second.finished.wait(120)
    first_token = next(t for t, e in second.events if isinstance(e, Token))
    during = [e for t, e in first.events if submitted < t < first_token and isinstance(e, Token)]
    if chunk == 16:  # 1500 prompt tokens in pieces of 16: a decode step of the running request after each piece
        assert len(during) >= 1500 // 16 - 5
    else:  # auto: pieces of about three decode steps' time, each followed by a decode step: never one piece
        pieces = scheduler._last_piece[id(service.pair.target)][0]
        assert pieces < 1500 and len(during) >= 5, (pieces, len(during))
    scheduler.cancel(running)


def test_fixed_shape_decode_steps_give_the_eager_loops_tokens():
    """The decode batch over fixed-shape storage (a CUDA graph on a GPU; eager here) writes the tokens of the
    ordinary loop, with sequences joining and leaving between steps."""
    answers = {}
    for static in (False, True):
        service = tiny_service(method="speckv", budget=16, kv_cache_memory=64 * 2**20, static_decode=static)
        scheduler = service.backend.scheduler
        assert scheduler.static_decode is static and scheduler._batch._static_steps is static
        scheduler.start()
        try:
            recorders = []
            for i, (n, tokens) in enumerate([(300, 12), (200, 5), (250, 9)]):
                j, r = job(scheduler, n, SpecKV(16, window=4), tokens, seed=i)
                scheduler.submit(j)
                recorders.append(r)
            for r in recorders:
                assert r.finished.wait(120) and isinstance(r.events[-1][1], Done)
            answers[static] = [[e.token for _, e in r.events if isinstance(e, Token)] for r in recorders]
        finally:
            scheduler.stop(5)
    assert answers[True] == answers[False] and [len(a) for a in answers[True]] == [12, 5, 9]
