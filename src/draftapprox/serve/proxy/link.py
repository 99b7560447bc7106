"""The proxy's view of its upstream engine: whether it answers (and why not), the models it serves, and, per model,
whether its tokenizer is the draft's, which decides how a cut prompt may be forwarded.

Engines take minutes to load and are started beside the proxy, so an engine that does not answer yet is a state,
not an error: the link probes it in the background and again whenever a request or `/health` asks, and runs the
tokenizer check each time the engine (re)appears, since a restarted engine may serve another model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import httpx

from ..protocol import ApiError

log = logging.getLogger("draftapprox.serve")
PROBE = "Draft-based approximate inference: 12345 + ünïcode 日本語 \n\tdef f(x): return x**2"


@dataclass
class Upstream:
    """Where requests go: an OpenAI base URL (ending in /v1), the model a request for the proxy's own name goes to
    (default: the first the engine lists), a key, and how long the engine may stay silent mid-answer."""

    url: str
    model: str | None = None
    api_key: str | None = None
    timeout: float = 600.0

    @property
    def root(self) -> str:
        return self.url.removesuffix("/").removesuffix("/v1")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class Verdict:
    """How prompts for one model may be forwarded: as the draft's token ids (the tokenizers agree and the engine
    takes ids), as text, or not cut at all; `note` says why when it is not ids. An unsettled verdict (the engine
    did not answer the check) holds for one request only."""

    ids: bool
    cut: bool
    note: str | None = None
    settled: bool = True


class _Unsure(Exception):
    """The engine gave no definite answer to a check (busy, loading, a timeout): ask again later."""


@dataclass
class Link:
    upstream: Upstream
    tokenizer: object
    allow_text: bool = False  # cut and forward text to a model whose tokenizer differs from the draft's
    retry: float = 1.0  # the least seconds between two probes of an engine that does not answer
    ready: bool = False
    problem: str | None = "not probed yet"
    models: list[str] = field(default_factory=list)
    contexts: dict[str, int] = field(default_factory=dict)
    _verdicts: dict[str, Verdict] = field(default_factory=dict)
    _generation: int = 0  # bumped whenever the engine (re)appears or changes what it lists
    _probed: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)  # one probe at a time
    _checking: threading.Lock = field(default_factory=threading.Lock)  # one tokenizer check at a time

    def refresh(self, force: bool = False) -> bool:
        """Probe the engine unless it was probed within `retry` seconds (or `force`); whether it answers."""
        with self._lock:
            if not force and time.monotonic() - self._probed < self.retry:
                return self.ready
            self._probed = time.monotonic()
            was = self.ready
            try:
                listed = self._listing()
            except Exception as error:  # whatever the engine answers, the proxy stays up and says what it saw
                return self._down(str(error) if isinstance(error, _Down) else
                                  f"the upstream {self.upstream.url} answered GET /models unexpectedly: {error!r}")
            if not was or listed != (self.models, self.contexts):
                self.models, self.contexts = listed
                self._generation += 1  # a restarted or changed engine may serve another model: check it again
                self._verdicts.clear()
            self.ready, self.problem = True, None
        if not was:
            verdict = self.verdict(self.model())
            log.warning("the upstream %s answers: %s, forwarding %s%s", self.upstream.url, self.model(),
                        "ids" if verdict.ids else "text" if verdict.cut else "uncut",
                        f" ({verdict.note})" if verdict.note else "")
        return True

    def _listing(self) -> tuple[list[str], dict[str, int]]:
        url = self.upstream.url
        try:
            listed = httpx.get(f"{url}/models", headers=self.upstream.headers(), timeout=10)
        except httpx.HTTPError as error:
            raise _Down(f"the upstream {url} cannot be reached: {error or type(error).__name__}") from None
        if listed.status_code != 200:
            raise _Down(f"the upstream {url} answered {listed.status_code} to GET /models: {listed.text[:200]}")
        data = listed.json().get("data")
        entries = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] \
            if isinstance(data, list) else []
        if not entries:
            raise _Down(f"the upstream {url} lists no model yet")
        # the context the engine serves (vLLM, SGLang, ours); llama.cpp lists only its model's training context,
        # which may exceed what the server was started with, so none is taken from it
        contexts = {m["id"]: m["max_model_len"] for m in entries if isinstance(m.get("max_model_len"), int)
                    and not isinstance(m["max_model_len"], bool) and m["max_model_len"] > 0}
        return [m["id"] for m in entries], contexts

    def _down(self, problem: str) -> bool:
        if self.ready or self.problem != problem:
            log.warning("%s", problem)
        self.ready, self.problem = False, problem
        return False

    def lost(self, error: Exception) -> None:
        """A request could not reach the engine: it is down until a probe says otherwise. Called on the event
        loop, so it takes no lock (a probe may hold it for seconds)."""
        self._probed = float("-inf")
        self._down(f"the upstream {self.upstream.url} cannot be reached: {error or type(error).__name__}")

    def model(self, asked: str | None = None) -> str:
        """The engine's name for a request's `model`: the proxy's own name (or none) means the default model."""
        if asked and asked in self.models:
            return asked
        return self.upstream.model or (self.models[0] if self.models else "")

    def context(self, model: str) -> int | None:
        return self.contexts.get(model)

    def verdict(self, model: str) -> Verdict:
        """How to forward `model`'s prompts, checked once per model and appearance of the engine (blocking: call
        it off the event loop)."""
        found = self._verdicts.get(model)
        if found is not None:
            return found
        with self._checking:
            found = self._verdicts.get(model)
            if found is not None:
                return found
            generation = self._generation
            found = self._check(model)
            if found.settled and generation == self._generation:
                self._verdicts[model] = found
        return found

    def _check(self, model: str) -> Verdict:
        ours = self.tokenizer.encode(PROBE, add_special_tokens=False)
        try:
            theirs = upstream_tokens(self.upstream, model, PROBE)
            takes_ids = theirs == ours and _takes_ids(self.upstream, model, ours)
        except _Unsure as error:
            return Verdict(False, False, f"the tokenizer check got no answer yet ({error}): forwarding uncut",
                           settled=False)
        if theirs is None:
            return Verdict(False, True, "the upstream has no /tokenize route, so its tokenizer cannot be checked: "
                                        "forwarding text, its token counts checked per request")
        if theirs != ours:
            difference = _first_difference(self.tokenizer, ours, theirs)
            if self.allow_text:
                return Verdict(False, True, f"the upstream's tokenizer is not the draft's ({difference}): "
                                            "forwarding text (--allow-text)")
            return Verdict(False, False, f"the upstream's tokenizer is not the draft's ({difference}): forwarding "
                                         "prompts uncut; serve a model of the draft's family, or pass --allow-text "
                                         "to cut text")
        if not takes_ids:
            return Verdict(False, True, "the upstream refuses token-id prompts: forwarding text, its token counts "
                                        "checked per request")
        return Verdict(True, True)

    async def answering(self) -> None:
        """Return once the engine answers (probing it again if it was down); a request meanwhile gets a 502 naming
        it, to be retried."""
        if not self.ready and not await asyncio.to_thread(self.refresh):
            raise ApiError(502, self.problem or f"the upstream {self.upstream.url} is not ready",
                           type="server_error", code="upstream_unavailable", headers={"Retry-After": "5"})

    def health(self) -> dict:
        """What /health says (blocking: it may run the tokenizer check)."""
        if not self.ready:
            return {"status": "unavailable", "upstream": self.upstream.url, "error": self.problem}
        verdict = self.verdict(self.model())
        return {"status": "ok", "upstream": self.upstream.url, "model": self.model(),
                "forwarding": "ids" if verdict.ids else "text" if verdict.cut else "uncut", "note": verdict.note}


