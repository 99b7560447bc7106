"""The proxy in front of a real llama.cpp server (the `xllamacpp` wheel, Jinja chat templates on) serving the offline
1.5B GGUF, with the real 0.5B draft. An observer between them (`Tap`) records what llama.cpp received."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from draftapprox.bench.engine import serving_llamacpp
from draftapprox.examples import ANSWER, long_prompt
from draftapprox.methods import SpecPC
from draftapprox.models import offline
from draftapprox.models.loading import Pair

from ..conftest import free_port, wait_for
from .conftest import TOOLS, proxy_for, serving_proxy, tapped, tool_chat

pytestmark = [pytest.mark.real, pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None,
                                                   reason="llama.cpp's server is not installed: pip install "
                                                          "xllamacpp (CI installs it with the test extra)")]


@pytest.fixture(scope="module")
def llamacpp(tmp_path_factory):
    gguf = offline.assemble(offline.TARGET)
    with serving_llamacpp(gguf, tmp_path_factory.mktemp("llamacpp") / "server.log", context=4096) as root:
        yield root


@pytest.fixture(scope="module")
def draft(real_pair):
    return Pair(real_pair.draft, real_pair.tokenizer, real_pair.draft)


@pytest.fixture(scope="module")
def through(llamacpp, draft):
    """(the proxy's /v1 URL, the tap that sees what llama.cpp receives)"""
    with tapped(llamacpp + "/v1") as (tap, url), serving_proxy(
            proxy_for(url, draft, SpecPC(0.25), min_prompt_tokens=256)) as proxy:
        yield proxy, tap


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)


def test_chat_through_the_proxy_finds_the_fact_with_a_quarter_of_the_prompt(through):
    messages = [{"role": "user", "content": long_prompt(words=650, depth=0.35)}]
    out = client(through[0]).chat.completions.create(model="proxied", messages=messages, temperature=0,
                                                     max_tokens=12)
    extra = out.model_extra["draftapprox"]
    assert ANSWER.lower() in out.choices[0].message.content.lower(), out.choices[0].message.content
    assert extra["forwarded"] == "ids"
    assert extra["upstream_prompt_tokens"] == extra["kept_tokens"] < extra["prompt_tokens"] // 3  # ids, counted
    assert out.usage.prompt_tokens == extra["prompt_tokens"]
    parts = list(client(through[0]).chat.completions.create(model="proxied", messages=messages, temperature=0,
                                                            max_tokens=12, stream=True))
    assert ANSWER.lower() in "".join(p.choices[0].delta.content or "" for p in parts if p.choices).lower()


def test_a_long_tool_result_is_cut_and_the_structure_reaches_llamacpp_intact(llamacpp, through):
    proxy, tap = through
    messages = tool_chat()
    result = messages[3]["content"]
    out = client(proxy).chat.completions.create(model="proxied", messages=messages, tools=TOOLS, temperature=0,
                                                max_tokens=40)
    extra = out.model_extra["draftapprox"]
    assert extra["forwarded"] == "messages" and extra["forwarded_as_messages"].startswith("tools")
    assert extra["messages_cut"] == 1 and extra["kept_tokens"] < extra["prompt_tokens"]
    sent = tap.sent("/chat/completions")
    assert sent["tools"] == TOOLS and "draftapprox" not in sent
    assert sent["messages"][:3] == messages[:3] and sent["messages"][4] == messages[4]
    cut = sent["messages"][3]
    assert cut["tool_call_id"] == "c1" and cut["role"] == "tool" and len(cut["content"]) < len(result) / 2
    # llama.cpp's own rendering of what it received: the tools, the call and its (cut) result, in its template
    rendered = httpx.post(f"{llamacpp}/apply-template", json={"messages": sent["messages"], "tools": sent["tools"]},
                          timeout=60).json()["prompt"]
    assert '"name": "read_file"' in rendered and '{"path": "notes.txt"}' in rendered
    assert f"<tool_response>\n{cut['content']}\n</tool_response>" in rendered
    counted = httpx.post(f"{llamacpp}/tokenize", timeout=60,
                         json={"content": rendered, "add_special": False, "parse_special": True}).json()["tokens"]
    assert extra["upstream_prompt_tokens"] == len(counted)  # it prefilled exactly that
    # the answer is llama.cpp's to the same request, unchanged; this GGUF's template gets no tool-call parser in
    # llama.cpp (it answers the call as JSON text even asked directly), so the call is read from the text
    direct = httpx.post(f"{llamacpp}/v1/chat/completions", json=sent, timeout=600).json()
    assert out.choices[0].message.content == direct["choices"][0]["message"]["content"]
    assert out.choices[0].message.tool_calls == direct["choices"][0]["message"].get("tool_calls")
    assert "todo.txt" in out.choices[0].message.content


