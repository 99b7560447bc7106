"""The proxy (`serve --upstream`) in front of a real OpenAI-compatible engine, our own server on tiny models: what it
cuts and forwards, what it passes through untouched, and how it fails."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import openai
import pytest

from draftapprox.serve.proxy.budgets import Budgets, KeepCurve
from tests.conftest import tiny_tokenizer

from ..conftest import MODEL, free_port, running, tiny_service, wait_for, words
from .conftest import PC, metric, serving_proxy, tapped, tiny_proxy


def ask(url: str, prompt, **kwargs):
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    return client.completions.create(model="proxied", prompt=prompt, temperature=0, **kwargs)


def test_the_proxy_forwards_the_kept_ids_and_relays_the_answer(engine, proxy):
    prompt = words(200, seed=4)
    out = ask(proxy, prompt, max_tokens=8, extra_body={"draftapprox": PC})
    extra = out.model_extra["draftapprox"]
    assert out.usage.prompt_tokens == extra["prompt_tokens"] == 200
    assert out.usage.total_tokens == 200 + out.usage.completion_tokens
    assert extra["kept_tokens"] == extra["upstream_prompt_tokens"] == 50 and extra["forwarded"] == "ids"
    assert set(extra["timings"]) == {"draft", "queue", "upstream"}
    # the same kept ids sent to the engine directly give the same answer: no token lost in translation
    direct = httpx.post(f"{engine[0]}/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
        "draftapprox": {"method": "specpc", "budget": 0.25, "settings": {"window": 4, "start_layer": 1}}}).json()
    assert direct["draftapprox"]["kept_tokens"] == 50 and direct["choices"][0]["text"] == out.choices[0].text
    streamed = list(openai.OpenAI(base_url=proxy, api_key="unused", max_retries=0).completions.create(
        model="proxied", prompt=prompt, temperature=0, max_tokens=8, stream=True, extra_body={"draftapprox": PC}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text
    assert all(c.choices for c in streamed)  # the usage the proxy asked for is not shown to a client that did not
    last = streamed[-1].model_extra["draftapprox"]
    assert last["kept_tokens"] == 50 and set(last["timings"]) == {"draft", "queue", "upstream_first_token"}


def test_none_and_short_prompts_pass_through(proxy):
    out = ask(proxy, words(200), max_tokens=3, extra_body={"draftapprox": {"method": "none"}})
    assert out.model_extra["draftapprox"]["upstream_prompt_tokens"] == 200
    assert out.model_extra["draftapprox"]["forwarded_whole"] == "none"
    short = ask(proxy, words(20), max_tokens=3, extra_body={"draftapprox": PC})
    assert short.model_extra["draftapprox"]["kept_tokens"] == 20
    assert short.model_extra["draftapprox"]["forwarded_whole"] == "short"


def test_fields_the_proxy_does_not_use_reach_the_engine_and_its_answer_comes_back_unchanged(engine, proxy):
    """Our engine refuses what it does not implement: the same refusal, status and body, through the proxy shows
    the field went through (a proxy that dropped it would get an answer)."""
    for extra in ({"logprobs": 2}, {"n": 2}, {"min_p": 0.1}, {"tools": [{"type": "function"}]}):
        body = {"model": MODEL, "prompt": words(200), "max_tokens": 2, **extra}
        direct = httpx.post(f"{engine[0]}/completions", json=body, timeout=60)
        through = httpx.post(f"{proxy}/completions", json={**body, "draftapprox": PC}, timeout=60)
        assert direct.status_code == through.status_code == 400, (extra, through.text)
        assert through.json() == direct.json()
    # the engine's own success fields (its record) come back, ours beside them
    body = {"model": MODEL, "prompt": words(20), "max_tokens": 2, "seed": 3, "user": "u1"}  # short: uncut
    direct = httpx.post(f"{engine[0]}/completions", json=body, timeout=60).json()
    through = httpx.post(f"{proxy}/completions", json=body, timeout=60).json()
    assert through["choices"] == direct["choices"] and through["object"] == direct["object"]


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
def test_a_document_asked_again_keeps_its_first_cut_and_the_draft_idle(engine, reuse):
    document = words(240, seed=11)
    with serving_proxy(tiny_proxy(engine[0], min_prompt_tokens=64, prefix_reuse=reuse)) as url:
        records = [ask(url, f"{document} q{i}", max_tokens=2, extra_body={"draftapprox": PC}).model_extra[
            "draftapprox"] for i in range(3)]
        whole = ask(url, words(240, seed=12), max_tokens=2, extra_body={"draftapprox": {"method": "none"}})
        again = ask(url, words(240, seed=12) + " q", max_tokens=2, extra_body={"draftapprox": PC})
    n = records[0]["prompt_tokens"]
    assert all(r["kept_tokens"] < n and r["forwarded_whole"] is None for r in records)
    if not reuse:
        assert all(r["reused_cut_tokens"] == 0 and r["timings"]["draft"] > 0 for r in records)
        return
    assert [r["reused_cut_tokens"] for r in records] == [0, 240, 240]  # the document's whole blocks
    assert records[1]["kept_tokens"] == records[2]["kept_tokens"] and records[1]["timings"]["draft"] == 0
    assert records[1]["kept_tokens"] <= records[0]["kept_tokens"] + 1  # the first cut, then the question whole
    assert whole.model_extra["draftapprox"]["forwarded_whole"] == "none"
    assert again.model_extra["draftapprox"]["forwarded_whole"] == "cached"


def test_our_own_field_is_checked_and_kv_methods_are_refused(proxy):
    with pytest.raises(openai.BadRequestError, match="only prompt methods"):
        ask(proxy, words(50), max_tokens=3, extra_body={"draftapprox": {"method": "speckv"}})
    with pytest.raises(openai.BadRequestError, match="takes no budget"):
        ask(proxy, words(50), max_tokens=3, extra_body={"draftapprox": {"method": "none", "budget": 3}})
    with pytest.raises(openai.BadRequestError, match=r"draftapprox\.colour"):
        ask(proxy, words(50), max_tokens=3, extra_body={"draftapprox": {"colour": "red"}})
    with pytest.raises(openai.BadRequestError, match="upstream engine decodes"):
        ask(proxy, words(50), max_tokens=3, extra_body={"draftapprox": {"speculative": 3}})


@pytest.mark.parametrize("messages", [False, True], ids=["ids", "messages"])
def test_chat_through_the_proxy(engine, messages):
    with serving_proxy(tiny_proxy(engine[0], messages=messages)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        conversation = [{"role": "system", "content": words(6)}, {"role": "user", "content": words(300, seed=5)}]
        out = client.chat.completions.create(model="proxied", messages=conversation, temperature=0, max_tokens=5,
                                             extra_body={"draftapprox": PC})
        extra = out.model_extra["draftapprox"]
        assert extra["kept_tokens"] < extra["prompt_tokens"] and out.choices[0].message.content is not None
        assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
        assert extra["forwarded"] == ("messages" if messages else "ids")
        # either way the engine counted what the draft kept: the cut contents re-render to the same tokens
        assert extra["upstream_prompt_tokens"] == extra["kept_tokens"]
        parts = list(client.chat.completions.create(model="proxied", messages=conversation, temperature=0,
                                                    max_tokens=5, stream=True, extra_body={"draftapprox": PC}))
        assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == out.choices[0].message.content
        assert parts[0].choices[0].delta.role == "assistant" and parts[0].object == "chat.completion.chunk"


def test_a_chat_with_tools_goes_as_messages_with_only_its_long_texts_cut(engine):
    call = {"id": "call_1", "type": "function", "function": {"name": "read", "arguments": '{"path": "a.txt"}'}}
    tools = [{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}
    conversation = [{"role": "system", "content": words(200, seed=6)},
                    {"role": "user", "content": [{"type": "text", "text": words(20, seed=1)}, image,
                                                 {"type": "text", "text": words(250, seed=7)}]},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": words(300, seed=2)},
                    {"role": "user", "content": words(10, seed=3)}]
    body = {"model": "proxied", "messages": conversation, "max_tokens": 3, "tools": tools, "tool_choice": "auto",
            "parallel_tool_calls": False, "draftapprox": PC}
    with tapped(engine[0]) as (tap, engine_url), serving_proxy(tiny_proxy(engine_url)) as url:
        response = httpx.post(f"{url}/chat/completions", timeout=60, json=body)
        sent = tap.sent("/chat/completions")
        # our engine refuses tool messages and image parts: its refusal comes back as it sent it
        direct = httpx.post(f"{engine[0]}/chat/completions", timeout=60, json=sent)
    assert response.status_code == direct.status_code == 400 and response.json() == direct.json()
    assert sent["tools"] == tools and sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False
    assert "draftapprox" not in sent and sent["model"] == MODEL
    messages = sent["messages"]
    assert messages[0] == conversation[0]  # a system prompt is never cut, however long
    assert messages[2] == conversation[2] and messages[4] == conversation[4]  # the call, the short question
    parts = messages[1]["content"]
    assert parts[:2] == conversation[1]["content"][:2]  # a short text part and the image, as they came
    assert parts[2]["type"] == "text" and len(parts[2]["text"].split()) < 250
    assert messages[3]["tool_call_id"] == "call_1" and messages[3]["role"] == "tool"
    kept = messages[3]["content"].split()
    assert 0 < len(kept) < 300 and _subsequence(kept, conversation[3]["content"].split())


def _subsequence(short: list[str], long: list[str]) -> bool:
    rest = iter(long)
    return all(word in rest for word in short)


def test_an_engine_that_is_not_up_yet_is_waited_for_and_followed(engine):
    port = free_port()
    proxy = tiny_proxy(f"http://127.0.0.1:{port}/v1")
    with serving_proxy(proxy, probe_every=0.2) as url:
        root = url.removesuffix("/v1")
        health = httpx.get(f"{root}/health")
        assert health.status_code == 503 and f"127.0.0.1:{port}" in health.json()["error"]
        response = httpx.post(f"{url}/completions", json={"model": "proxied", "prompt": words(50), "max_tokens": 2})
        assert response.status_code == 502 and f"127.0.0.1:{port}" in response.json()["error"]["message"]
        assert response.json()["error"]["code"] == "upstream_unavailable"
        for _ in range(2):  # it comes up, then goes away and comes back: no restart of the proxy
            with running(tiny_service(method="fullkv", budget=None), port=port):
                assert wait_for(lambda: httpx.get(f"{root}/health").status_code == 200, 20)
                assert httpx.get(f"{root}/health").json()["forwarding"] == "ids"
                out = ask(url, words(200, seed=4), max_tokens=2, extra_body={"draftapprox": PC})
                assert out.model_extra["draftapprox"]["kept_tokens"] == 50
                assert metric(url, "draftapprox_upstream_up") == 1
            assert wait_for(lambda: httpx.get(f"{root}/health").status_code == 503, 20)
            assert metric(url, "draftapprox_upstream_up") == 0


def test_a_different_tokenizer_does_not_stop_the_proxy(engine):
    other = tiny_tokenizer(shift=1, chat=True)
    with serving_proxy(tiny_proxy(engine[0], tokenizer=other)) as url:
        health = httpx.get(url.removesuffix("/v1") + "/health").json()
        assert health["forwarding"] == "uncut" and "at token 0" in health["note"]
        out = ask(url, words(200), max_tokens=2, extra_body={"draftapprox": PC}).model_extra["draftapprox"]
        assert out["forwarded_whole"] == "tokenizer" and out["kept_tokens"] == 200 and out["forwarded"] == "unchanged"
    with serving_proxy(tiny_proxy(engine[0], tokenizer=other, allow_text=True)) as url:
        out = ask(url, words(200), max_tokens=2, extra_body={"draftapprox": PC}).model_extra["draftapprox"]
        assert out["kept_tokens"] == 50 and out["forwarded"] == "text"


def test_an_engine_refusal_comes_back_with_its_status_and_body(engine, proxy):
    body = {"model": "not-served", "prompt": words(50), "max_tokens": 3}
    direct = httpx.post(f"{engine[0]}/completions", json=body, timeout=60)
    through = httpx.post(f"{proxy}/completions", json=body, timeout=60)
    assert through.status_code == direct.status_code == 400 and through.json() == direct.json()


@contextlib.contextmanager
def silent_upstream():
    """A listener that accepts connections and never answers: an upstream that stalls."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_an_upstream_that_stalls_gives_a_504(engine):
    proxy = tiny_proxy(engine[0], timeout=1.0)
    with serving_proxy(proxy, probe_every=60) as url, silent_upstream() as stalled:
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200
        proxy.link.upstream.url = stalled
        began = time.monotonic()
        response = httpx.post(f"{url}/completions", timeout=60,
                              json={"model": "proxied", "prompt": words(50), "max_tokens": 3})
        assert response.status_code == 504 and time.monotonic() - began < 20


