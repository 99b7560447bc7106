"""The backend that generates on this server's own target: each request a job on the scheduler, its tokens turned
into text deltas as they come."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ..generation import Result
from .events import Delta, Failed, Finished
from .protocol import ApiError
from .request import Work, poll
from .scheduler import Done, Job, Rejected, Scheduler, Token


class TextStream:
    """Incremental text of a growing token list, holding back what may still change: a partial UTF-8 character,
    and the last characters that could be the start of a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        safe = len(text) - self.hold
        while safe > 0 and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):safe], text[:safe]
        return delta

    def finish(self, final: str) -> str:
        """The rest of the final text (stop strings cut) after what was sent."""
        return final[len(self.sent):] if final.startswith(self.sent) else ""


def _usage(result: Result) -> dict:
    prompt, completion = result.record.prompt_tokens, result.record.new_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class LocalBackend:
    """Requests answered by `scheduler` (see `scheduler.Scheduler`)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler, self.metrics, self.tokenizer = scheduler, scheduler.metrics, scheduler.pair.tokenizer

    def start(self) -> None:
        self.scheduler.start()

    def stop(self, timeout: float) -> None:
        self.scheduler.stop(timeout)

    def open(self, work: Work) -> AsyncIterator[Delta | Finished | Failed]:
        """Queue the job now (a refusal is an `ApiError` here, before any response starts); its events follow."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(event) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(work.ids, work.method, work.max_tokens, work.sampling, work.stop, deliver, timeout=work.timeout,
                  ignore_eos=work.ignore_eos, speculative=work.speculative)
        try:
            self.scheduler.submit(job)
        except Rejected as error:
            headers = {"Retry-After": str(int(error.retry_after))} if error.retry_after else None
            raise ApiError(error.status, str(error), type="server_error" if error.status >= 500 else
                           "invalid_request_error", code={429: "queue_full", 503: "unavailable"}.get(error.status),
                           headers=headers) from None
        return self._events(job, events, work)

    async def _events(self, job: Job, events: asyncio.Queue, work: Work) -> AsyncIterator[Delta | Finished | Failed]:
        text = TextStream(self.tokenizer, work.stop)
        try:
            while True:
                event = await poll(events, work.http)
                if isinstance(event, Token):
                    delta = text.push(event.token)
                    if delta:
                        yield Delta(delta)
                elif isinstance(event, Failed):
                    yield event
                    return
                elif isinstance(event, Done):
                    result = event.result
                    yield Finished(result.text, text.finish(result.text),
                                   "length" if result.record.stop_reason == "length" else "stop", _usage(result),
                                   {**result.record.to_dict(), "config": work.method.describe()})
                    return
        finally:  # finished, failed, or the client went away: the scheduler frees its cache at the next step
            self.scheduler.cancel(job)
