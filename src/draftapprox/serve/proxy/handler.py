"""One request through the proxy: take our own `draftapprox` field off, cut the long text of its prompt on the
draft, forward everything else to the engine as it came, and relay the engine's answer with the whole prompt's count
and our record.

A chat goes to the engine's chat route with its long contents cut (`--chat-forward messages`, and any chat whose
fields only a chat route honours: tools, response_format, logprobs, ...), or is rendered here and sent to the
completions route as the kept token ids (`ids`: exact, no token lost in re-tokenising), its answer turned back into
a chat answer. A completion prompt goes as kept ids where the engine's tokenizer is the draft's, else as text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import pydantic
from fastapi import Request
from fastapi.responses import Response

from ...errors import ConfigError
from ...methods import Method, PromptMethod
from ...models.loading import Pair
from ..metrics import Metrics
from ..protocol import ApiError, Options, with_specprefill
from ..responses import requested_method
from . import chat
from .budgets import Budgets
from .compressor import Compressor
from .link import Link, Verdict
from .prefix import Plan, PrefixLedger
from .relay import Relay

log = logging.getLogger("draftapprox.serve")


@dataclass
class Cut:
    """One prompt's cut: the kept positions and what the record says of it."""

    positions: list[int]
    n: int
    record: dict = field(default_factory=dict)