def test_a_client_that_goes_away_closes_the_upstream_stream(engine, proxy):
    scheduler = engine[1].backend.scheduler
    stream = openai.OpenAI(base_url=proxy, api_key="unused", max_retries=0).completions.create(
        model="proxied", prompt=words(100), max_tokens=1500, stream=True,
        extra_body={"draftapprox": {"method": "none"}, "ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert scheduler.held_bytes() > 0
    stream.close()
    assert wait_for(lambda: scheduler.held_bytes() == 0)


def _failing(model, error: type[Exception] | None = None, seconds: float = 0.0):
    """A fault in the draft itself: its forward raises, or stalls for `seconds`."""
    def hook(module, args):
        if error is not None:
            raise error("the draft broke")
        time.sleep(seconds)

    return model.get_input_embeddings().register_forward_pre_hook(hook)


@pytest.mark.parametrize("fault", ["error", "timeout", "queue_full"])
def test_a_compression_that_fails_sends_the_prompt_uncut_and_is_counted(engine, fault):
    proxy = tiny_proxy(engine[0], compress_timeout=0.5, max_queue=0 if fault == "queue_full" else 8)
    handle = _failing(proxy.pair.draft, RuntimeError if fault == "error" else None, 3.0 if fault == "timeout" else 0)
    try:
        with serving_proxy(proxy) as url:
            out = ask(url, words(200), max_tokens=2, extra_body={"draftapprox": PC})
            extra = out.model_extra["draftapprox"]
            assert extra["forwarded_whole"] == fault and extra["kept_tokens"] == extra["upstream_prompt_tokens"] == 200
            assert out.choices[0].text is not None
            assert metric(url, f'draftapprox_compress_failures_total{{reason="{fault}"}}') == 1
    finally:
        handle.remove()


@pytest.mark.parametrize(("fault", "status"), [("error", 500), ("timeout", 504), ("queue_full", 429)])
def test_on_compress_error_fail_answers_an_error_instead(engine, fault, status):
    proxy = tiny_proxy(engine[0], compress_timeout=0.5, on_error="fail", max_queue=0 if fault == "queue_full" else 8)
    handle = _failing(proxy.pair.draft, RuntimeError if fault == "error" else None, 3.0 if fault == "timeout" else 0)
    try:
        with serving_proxy(proxy) as url:
            response = httpx.post(f"{url}/completions", timeout=60, json={
                "model": "proxied", "prompt": words(200), "max_tokens": 2, "draftapprox": PC})
            assert response.status_code == status and response.json()["error"]["code"] == fault
    finally:
        handle.remove()


def test_a_keep_curve_and_a_models_budget(engine):
    curve = Budgets(KeepCurve.parse("100:1.0,400:0.25"))
    with serving_proxy(tiny_proxy(engine[0], budgets=curve)) as url:
        short = ask(url, words(80), max_tokens=2).model_extra["draftapprox"]
        assert short["forwarded_whole"] == "budget" and short["kept_tokens"] == 80
        middle = ask(url, words(250), max_tokens=2).model_extra["draftapprox"]
        assert middle["kept_tokens"] == int((1.0 - 0.75 * 150 / 300) * 250)  # the ratio read off the curve
        asked = ask(url, words(250), max_tokens=2, extra_body={"draftapprox": PC}).model_extra["draftapprox"]
        assert asked["kept_tokens"] == 62  # the request's own budget wins
    per_model = Budgets(0.25, ((MODEL, 0.5),))  # the engine's model, which the proxy's own name stands for
    with serving_proxy(tiny_proxy(engine[0], budgets=per_model)) as url:
        assert ask(url, words(200), max_tokens=2).model_extra["draftapprox"]["kept_tokens"] == 100


def test_models_and_other_routes_pass_through(engine, proxy):
    listed = httpx.get(f"{proxy}/models").json()
    assert [m["id"] for m in listed["data"]] == [MODEL, "proxied"]
    body = {"prompt": words(12), "add_special_tokens": False}
    root, engine_root = proxy.removesuffix("/v1"), engine[0].removesuffix("/v1")
    assert httpx.post(f"{root}/tokenize", json=body).json() == httpx.post(f"{engine_root}/tokenize", json=body).json()
    missing = httpx.get(f"{root}/nowhere")
    assert missing.status_code == httpx.get(f"{engine_root}/nowhere").status_code == 404


def test_what_is_not_cut_reaches_the_engine_as_the_client_sent_it(engine):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": words(300, seed=5)}], "max_tokens": 3,
            "temperature": 0, "seed": 4}
    completion = {"model": MODEL, "prompt": words(200, seed=6), "max_tokens": 2, "temperature": 0, "user": "u"}
    with tapped(engine[0]) as (tap, engine_url), serving_proxy(tiny_proxy(engine_url)) as url:
        none = {"draftapprox": {"method": "none"}}
        assert httpx.post(f"{url}/chat/completions", json={**chat, **none}, timeout=60).status_code == 200
        assert tap.sent("/chat/completions") == chat  # to the engine's own chat route, untouched
        httpx.post(f"{url}/completions", json={**completion, "draftapprox": PC}, timeout=60)
        sent = tap.sent("/completions")
        assert len(sent.pop("prompt")) == 50 and sent == {k: v for k, v in completion.items() if k != "prompt"}
        out = httpx.post(f"{url}/chat/completions", json={**chat, "draftapprox": PC}, timeout=60).json()
        sent = tap.sent("/completions")  # a plain chat, cut: rendered here, the kept ids to the completions route
        assert out["draftapprox"]["forwarded"] == "ids" and out["object"] == "chat.completion"
        assert len(sent.pop("prompt")) == out["draftapprox"]["kept_tokens"]
        assert sent == {"model": MODEL, "max_tokens": 3, "temperature": 0, "seed": 4}


def test_vllm_mlx_specprefill_fields_choose_the_method_on_the_proxy_and_the_server(engine, proxy):
    for url, off in ((proxy, "none"), (engine[0], "fullkv")):
        body = {"model": MODEL, "prompt": words(200, seed=21), "max_tokens": 2, "temperature": 0}
        on = httpx.post(f"{url}/completions", json={**body, "specprefill": True, "specprefill_keep_pct": 0.5},
                        timeout=60).json()["draftapprox"]
        assert on["method"] == "specprefill" and 0 < on["kept_tokens"] <= 100, on
        alone = httpx.post(f"{url}/completions", json={**body, "specprefill_keep_pct": 0.25}, timeout=60).json()
        assert alone["draftapprox"]["method"] == "specprefill" and alone["draftapprox"]["kept_tokens"] <= 50
        whole = httpx.post(f"{url}/completions", json={**body, "specprefill": False}, timeout=60).json()
        assert whole["draftapprox"]["method"] == off
        for bad, field in (({"specprefill": True, "draftapprox": {"method": "specpc"}}, "specprefill"),
                           ({"specprefill": False, "specprefill_keep_pct": 0.5}, "specprefill_keep_pct"),
                           ({"specprefill_keep_pct": 1.5}, "specprefill_keep_pct"),
                           ({"specprefill": "yes"}, "specprefill")):
            refused = httpx.post(f"{url}/completions", json={**body, **bad}, timeout=60)
            assert refused.status_code == 400, (url, bad, refused.text)
            assert field in refused.text, (url, bad, refused.text)