def test_json_mode_logprobs_a_vendor_field_and_n_pass_through(llamacpp, through):
    """Short prompts (forwarded whole): the answers are llama.cpp's own, field for field."""
    proxy = through[0]
    ask = [{"role": "user", "content": "Give a JSON object with a key name."}]

    def both(**fields) -> tuple[dict, dict]:
        body = {"model": "proxied", "messages": ask, "temperature": 0, "max_tokens": 16, **fields}
        mine = httpx.post(f"{proxy}/chat/completions", json=body, timeout=600)
        theirs = httpx.post(f"{llamacpp}/v1/chat/completions", json=body, timeout=600)
        assert mine.status_code == theirs.status_code, mine.text
        return mine.json(), theirs.json()

    mine, theirs = both(response_format={"type": "json_object"})
    assert mine["choices"] == theirs["choices"] and isinstance(json.loads(mine["choices"][0]["message"]["content"]),
                                                               dict)
    mine, theirs = both(logprobs=True, top_logprobs=2, max_tokens=3)
    assert mine["choices"] == theirs["choices"]
    assert all(len(t["top_logprobs"]) == 2 for t in mine["choices"][0]["logprobs"]["content"])
    mine, theirs = both(grammar='root ::= "yes" | "no"')  # llama.cpp's own field
    assert mine["choices"] == theirs["choices"] and mine["choices"][0]["message"]["content"] in ("yes", "no")
    mine, theirs = both(n=2)  # this llama.cpp takes n=1 only: its refusal comes back as it gave it
    assert mine == theirs and "'n'" in mine["error"]["message"]
    # through the official client, streaming
    parts = list(client(proxy).chat.completions.create(model="proxied", messages=ask, temperature=0, max_tokens=8,
                                                       stream=True, logprobs=True, top_logprobs=1,
                                                       response_format={"type": "json_object"}))
    assert any(p.choices and p.choices[0].logprobs for p in parts)
    assert "draftapprox" in parts[-1].model_extra


def test_completions_forward_token_ids(through):
    out = client(through[0]).completions.create(model="proxied", prompt="def fibonacci(n):", max_tokens=8,
                                                temperature=0, extra_body={"draftapprox": {"method": "none"}})
    assert out.model_extra["draftapprox"]["upstream_prompt_tokens"] == out.usage.prompt_tokens
    assert out.usage.completion_tokens >= 1


def test_llamacpps_refusal_comes_back_unchanged(llamacpp, through):
    # llama.cpp was started with a 4,096-token context: a longer prompt is its to refuse
    body = {"model": "proxied", "prompt": list(range(1000, 5200)), "max_tokens": 4}
    mine = httpx.post(f"{through[0]}/completions", timeout=600, json={**body, "draftapprox": {"method": "none"}})
    theirs = httpx.post(f"{llamacpp}/v1/completions", timeout=600, json=body)
    assert mine.status_code == theirs.status_code == 400 and mine.json() == theirs.json()


def test_the_proxy_started_before_llamacpp_waits_for_it(tmp_path):
    """As in a compose file: the proxy first, on a port where nothing listens yet, then the engine."""
    engine_port, port = free_port(), free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "draftapprox", "serve", "--upstream",
                              f"http://127.0.0.1:{engine_port}/v1", "--port", str(port), "--min-prompt-tokens", "256"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proxy.poll() is None, proxy.stdout.read()
            try:
                return httpx.get(f"{root}/health").status_code in (200, 503)
            except httpx.HTTPError:
                return False

        assert wait_for(up, 300)
        health = httpx.get(f"{root}/health")
        assert health.status_code == 503 and f"127.0.0.1:{engine_port}" in health.json()["error"]
        early = httpx.post(f"{root}/v1/chat/completions", timeout=60,
                           json={"model": "target", "messages": [{"role": "user", "content": "hi"}]})
        assert early.status_code == 502 and early.json()["error"]["code"] == "upstream_unavailable"
        with serving_llamacpp(offline.assemble(offline.TARGET), tmp_path / "server.log", context=4096,
                              port=engine_port):
            assert wait_for(lambda: httpx.get(f"{root}/health").status_code == 200, 60)
            assert httpx.get(f"{root}/health").json()["forwarding"] == "ids"
            messages = [{"role": "user", "content": long_prompt(words=650, depth=0.35)}]
            out = client(f"{root}/v1").chat.completions.create(model="target", messages=messages, temperature=0,
                                                               max_tokens=12)
            assert ANSWER.lower() in out.choices[0].message.content.lower()
            assert out.model_extra["draftapprox"]["kept_tokens"] < out.model_extra["draftapprox"]["prompt_tokens"]
        began = time.monotonic()
        assert wait_for(lambda: httpx.get(f"{root}/health").status_code == 503, 60)  # and it notices it gone
        assert time.monotonic() - began < 60
    finally:
        proxy.terminate()
        proxy.wait(60)