@dataclass
class Proxy:
    pair: Pair  # the draft; its tokenizer stands in for the engine's where the link found them equal
    link: Link
    compressor: Compressor
    relay: Relay
    metrics: Metrics
    method: PromptMethod | None  # the default; None passes prompts through
    budgets: Budgets = field(default_factory=Budgets)
    name: str | None = None  # the model name clients may send for the engine's default model
    min_prompt_tokens: int = 1024
    chat_messages: bool = False  # --chat-forward messages
    ledger: PrefixLedger | None = field(default_factory=PrefixLedger)

    # -- the routes

    async def chat(self, body: dict, http: Request) -> Response:
        options = _options(body)
        model, verdict = await self._ready(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return await self._forward_whole("/chat/completions", body, http)  # malformed: the engine's to refuse
        try:
            rendered = await asyncio.to_thread(chat.render, self.pair.tokenizer, messages, body.get("tools"))
        except Exception as error:  # a conversation our template cannot render: the engine's to judge, uncut
            log.warning("the chat template could not render a conversation (%s): forwarding it uncut", error)
            return await self._forward_whole("/chat/completions", body, http, f"unrendered: {type(error).__name__}")
        method = self._method(options, model, len(rendered.ids))
        cut = await self._cut(rendered.ids, method, verdict, rendered.protected(), http,
                              whole=None if rendered.pieces else "structure")
        sent, stream = time.perf_counter(), body.get("stream") is True
        if len(cut.positions) == cut.n:  # nothing cut: the chat goes to the engine's chat route as it came
            answer = Answer(self, {**cut.record, "forwarded": "messages"}, cut, sent, as_chat=False, stream=stream)
            return await self.relay.post("/chat/completions", answer.request(body), answer, http)
        forward = {k: v for k, v in body.items() if v is not None or k not in ("max_tokens", "max_completion_tokens")}
        if "max_completion_tokens" in forward:
            forward["max_tokens"] = forward.pop("max_completion_tokens")
        context = self.link.context(model)
        reason = "--chat-forward messages" if self.chat_messages else verdict.note or chat.why_messages(body) or (
            None if "max_tokens" in forward or context else "the engine lists no context length, so the answer "
                                                            "length is its chat route's default")
        if reason is None:  # exact: the kept ids to the completions route, the answer made a chat answer again
            record = {**cut.record, "forwarded": "ids"}
            del forward["messages"]
            forward["prompt"] = [rendered.ids[p] for p in cut.positions]
            forward.setdefault("max_tokens", max(1, (context or 0) - len(cut.positions)))  # a chat route's default
            answer = Answer(self, record, cut, sent, as_chat=True, stream=stream)
            return await self.relay.post("/completions", answer.request(forward), answer, http)
        cut_messages, count = await asyncio.to_thread(chat.rebuild, self.pair.tokenizer, messages, rendered,
                                                      set(cut.positions))
        record = {**cut.record, "forwarded": "messages", "forwarded_as_messages": reason, "messages_cut": count}
        answer = Answer(self, record, cut, sent, as_chat=False, stream=stream)
        return await self.relay.post("/chat/completions", answer.request({**body, "messages": cut_messages}),
                                     answer, http)

    async def completions(self, body: dict, http: Request) -> Response:
        options = _options(body)
        model, verdict = await self._ready(body)
        prompts, single = _prompts(body.get("prompt"))
        if prompts is None or body.get("echo"):  # malformed, or echoing its prompt: uncut
            return await self._forward_whole("/completions", body, http, "echo" if prompts is not None else None)
        tokenizer, cuts, encoded = self.pair.tokenizer, [], []
        special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # markers, not unknown words
        for prompt in prompts:
            ids, lead = (prompt, 0) if isinstance(prompt, list) else await asyncio.to_thread(_encode, tokenizer,
                                                                                             prompt)
            whole = None
            if isinstance(prompt, list) and not verdict.ids:
                whole = "tokenizer"  # ids for an engine whose tokenizer differs are not ours to read
            elif not all(0 <= t < len(tokenizer) for t in ids):
                whole = "vocabulary"  # the engine's to judge
            protected = {i for i, t in enumerate(ids) if t in special}  # a start token, a pasted role marker
            cuts.append(await self._cut(ids, self._method(options, model, len(ids)), verdict, protected, http,
                                        whole=whole))
            encoded.append((ids, lead))
        record = dict(cuts[0].record) if single else _batch_record(cuts)
        total = Cut([p for c in cuts for p in c.positions], sum(c.n for c in cuts))
        if len(total.positions) == total.n:  # nothing cut: the prompts as they came
            forwarded = prompts
        elif verdict.ids:  # every prompt as ids, so that a batch is never half text
            forwarded = [[ids[p] for p in c.positions] for c, (ids, _) in zip(cuts, encoded, strict=True)]
        else:
            forwarded = [prompt if len(c.positions) == c.n else tokenizer.decode(
                [ids[p] for p in c.positions if p >= lead]) for prompt, c, (ids, lead) in zip(prompts, cuts, encoded,
                                                                                             strict=True)]
        record["forwarded"] = "unchanged" if forwarded is prompts else "ids" if verdict.ids else "text"
        answer = Answer(self, record, total, time.perf_counter(), as_chat=False, stream=body.get("stream") is True,
                        text=record["forwarded"] == "text")
        prompt = forwarded[0] if single else forwarded
        return await self.relay.post("/completions", answer.request({**body, "prompt": prompt}), answer, http)

    # -- the steps

    async def _ready(self, body: dict) -> tuple[str, Verdict]:
        """The engine's name for the request's model and how to forward to it, once the engine answers (a 502
        naming it otherwise). A request for the proxy's own name goes to the engine's default model; any other
        name is the engine's."""
        await self.link.answering()
        asked = body.get("model")
        if asked is not None and asked == self.name and asked not in self.link.models:
            body["model"] = asked = self.link.model()
        model = asked if asked in self.link.models else self.link.model()
        return model, await asyncio.to_thread(self.link.verdict, model)

    def _method(self, options: Options | None, model: str, n: int) -> PromptMethod | None:
        """The request's method, its budget from the request, else the model's budget or curve at `n` tokens."""
        if options is not None and options.speculative not in (None, 0, "0"):
            raise ApiError(400, "speculative decoding runs on draftapprox's own server; behind the proxy, the "
                                "upstream engine decodes", param="draftapprox.speculative")
        if options is not None and (options.method or "").lower() == "none":
            if options.budget is not None or options.settings:
                raise ApiError(400, "method none passes the prompt through: it takes no budget or settings",
                               param="draftapprox.method")
            return None
        method, _ = requested_method(self.method, options)
        if method is None:
            return None
        if not isinstance(method, PromptMethod) or method.needs_target:
            raise ApiError(400, f"{method.name} cannot run in front of an upstream engine: only prompt methods that "
                                "need no target can (specpc, specprefill, randompc, recencypc), or none",
                           param="draftapprox.method")
        budget = self.budgets.for_prompt(model, n)
        if budget is not None and (options is None or options.budget is None):
            try:
                method = dataclasses.replace(method, budget=budget)
            except ConfigError as error:
                raise ApiError(400, f"the budget for {model!r} at {n} tokens: {error}",
                               param="draftapprox.budget") from None
        return method

    async def _cut(self, ids: list[int], method: Method | None, verdict: Verdict, protected: set[int],
                   http: Request, whole: str | None = None) -> Cut:
        """The kept positions of a prompt; `whole` names a reason found earlier to keep it all."""
        n = len(ids)
        whole = ("none" if method is None else "tokenizer" if not verdict.cut else whole or (
            "short" if n < self.min_prompt_tokens else "budget" if method.is_noop(n - len(protected)) else None))
        plan = Plan(whole)
        if whole is None and self.ledger is not None:
            plan = self.ledger.plan(ids, self.min_prompt_tokens)
        positions, timings, fallback = list(range(n)), {"draft": 0.0, "queue": 0.0}, None
        if plan.reason == "shared":  # the earlier cut of the shared prefix, the rest whole, structure kept
            positions = sorted(set(plan.positions) | protected | set(range(plan.shared, n)))
        elif plan.reason is None:
            kept = await self.compressor.keep(ids, method, protected, http)
            positions, fallback = kept.positions, kept.fallback
            timings = {"draft": kept.seconds, "queue": kept.waited}
        if self.ledger is not None and verdict.ids:
            if len(positions) == n:
                self.ledger.forwarded_whole(ids)
            else:
                self.ledger.cut(ids, positions)
        self.metrics.prompt_tokens.inc(n)
        self.metrics.kept_tokens.inc(len(positions))
        record = {"method": method.name if method is not None else "none",
                  "config": method.describe() if method is not None else "none",
                  "prompt_tokens": n, "kept_tokens": len(positions),
                  "forwarded_whole": fallback or (plan.reason if plan.reason != "shared" else None),
                  "reused_cut_tokens": plan.shared, "timings": timings}
        return Cut(positions, n, record)

    async def _forward_whole(self, path: str, body: dict, http: Request, why: str | None = None) -> Response:
        record = {"method": "none", "forwarded_whole": why or "unparsed"}
        answer = Answer(self, record, None, time.perf_counter(), as_chat=False, stream=body.get("stream") is True)
        return await self.relay.post(path, answer.request(body), answer, http)


def _options(body: dict) -> Options | None:
    """Our own field and vllm-mlx's SpecPrefill fields, taken off the body (the engine never sees them)."""
    raw = body.pop("draftapprox", None)
    specprefill, keep_pct = body.pop("specprefill", None), body.pop("specprefill_keep_pct", None)
    if specprefill is not None and not isinstance(specprefill, bool):
        raise ApiError(400, f"specprefill must be true or false, got {specprefill!r}", param="specprefill")
    if keep_pct is not None and (isinstance(keep_pct, bool) or not isinstance(keep_pct, int | float)):
        raise ApiError(400, f"specprefill_keep_pct must be a number, got {keep_pct!r}", param="specprefill_keep_pct")
    options = None
    if raw is not None:
        try:
            options = Options.model_validate(raw)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in ("draftapprox", *first.get("loc", ())))
            raise ApiError(400, f"{where}: {first.get('msg')}", param=where) from None
    return with_specprefill(options, specprefill, keep_pct, off="none")


