"""LiteLLM: `DraftCompressionHook`, a `CustomLogger` whose pre-call hook compresses a chat's long texts as
`draftapprox serve --upstream` does, before LiteLLM sends it to any provider.

    litellm.callbacks = [DraftCompressionHook(pair=da.load_pair(with_target=False))]
    await litellm.acompletion(model="openai/...", messages=..., metadata={"draftapprox": {"budget": 0.25}})

Long user, tool and assistant texts are cut; system prompts, tool definitions and calls, and role structure are kept
byte for byte (`serve.proxy.chat`), the budget counting only what may be cut (`parts.select`). Per-request knobs
come through LiteLLM's `metadata`: `{"draftapprox": {"method": ..., "budget": ..., "disabled": true}}`; the
record of what was kept is written back to it (`metadata["draftapprox_record"]`) and kept as `last_record`.
Compressions run one at a time on a thread of their own; one that fails sends the chat uncut (recorded), as the
proxy does, while a bad knob is the caller's error.
LiteLLM calls this hook for `acompletion` (streaming or not) with keyword arguments; its synchronous `completion`
has no hook that may change a request. Without code: point a LiteLLM `openai/` model's `api_base` at
`draftapprox serve --upstream`, which does the same in front of any engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from typing import Any

try:
    from litellm.integrations.custom_logger import CustomLogger
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("draftapprox.integrations.litellm needs litellm: pip install 'draftapprox[litellm]'") from error

import torch

from .. import parts
from ..errors import ConfigError
from ..generation import new_state
from ..methods import Method
from ..models.loading import Pair
from ..serve.proxy import chat

KNOBS = ("method", "budget", "disabled")
log = logging.getLogger("draftapprox.litellm")


class DraftCompressionHook(CustomLogger):
    """`pair`: a loaded pair (its draft scores); `method`: the default prompt method (an instance or a name; SpecPC
    keeping a quarter); `min_prompt_tokens`: shorter chats pass whole (their prefill is cheap)."""

    def __init__(self, pair: Pair, method: Method | str | None = None, min_prompt_tokens: int = 1024):
        super().__init__()
        self.pair, self.method, self.min_prompt_tokens = pair, parts.prompt_method(method), min_prompt_tokens
        self.last_record: dict | None = None
        # one compression at a time on one thread, as the proxy's: the draft is one shared model
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="draftapprox-draft")

    async def async_pre_call_deployment_hook(self, kwargs: dict, call_type: Any) -> dict | None:
        messages = kwargs.get("messages")
        metadata = kwargs.get("metadata") if isinstance(kwargs.get("metadata"), dict) else {}
        options = metadata.get("draftapprox") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"metadata.draftapprox must be an object of {', '.join(KNOBS)}, got {options!r}")
        if not isinstance(messages, list) or not messages or options.get("disabled"):
            return None
        method = self._method(options)
        loop = asyncio.get_running_loop()
        try:
            cut, record = await loop.run_in_executor(self._worker, self._compress, messages, kwargs.get("tools"),
                                                     method)
        except ConfigError:
            raise
        except Exception as error:  # fails open, as the proxy: the provider could still answer the chat uncut
            log.warning("compressing a chat failed (%s: %s): sending it uncut", type(error).__name__, error)
            cut, record = None, {"method": method.name, "forwarded_whole": "error",
                                 "error": f"{type(error).__name__}: {error}"}
        self.last_record = record
        metadata["draftapprox_record"] = record
        if cut is None:
            return None
        kwargs["messages"] = cut
        return kwargs

    def _method(self, options: dict) -> Method:
        unknown = sorted(set(options) - set(KNOBS))
        if unknown:
            raise ConfigError(f"metadata.draftapprox: unknown field {', '.join(unknown)} (known: {', '.join(KNOBS)})")
        method = parts.prompt_method(options["method"]) if "method" in options else self.method
        if "budget" in options:
            budget = options["budget"]
            if isinstance(budget, bool) or not isinstance(budget, int | float):
                raise ConfigError(f"metadata.draftapprox.budget must be a token count or a ratio, got {budget!r}")
            method = dataclasses.replace(method, budget=budget)
        return method

    def _compress(self, messages: list[dict], tools: list | None, method) -> tuple[list[dict] | None, dict]:
        rendered = chat.render(self.pair.tokenizer, messages, tools)
        n = len(rendered.ids)
        record = {"method": method.name, "prompt_tokens": n, "kept_tokens": n, "messages_cut": 0}
        if n < self.min_prompt_tokens or not rendered.pieces:
            return None, {**record, "forwarded_whole": "short" if rendered.pieces else "structure"}
        parts.check_pair(self.pair, method)
        state = new_state(self.pair, torch.tensor([rendered.ids], dtype=torch.long), 1)
        kept = parts.select(state, method, rendered.protected())
        cut, count = chat.rebuild(self.pair.tokenizer, messages, rendered, set(kept))
        return cut, {**record, "kept_tokens": len(kept), "messages_cut": count}
