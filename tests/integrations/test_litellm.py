"""LiteLLM calling our hook: `litellm.acompletion` against `draftapprox serve` (FullKV), the hook registered in
`litellm.callbacks`: the server's prompt is the kept count, the structure arrives whole, knobs come per request."""

from __future__ import annotations

import asyncio
import os

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list at import
litellm = pytest.importorskip("litellm")

import draftapprox as da  # noqa: E402
from draftapprox.integrations.litellm import DraftCompressionHook  # noqa: E402
from tests.serve.conftest import MODEL, running, tiny_service, words  # noqa: E402


@pytest.fixture(scope="module")
def served():
    service = tiny_service("fullkv", None)
    with running(service) as url:
        yield url, service.pair


@pytest.fixture
def hook(served):
    hook = DraftCompressionHook(served[1], da.SpecPC(budget=0.25, window=4, kernel=5, start_layer=1),
                                min_prompt_tokens=64)
    before = litellm.callbacks
    litellm.callbacks = [hook]
    yield hook
    litellm.callbacks = before


def ask(url: str, messages: list[dict], **extra):
    return asyncio.run(litellm.acompletion(model=f"openai/{MODEL}", api_base=url, api_key="unused",
                                           messages=messages, max_tokens=4, temperature=0, **extra))


def test_the_server_receives_the_kept_tokens(served, hook):
    url, _ = served
    system = words(20, 1)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": words(400, 2)}]
    metadata = {"draftapprox": {"budget": 0.25}}
    out = ask(url, messages, metadata=metadata)
    record = hook.last_record
    assert record["messages_cut"] == 1 and metadata["draftapprox_record"] == record
    assert out.usage.prompt_tokens == record["kept_tokens"] < record["prompt_tokens"] // 2
    assert messages[1]["content"] == words(400, 2)  # the caller's messages are left as they were


def test_per_request_knobs_and_refusals(served, hook):
    url, _ = served
    messages = [{"role": "user", "content": words(400, 3)}]
    whole = ask(url, messages, metadata={"draftapprox": {"disabled": True}})
    tight = ask(url, messages, metadata={"draftapprox": {"budget": 40}})
    assert tight.usage.prompt_tokens < whole.usage.prompt_tokens
    assert hook.last_record["kept_tokens"] == tight.usage.prompt_tokens
    with pytest.raises(Exception, match="unknown field rate"):
        ask(url, messages, metadata={"draftapprox": {"rate": 0.5}})
    with pytest.raises(Exception, match="prompt method"):
        ask(url, messages, metadata={"draftapprox": {"method": "snapkv"}})


def test_a_chat_that_cannot_be_read_goes_uncut_with_the_reason(hook):
    """The hook as LiteLLM calls it: a compression that fails sends the chat whole (the provider may still answer
    it), and says why; a bad knob is the caller's error."""
    messages = [{"role": "user", "content": words(300, 5)}, {"role": "assistant", "tool_calls": ["not an object"]}]
    metadata = {"draftapprox": {"budget": 0.25}}
    kwargs = {"messages": messages, "metadata": metadata}
    assert asyncio.run(hook.async_pre_call_deployment_hook(kwargs, None)) is None  # unchanged: sent whole
    assert metadata["draftapprox_record"]["forwarded_whole"] == "error"
    assert "tool call" in metadata["draftapprox_record"]["error"]
    with pytest.raises(da.ConfigError, match="must be an object"):
        asyncio.run(hook.async_pre_call_deployment_hook({"messages": messages, "metadata": {"draftapprox": 1}}, None))