class _Down(Exception):
    """The engine does not answer as an engine: the message says how."""


def _first_difference(tokenizer, ours: list[int], theirs: list[int]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    mine = f"id {ours[i]} {tokenizer.decode([ours[i]])!r}" if i < len(ours) else "the end"
    other = f"id {theirs[i]}" if i < len(theirs) else "the end"
    return f"at token {i} of the probe the draft has {mine}, the upstream {other}"


def upstream_tokens(upstream: Upstream, model: str, text: str) -> list[int] | None:
    """The upstream's ids for `text` without special tokens, through `/tokenize` (llama.cpp's or vLLM's body); None
    if it has no such route. Raises `_Unsure` where it gave no definite answer."""
    bodies = [{"content": text, "add_special": False},  # llama.cpp
              {"model": model, "prompt": text, "add_special_tokens": False}]  # vLLM, SGLang
    for body in bodies:
        response = _post(upstream, f"{upstream.root}/tokenize", body, 30)
        if response.status_code == 200:
            try:
                tokens = response.json().get("tokens")
            except (ValueError, AttributeError):
                tokens = None
            if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens):
                return tokens
    return None


def _takes_ids(upstream: Upstream, model: str, ids: list[int]) -> bool:
    """Whether `/v1/completions` accepts a token-array prompt (a one-token answer to the probe's ids)."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0}
    return _post(upstream, f"{upstream.url}/completions", body, 120).status_code == 200


def _post(upstream: Upstream, url: str, body: dict, timeout: float) -> httpx.Response:
    """A check's request; an engine that is busy, loading or unreachable is `_Unsure`, not a verdict."""
    try:
        response = httpx.post(url, json=body, headers=upstream.headers(), timeout=timeout)
    except httpx.HTTPError as error:
        raise _Unsure(f"{url}: {error or type(error).__name__}") from None
    if response.status_code == 429 or response.status_code >= 500:
        raise _Unsure(f"{url} answered {response.status_code}")
    return response
