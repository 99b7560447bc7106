"""What of a chat may be cut, and the chat rebuilt from what was kept.

Only long text is cut: the contents of user, tool and assistant messages, or the text parts of a multi-part content,
each at least `LONG_TEXT` tokens. Everything else is structure and kept byte for byte: system prompts, tool
definitions, an assistant's tool calls and their arguments, the ids pairing a call with its result, image parts,
role markers and the generation prompt. The draft scores the conversation as the chat template renders it (tools
included), so the question at its end and the structure around each text are its context.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

LONG_TEXT = 128  # tokens: a shorter text is kept whole
CUT_ROLES = ("user", "tool", "function", "assistant")
# Fields of a chat request that a completions route answers the same way, so that a chat made of nothing else can be
# rendered here and forwarded as token ids; any other field (tools, response_format, logprobs, a vendor's template
# knobs) is the engine's chat route's to honour, so such a request is forwarded as messages.
ID_SAFE = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                     "min_p", "seed", "stop", "stream", "stream_options", "n", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "user", "ignore_eos", "logit_bias"})


@dataclass
class Piece:
    """A cuttable text: message `message`'s content (`part` None) or its text part `part`, at `positions` of the
    rendered conversation."""

    message: int
    part: int | None
    positions: list[int]


@dataclass
class Rendered:
    ids: list[int]
    pieces: list[Piece]

    def protected(self) -> set[int]:
        cuttable = {p for piece in self.pieces for p in piece.positions}
        return set(range(len(self.ids))) - cuttable


def why_messages(body: dict) -> str | None:
    """Why a chat request cannot be rendered here and forwarded exactly as token ids (None: it can)."""
    extra = sorted(set(body) - ID_SAFE)
    if extra:
        return f"{', '.join(extra)}: the engine's chat route honours {'them' if len(extra) > 1 else 'it'}"
    for message in body["messages"]:
        if message.get("role") not in ("system", "developer", "user", "assistant") or set(message) - {
                "role", "content", "name"}:
            return "tool calls or results: the engine's chat template and parser handle them"
        content = message.get("content")
        if isinstance(content, list) and (len(content) != 1 or not isinstance(content[0], dict)
                                          or content[0].get("type") != "text"):
            return "a multi-part content: the engine's chat template joins its parts"
        if not isinstance(content, str | list):
            return "a content that is not text: the engine's to read"
    return None


def _texts(message: dict) -> list[tuple[int | None, str]]:
    content = message.get("content")
    if isinstance(content, str):
        return [(None, content)]
    if isinstance(content, list):
        return [(j, part["text"]) for j, part in enumerate(content)
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)]
    return []


def _view(message: dict) -> dict:
    """A message as a chat template takes it: text content, `developer` as `system`, tool-call arguments parsed."""
    view = {k: v for k, v in message.items() if k in ("role", "name", "tool_call_id", "tool_calls")}
    view["role"] = "system" if message.get("role") == "developer" else message.get("role")
    view["content"] = "\n".join(text for _, text in _texts(message))
    calls = []
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise ValueError("a tool call that is not an object with a function")
        function = dict(call["function"])
        if isinstance(function.get("arguments"), str):
            with contextlib.suppress(json.JSONDecodeError):  # a template prints an argument object itself
                function["arguments"] = json.loads(function["arguments"])
        calls.append({**call, "function": function})
    if calls:
        view["tool_calls"] = calls
    return view


def render(tokenizer, messages: list[dict], tools: list | None = None) -> Rendered:
    """The conversation as the chat template renders it (generation prompt added), and its cuttable pieces."""
    views = [_view(m) for m in messages]
    extra = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(views, tokenize=False, add_generation_prompt=True, **extra)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    pieces, cursor = [], 0
    for i, message in enumerate(messages):
        for part, piece in _texts(message):
            # found in order, each after the last; a template that trims contents shows the trimmed text
            start, found = _find(text, piece, cursor)
            if start < 0:
                continue
            end = cursor = start + len(found)
            if message.get("role") not in CUT_ROLES:
                continue
            positions = [k for k, (a, b) in enumerate(offsets) if start <= a and b <= end and b > a]
            if len(positions) >= LONG_TEXT:
                pieces.append(Piece(i, part, positions))
    return Rendered(ids, pieces)


def _find(text: str, piece: str, cursor: int) -> tuple[int, str]:
    for candidate in (piece, piece.strip()):
        if candidate:
            start = text.find(candidate, cursor)
            if start >= 0:
                return start, candidate
    return -1, piece


def rebuild(tokenizer, messages: list[dict], rendered: Rendered, kept: set[int]) -> tuple[list[dict], int]:
    """The messages with each piece reduced to its kept tokens (all else as it came), and how many pieces were
    cut."""
    out, cut = list(messages), 0
    for piece in rendered.pieces:
        tokens = [rendered.ids[p] for p in piece.positions if p in kept]
        if len(tokens) == len(piece.positions):
            continue
        cut += 1
        text = tokenizer.decode(tokens)
        message = dict(out[piece.message])
        if piece.part is None:
            message["content"] = text
        else:
            parts = list(message["content"])
            parts[piece.part] = {**parts[piece.part], "text": text}
            message["content"] = parts
        out[piece.message] = message
    return out, cut