def _prompts(prompt) -> tuple[list[str | list[int]] | None, bool]:
    """A completion's prompts (a text, ids, or a batch of either; None if it is none of these), and whether it was
    a single one."""
    def one(p) -> bool:
        return (isinstance(p, str) and p != "") or (
            isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p))

    if one(prompt):
        return [prompt], True
    if isinstance(prompt, list) and prompt and all(one(p) for p in prompt):
        return list(prompt), False
    return None, False


def _encode(tokenizer, text: str) -> tuple[list[int], int]:
    """A text prompt's ids as the engine would take them (its start token included), and how many tokens the
    tokenizer added in front, which a prompt forwarded as text must not carry as text."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    plain = tokenizer.encode(text, add_special_tokens=False)
    lead = len(ids) - len(plain) if plain and ids[len(ids) - len(plain):] == plain else 0
    return ids, lead


def _batch_record(cuts: list[Cut]) -> dict:
    return {"method": cuts[0].record["method"], "config": cuts[0].record["config"],
            "prompt_tokens": sum(c.n for c in cuts), "kept_tokens": sum(len(c.positions) for c in cuts),
            "prompts": [c.record for c in cuts],
            "timings": {k: sum(c.record["timings"][k] for c in cuts) for k in ("draft", "queue")}}


class Answer:
    """The engine's answer made ours: the whole prompt's count in `usage` (the engine's own in the record), our
    record on the finishing chunks and the usage, and a completion turned into a chat answer where a chat went as
    ids. Everything else passes as the engine sent it."""

    def __init__(self, proxy: Proxy, record: dict, cut: Cut | None, sent: float, *, as_chat: bool, stream: bool,
                 text: bool = False):
        self.proxy, self.record, self.cut, self.sent = proxy, record, cut, sent
        self.as_chat, self.stream, self.text = as_chat, stream, text
        self.hide_usage = self.single = self.counted = False
        self.held: list[dict] = []
        self.roled: set[int] = set()
        self.first: float | None = None

    def request(self, body: dict) -> dict:
        """The body sent upstream: on a stream, usage asked for, so that the engine's count reaches the record."""
        options = body.get("stream_options")
        self.single = body.get("n") in (None, 1)
        if self.stream and (options is None or isinstance(options, dict)) and not (options or {}).get(
                "include_usage"):
            self.hide_usage = True
            body = {**body, "stream_options": {**(options or {}), "include_usage": True}}
        return body

    def whole(self, data: dict) -> dict:
        self._count(data.get("usage"))
        if not isinstance(data.get("choices"), list):  # not an answer (an error sent with 200): as it came
            return data
        return {**(self._as_chat(data) if self.as_chat else data), "draftapprox": self._record()}

    def chunk(self, data: dict) -> list[dict]:
        """A streamed object. With one choice, its finishing chunk is held back until the engine's usage arrives
        (it comes next), so that the record the chunk carries has the engine's count."""
        if not isinstance(data.get("choices"), list):
            return [data]
        if self.first is None and any(_has_text(c) for c in data["choices"]):
            self.first = time.perf_counter()
        usage = data.get("usage")
        final = bool(usage) and not data["choices"]  # continuous usage rides on every chunk: count the last
        self._count(usage, final)
        if self.as_chat:
            data = self._as_chat(data)
        if final:
            out, self.held = [*self.held, data], []
            if self.hide_usage:  # the usage this proxy asked for, not the client
                out.pop()
            return self._recorded(out)
        if any(isinstance(c, dict) and c.get("finish_reason") for c in data["choices"]):
            if self.single and not usage:  # the usage comes next
                self.held.append(data)
                return []
            return self._recorded([data])
        return [data]

    def end(self) -> list[dict]:
        out, self.held = self._recorded(self.held), []
        return out

    def _recorded(self, chunks: list[dict]) -> list[dict]:
        return [{**c, "draftapprox": self._record()} for c in chunks]

    def _count(self, usage, final: bool = True) -> None:
        """The engine's count into the record, the whole prompt's into `usage` (every usage the engine sends)."""
        if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
            return
        theirs = usage["prompt_tokens"]
        self.record["upstream_prompt_tokens"] = theirs
        if self.cut is None or len(self.cut.positions) == self.cut.n:
            return
        if final and not self.counted and self.text and abs(theirs - len(self.cut.positions)) > 0.01 * len(
                self.cut.positions):
            self.counted = True
            self.proxy.metrics.token_mismatch.inc()
            log.warning("the upstream counted %d prompt tokens where the draft forwarded %d", theirs,
                        len(self.cut.positions))
        usage["prompt_tokens"] = self.cut.n
        if isinstance(usage.get("completion_tokens"), int):
            usage["total_tokens"] = self.cut.n + usage["completion_tokens"]

    def _record(self) -> dict:
        now = time.perf_counter()
        timings = dict(self.record.get("timings") or {})
        timings["upstream_first_token" if self.stream else "upstream"] = (self.first or now) - self.sent
        return {**self.record, "timings": timings}

    def _as_chat(self, data: dict) -> dict:
        choices = []
        for choice in data["choices"]:
            if not isinstance(choice, dict):
                choices.append(choice)
                continue
            rest = {k: v for k, v in choice.items() if k not in ("text", "logprobs")}
            text = choice.get("text") or ""
            if self.stream:
                delta = {"content": text}
                if choice.get("index", 0) not in self.roled:
                    self.roled.add(choice.get("index", 0))
                    delta = {"role": "assistant", **delta}
                choices.append({**rest, "delta": delta, "logprobs": None})
            else:
                choices.append({**rest, "message": {"role": "assistant", "content": text}, "logprobs": None})
        return {**data, "object": "chat.completion.chunk" if self.stream else "chat.completion", "choices": choices}


def _has_text(choice) -> bool:
    return isinstance(choice, dict) and bool(choice.get("text") or (choice.get("delta") or {}).get("content")
                                              or (choice.get("delta") or {}).get("tool_calls"))
