"""The proxy in front of a real llama.cpp server (the `xllamacpp` wheel) serving the offline 1.5B GGUF, with the
real 0.5B draft: ids forwarded and counted, chat streaming and not, the planted fact found, upstream faults."""

from __future__ import annotations

import importlib.util

import httpx
import openai
import pytest

from draftapprox.bench.engine import serving_llamacpp
from draftapprox.examples import ANSWER, long_prompt
from draftapprox.models import offline
from draftapprox.models.loading import Pair, load_model
from draftapprox.serve.metrics import Metrics
from draftapprox.serve.responses import Service
from draftapprox.serve.upstream import UpstreamBackend, check_upstream

from .conftest import running

pytestmark = [pytest.mark.real, pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None,
                                                   reason="llama.cpp's server is not installed: pip install "
                                                          "xllamacpp (CI installs it with the test extra)")]


@pytest.fixture(scope="module")
def llamacpp(tmp_path_factory):
    gguf = offline.assemble(offline.TARGET)
    with serving_llamacpp(gguf, tmp_path_factory.mktemp("llamacpp") / "server.log", context=4096) as url:
        yield url + "/v1"


@pytest.fixture(scope="module")
def proxy(llamacpp):
    model, tokenizer = load_model(offline.DRAFT.name)
    upstream, context = check_upstream(llamacpp, tokenizer, say=lambda line: None)
    assert upstream.ids and upstream.model
    pair = Pair(model, tokenizer, model)
    backend = UpstreamBackend(pair, upstream, min_prompt_tokens=256, metrics=Metrics())
    from draftapprox.methods import SpecPC

    service = Service(pair, backend, "proxied", SpecPC(0.25), context_length=context, prompt_methods_only=True)
    with running(service) as url:
        yield url


def test_chat_through_the_proxy_finds_the_fact_with_a_quarter_of_the_prompt(proxy):
    client = openai.OpenAI(base_url=proxy, api_key="unused", max_retries=0, timeout=600)
    messages = [{"role": "user", "content": long_prompt(words=650, depth=0.35)}]
    out = client.chat.completions.create(model="proxied", messages=messages, temperature=0, max_tokens=12)
    extra = out.model_extra["draftapprox"]
    assert ANSWER.lower() in out.choices[0].message.content.lower(), out.choices[0].message.content
    assert extra["upstream_prompt_tokens"] == extra["kept_tokens"] < extra["prompt_tokens"] // 3  # ids, counted
    assert out.usage.prompt_tokens == extra["prompt_tokens"]
    parts = list(client.chat.completions.create(model="proxied", messages=messages, temperature=0, max_tokens=12,
                                                stream=True))
    assert ANSWER.lower() in "".join(p.choices[0].delta.content or "" for p in parts if p.choices).lower()


def test_completions_forward_token_ids(proxy):
    client = openai.OpenAI(base_url=proxy, api_key="unused", max_retries=0, timeout=600)
    out = client.completions.create(model="proxied", prompt="def fibonacci(n):", max_tokens=8, temperature=0,
                                    extra_body={"draftapprox": {"method": "none"}})
    assert out.model_extra["draftapprox"]["upstream_prompt_tokens"] == out.usage.prompt_tokens
    assert out.usage.completion_tokens >= 1


def test_llamacpps_refusal_is_relayed(proxy):
    # llama.cpp was started with a 4,096-token context: a longer prompt is its to refuse
    response = httpx.post(f"{proxy}/completions", timeout=600, json={
        "model": "proxied", "prompt": list(range(1000, 5200)), "max_tokens": 4, "draftapprox": {"method": "none"}})
    assert response.status_code == 400 and "upstream refused" in response.json()["error"]["message"]
