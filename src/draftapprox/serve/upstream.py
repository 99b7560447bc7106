"""The backend in front of another engine (`draftapprox serve --upstream URL`): SpecPC, or another prompt method, cuts
each long prompt on the draft, and the upstream engine (vLLM, SGLang, llama.cpp) answers the shorter one.

Compression works on token ids, and ids are forwarded (`/v1/completions` with a token-array prompt), so no token is
lost in translation; that is only meaningful when the upstream's tokenizer is the draft's, which `check_upstream`
verifies at start on a probe text. A chat is rendered with the template here and forwarded as ids, its structure
protected (`protected_positions`); `--chat-forward messages` instead sends the compressed contents to the
upstream's own `/v1/chat/completions`. An upstream that refuses ids gets text, and its own count of what it
received is checked against ours. A prompt the engine's prefix cache mostly holds is forwarded whole, and a document
asked about again gets the cut it got the first time (`PrefixLedger`), so the proxy does not lose to that cache.

The draft is a shared resource: compressions run one at a time on a worker thread, at most `max_queue` waiting,
so the event loop never blocks; streams relay concurrently.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from ..errors import InputError
from ..generation import compress_prompt, new_state
from ..models.loading import Pair
from .events import Delta, Failed, Finished
from .metrics import Metrics
from .prefix import Plan, PrefixLedger
from .protocol import ApiError
from .work import Disconnected, Work, poll

log = logging.getLogger("draftapprox.serve")
PROBE = "Draft-based approximate inference: 12345 + ünïcode 日本語 \n\tdef f(x): return x**2"
LONG_CONTENT = 128  # tokens: a message content shorter than this is structure, kept whole


@dataclass
class Upstream:
    """Where requests go and how: `ids` (token-array prompts) or text, chat as ids or as messages."""

    url: str  # the OpenAI base, ending in /v1
    model: str
    api_key: str | None = None
    timeout: float = 600.0  # seconds without a byte from the upstream before a 504
    ids: bool = True
    chat_messages: bool = False  # --chat-forward messages

    @property
    def root(self) -> str:
        return self.url.removesuffix("/").removesuffix("/v1")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _first_difference(tokenizer, ours: list[int], theirs: list[int]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    mine = f"id {ours[i]} {tokenizer.decode([ours[i]])!r}" if i < len(ours) else "the end"
    other = f"id {theirs[i]}" if i < len(theirs) else "the end"
    return f"at token {i} of the probe the draft has {mine}, the upstream {other}"


def upstream_tokens(upstream: Upstream, text: str) -> list[int] | None:
    """The upstream's ids for `text` without special tokens, through `/tokenize` (llama.cpp's or vLLM's body); None
    if it has no such route."""
    bodies = [{"content": text, "add_special": False},  # llama.cpp
              {"model": upstream.model, "prompt": text, "add_special_tokens": False}]  # vLLM, SGLang
    for body in bodies:
        try:
            response = httpx.post(f"{upstream.root}/tokenize", json=body, headers=upstream.headers(), timeout=30)
        except httpx.HTTPError:
            return None
        if response.status_code == 200:
            tokens = response.json().get("tokens")
            if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens):
                return tokens
    return None


def check_upstream(url: str, tokenizer, *, model: str | None = None, api_key: str | None = None,
                   timeout: float = 600.0, allow_text: bool = False, chat_messages: bool = False,
                   say=print) -> tuple[Upstream, int | None]:
    """Reach the upstream, learn its model name and context, and compare its tokenizer with the draft's on a probe.

    A tokenizer that differs refuses the start, naming the first difference, unless `allow_text` chooses text mode
    (with a warning: ids would mean other tokens there). Returns the upstream and its context length, if it says.
    """
    base = url.rstrip("/")
    if not base.endswith("/v1"):
        raise InputError(f"--upstream must be an OpenAI base URL ending in /v1, got {url!r}")
    probe = Upstream(base, model or "", api_key, timeout)
    try:
        listed = httpx.get(f"{base}/models", headers=probe.headers(), timeout=30)
    except httpx.HTTPError as error:
        raise InputError(f"the upstream {base} cannot be reached: {error}") from None
    if listed.status_code != 200:
        raise InputError(f"the upstream {base} answered {listed.status_code} to GET /models: {listed.text[:200]}")
    data = listed.json().get("data") or []
    names = [m.get("id") for m in data]
    if model is None:
        if not names:
            raise InputError(f"the upstream {base} lists no model; pass --upstream-model")
        model = names[0]
    entry = next((m for m in data if m.get("id") == model), {})
    context = entry.get("max_model_len") or (entry.get("meta") or {}).get("n_ctx_train")
    upstream = Upstream(base, model, api_key, timeout, chat_messages=chat_messages)
    ours = tokenizer.encode(PROBE, add_special_tokens=False)
    theirs = upstream_tokens(upstream, PROBE)
    if theirs is None:
        upstream.ids = False
        say("warning: the upstream has no /tokenize route, so its tokenizer cannot be checked: forwarding text, and "
            "checking its token counts per request")
    elif theirs != ours:
        difference = _first_difference(tokenizer, ours, theirs)
        if not allow_text:
            raise InputError(f"the upstream's tokenizer is not the draft's: {difference}. Point the proxy at an "
                             "engine serving the draft's model family, or pass --allow-text to forward text")
        upstream.ids = False
        say(f"warning: the upstream's tokenizer is not the draft's ({difference}); forwarding text")
    elif not _takes_ids(upstream, ours):
        upstream.ids = False
        say("warning: the upstream refuses token-id prompts: forwarding text, and checking its token counts per "
            "request")
    return upstream, context


def _takes_ids(upstream: Upstream, ids: list[int]) -> bool:
    """Whether `/v1/completions` accepts a token-array prompt (a one-token answer to the probe's ids)."""
    body = {"model": upstream.model, "prompt": ids, "max_tokens": 1, "temperature": 0}
    try:
        response = httpx.post(f"{upstream.url}/completions", json=body, headers=upstream.headers(), timeout=120)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def content_positions(tokenizer, messages: list[dict]) -> tuple[int, list[list[int] | None]]:
    """The chat rendered by the template: its length in tokens, and per message the positions of the tokens of its
    content (None where the template does not show the content verbatim)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    contents, cursor = [], 0
    for message in messages:
        start = text.find(message["content"], cursor)
        if start < 0:
            contents.append(None)
            continue
        end = cursor = start + len(message["content"])
        contents.append([i for i, (a, b) in enumerate(offsets) if start <= a and b <= end and b > a])
    return len(offsets), contents


def protected_positions(tokenizer, messages: list[dict], n: int) -> set[int]:
    """Positions of a rendered chat that compression must keep: everything but the long contents of user and
    assistant messages (role markers, special tokens, the system prompt, short turns, the generation prompt).
    SpecPC's own window keeps the end of the conversation, where the question is."""
    length, contents = content_positions(tokenizer, messages)
    if length != n:  # the route rendered the same conversation: a mismatch would cut blindly
        return set(range(n))
    cuttable = set()
    for message, members in zip(messages, contents, strict=True):
        # a content too short to be worth cutting is kept whole
        if members is not None and message["role"] != "system" and len(members) >= LONG_CONTENT:
            cuttable.update(members)
    return set(range(n)) - cuttable


class UpstreamBackend:
    """Requests answered by `upstream`, each prompt of at least `min_prompt_tokens` first cut by its method."""

    def __init__(self, pair: Pair, upstream: Upstream, *, max_queue: int = 64, min_prompt_tokens: int = 1024,
                 metrics: Metrics | None = None, prefix_reuse: bool = True):
        self.pair, self.upstream, self.max_queue = pair, upstream, max_queue
        self.min_prompt_tokens = min_prompt_tokens
        self.ledger = PrefixLedger() if prefix_reuse else None
        self.metrics = metrics or Metrics()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="draftapprox-draft")
        self._waiting = 0
        self._lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None

    def start(self) -> None:
        pass

    def stop(self, timeout: float) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def open(self, work: Work) -> AsyncIterator[Delta | Finished | Failed]:
        ids = work.ids[0].tolist()
        if work.method is None:
            plan = Plan("none")
        elif len(ids) < self.min_prompt_tokens:
            plan = Plan("short")
        else:
            plan = self.ledger.plan(ids, self.min_prompt_tokens) if self.ledger else Plan(None)
        future = None
        if plan.reason is None:
            with self._lock:
                if self._waiting >= self.max_queue:
                    raise ApiError(429, f"the draft's queue is full ({self.max_queue} prompts waiting); retry later",
                                   type="server_error", code="queue_full", headers={"Retry-After": "5"})
                self._waiting += 1
                self.metrics.queue_depth.set(self._waiting)
            future = self._worker.submit(self._compress, work)
        return self._events(work, future, plan)

    def _compress(self, work: Work) -> tuple[list[int], float]:
        """On the worker thread: the kept positions of the prompt (structure protected) and the seconds it took."""
        try:
            began = time.perf_counter()
            state = new_state(self.pair, work.ids, 1)
            kept = set(compress_prompt(state, work.method)[0].tolist())
            if work.messages is not None:
                kept |= protected_positions(self.pair.tokenizer, work.messages, work.ids.shape[1])
            return sorted(kept), time.perf_counter() - began
        finally:
            with self._lock:
                self._waiting -= 1
                self.metrics.queue_depth.set(self._waiting)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            timeout = httpx.Timeout(self.upstream.timeout, connect=10.0)
            self._client = httpx.AsyncClient(timeout=timeout, headers=self.upstream.headers())
        return self._client

    async def _events(self, work: Work, future, plan: Plan) -> AsyncIterator[Delta | Finished | Failed]:
        began = time.perf_counter()
        n = work.ids.shape[1]
        positions, draft_seconds = list(range(n)), 0.0
        if plan.reason == "shared":  # the earlier cut of the shared prefix, the rest whole
            positions = [*plan.positions, *range(plan.shared, n)]
        if future is not None:
            try:
                positions, draft_seconds = await _wait(future, work)
            except Disconnected:
                future.cancel()
                raise
            except Exception as error:  # one prompt's failure in the draft fails that request alone
                log.exception("compressing a prompt failed")
                yield Failed(500, f"{type(error).__name__}: {error}")
                return
        kept = work.ids[0, positions].tolist()
        if self.ledger is not None:
            if len(kept) == n:
                self.ledger.forwarded_whole(kept)
            else:
                self.ledger.cut(work.ids[0].tolist(), positions)
        self.metrics.prompt_tokens.inc(n)
        self.metrics.kept_tokens.inc(len(kept))
        sent = time.perf_counter()
        body, path = self._body(work, kept, positions)
        text_parts: list[str] = []
        finish, usage, first = "length", None, None
        try:
            async with self._http().stream("POST", f"{self.upstream.url}{path}", json=body) as response:
                if response.status_code != 200:
                    yield await _relayed_error(response, self.upstream.url)
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        message = (chunk["error"] or {}).get("message", "an error")
                        yield Failed(502, f"the upstream {self.upstream.url} failed mid-answer: {message}")
                        return
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                        if piece:
                            if first is None:
                                first = time.perf_counter()
                            text_parts.append(piece)
                            yield Delta(piece)
                        if choice.get("finish_reason"):
                            finish = "length" if choice["finish_reason"] == "length" else "stop"
        except httpx.TimeoutException:
            yield Failed(504, f"the upstream {self.upstream.url} sent nothing for {self.upstream.timeout:g} s",
                         "timeout")
            return
        except httpx.HTTPError as error:
            yield Failed(502, f"the upstream {self.upstream.url} cannot be reached: {error}", "upstream_error")
            return
        upstream_prompt = (usage or {}).get("prompt_tokens")
        self._check_count(upstream_prompt, len(kept), work)
        text = "".join(text_parts)
        completion = (usage or {}).get("completion_tokens")
        if completion is None:  # an upstream that sends no usage: count what it sent
            completion = len(self.pair.tokenizer.encode(text, add_special_tokens=False))
        timings = {"draft": draft_seconds, "queue": max(0.0, sent - began - draft_seconds),
                   "upstream_first_token": (first or time.perf_counter()) - sent}
        extension = {"method": work.method.name if work.method is not None else "none",
                     "config": work.method.describe() if work.method is not None else "none",
                     "prompt_tokens": n, "kept_tokens": len(kept), "upstream_prompt_tokens": upstream_prompt,
                     "forwarded": "ids" if self.upstream.ids else "text",
                     "forwarded_whole": plan.reason if plan.reason != "shared" else None,
                     "reused_cut_tokens": plan.shared, "timings": timings}
        yield Finished(text, "", finish,
                       {"prompt_tokens": n, "completion_tokens": completion, "total_tokens": n + completion},
                       extension)

    def _body(self, work: Work, kept: list[int], positions: list[int]) -> tuple[dict, str]:
        common = {"model": self.upstream.model, "max_tokens": work.max_tokens, "stream": True,
                  "stream_options": {"include_usage": True}, **work.fields}
        if work.stop:
            common["stop"] = work.stop
        if work.ignore_eos:
            common["ignore_eos"] = True
        if work.messages is not None and self.upstream.chat_messages:
            return {**common, "messages": self._messages(work, positions)}, "/chat/completions"
        tokenizer = self.pair.tokenizer
        prompt = kept if self.upstream.ids else tokenizer.decode(kept)
        return {**common, "prompt": prompt}, "/completions"

    def _messages(self, work: Work, positions: list[int]) -> list[dict]:
        """Each message with only its kept tokens (messages mode): the structure is the upstream's to render."""
        if len(positions) == work.ids.shape[1]:
            return work.messages
        tokenizer, kept, ids = self.pair.tokenizer, set(positions), work.ids[0].tolist()
        _, contents = content_positions(tokenizer, work.messages)
        return [message if members is None or kept.issuperset(members) else
                {**message, "content": tokenizer.decode([ids[i] for i in members if i in kept])}
                for message, members in zip(work.messages, contents, strict=True)]

    def _check_count(self, upstream_prompt: int | None, sent: int, work: Work) -> None:
        """In text mode, the upstream's own count of the forwarded prompt must be within 1% of ours."""
        if self.upstream.ids or upstream_prompt is None or (work.messages is not None and self.upstream.chat_messages):
            return
        if abs(upstream_prompt - sent) > 0.01 * sent:
            self.metrics.token_mismatch.inc()
            log.warning("the upstream counted %d prompt tokens where the draft forwarded %d", upstream_prompt, sent)


async def _wait(future: concurrent.futures.Future, work: Work):
    """The worker's result, noticing a client that goes away meanwhile."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    wrapped = asyncio.wrap_future(future)
    wrapped.add_done_callback(lambda f: loop.call_soon(queue.put_nowait, f))
    done = await poll(queue, work.http)
    return done.result()


async def _relayed_error(response: httpx.Response, url: str) -> Failed:
    """An upstream 4xx keeps its status and message; anything else is a 502 naming the upstream."""
    raw = (await response.aread()).decode("utf-8", "replace")
    try:
        message = json.loads(raw).get("error", {}).get("message") or raw
    except (json.JSONDecodeError, AttributeError):
        message = raw
    message = str(message)[:500]
    if 400 <= response.status_code < 500:
        return Failed(response.status_code, f"the upstream refused the request: {message}", "invalid_request_error")
    return Failed(502, f"the upstream {url} answered {response.status_code}: {message}", "upstream_error")

