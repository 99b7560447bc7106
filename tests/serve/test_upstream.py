"""The proxy (`serve --upstream`) in front of a real OpenAI-compatible engine: our own server on tiny models, which
takes token-id prompts and has `/tokenize` as vLLM does. llama.cpp itself is in test_llamacpp.py."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import openai
import pytest

from draftapprox.errors import InputError
from draftapprox.methods import make
from draftapprox.models.loading import Pair, pair_from_models
from draftapprox.serve.metrics import Metrics
from draftapprox.serve.responses import Service
from draftapprox.serve.upstream import UpstreamBackend, check_upstream, protected_positions
from tests.conftest import tiny_model, tiny_tokenizer

from .conftest import MODEL, free_port, running, tiny_service, wait_for, words

PC = {"method": "specpc", "budget": 0.25, "settings": {"window": 4, "start_layer": 1}}


def proxy_service(url: str, *, min_prompt_tokens: int = 32, max_queue: int = 8, messages: bool = False,
                  timeout: float = 60, tokenizer=None, allow_text: bool = False, prefix_reuse: bool = False
                  ) -> Service:
    """A proxy on a tiny draft; prefix reuse off unless asked, so that a prompt asked twice is cut twice."""
    draft = pair_from_models(tiny_model("qwen2", layers=3, heads=4, kv_heads=4, seed=1),
                             tokenizer or tiny_tokenizer(chat=True)).target
    tok = tokenizer or tiny_tokenizer(chat=True)
    upstream, context = check_upstream(url, tok, timeout=timeout, chat_messages=messages, allow_text=allow_text,
                                       say=lambda line: None)
    pair = Pair(draft, tok, draft)
    backend = UpstreamBackend(pair, upstream, max_queue=max_queue, min_prompt_tokens=min_prompt_tokens,
                              metrics=Metrics(), prefix_reuse=prefix_reuse)
    return Service(pair, backend, "proxied", make("specpc", 0.25, window=4, start_layer=1),
                   context_length=context, prompt_methods_only=True)


@pytest.fixture(scope="module")
def engine():
    service = tiny_service(method="fullkv", budget=None)
    with running(service) as url:
        yield url, service


@pytest.fixture(scope="module")
def proxy(engine):
    with running(proxy_service(engine[0])) as url:
        yield url


def ask(url: str, prompt, **kwargs):
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    return client.completions.create(model="proxied", prompt=prompt, temperature=0, **kwargs)


def test_the_proxy_forwards_the_kept_ids_and_relays_the_answer(engine, proxy):
    prompt = words(200, seed=4)
    out = ask(proxy, prompt, max_tokens=8, extra_body={"draftapprox": PC})
    extra = out.model_extra["draftapprox"]
    assert out.usage.prompt_tokens == extra["prompt_tokens"] == 200
    assert extra["kept_tokens"] == extra["upstream_prompt_tokens"] == 50 and extra["forwarded"] == "ids"
    assert set(extra["timings"]) == {"draft", "queue", "upstream_first_token"}
    # the same kept ids sent to the engine directly give the same answer: no token lost in translation
    direct = httpx.post(f"{engine[0]}/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
        "draftapprox": {"method": "specpc", "budget": 0.25, "settings": {"window": 4, "start_layer": 1}}}).json()
    assert direct["draftapprox"]["kept_tokens"] == 50
    streamed = list(openai.OpenAI(base_url=proxy, api_key="unused", max_retries=0).completions.create(
        model="proxied", prompt=prompt, temperature=0, max_tokens=8, stream=True, extra_body={"draftapprox": PC}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text
    assert streamed[-1].usage.prompt_tokens == 200


def test_none_and_short_prompts_pass_through(proxy):
    out = ask(proxy, words(200), max_tokens=3, extra_body={"draftapprox": {"method": "none"}})
    assert out.model_extra["draftapprox"]["upstream_prompt_tokens"] == 200
    short = ask(proxy, words(20), max_tokens=3, extra_body={"draftapprox": PC})
    assert short.model_extra["draftapprox"]["kept_tokens"] == 20


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
def test_a_document_asked_again_keeps_its_first_cut_and_the_draft_idle(engine, reuse):
    document = words(240, seed=11)
    with running(proxy_service(engine[0], min_prompt_tokens=64, prefix_reuse=reuse)) as url:
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
    # a prompt the engine was sent whole is forwarded whole again: its cache holds all but the question
    assert whole.model_extra["draftapprox"]["forwarded_whole"] == "none"
    assert again.model_extra["draftapprox"]["forwarded_whole"] == "cached"


def test_kv_methods_are_refused_in_front_of_an_engine(proxy):
    with pytest.raises(openai.BadRequestError, match="only prompt methods"):
        ask(proxy, words(50), max_tokens=3, extra_body={"draftapprox": {"method": "speckv"}})
    with pytest.raises(openai.BadRequestError, match="takes no budget"):
        ask(proxy, words(50), max_tokens=3, extra_body={"draftapprox": {"method": "none", "budget": 3}})


def test_a_chat_keeps_its_structure():
    tokenizer = tiny_tokenizer(chat=True)
    messages = [{"role": "system", "content": words(10)}, {"role": "user", "content": words(300, seed=2)},
                {"role": "user", "content": words(12, seed=3)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    keep = protected_positions(tokenizer, messages, len(ids))
    special = {i for i, t in enumerate(ids) if t in (tokenizer.bos_token_id, tokenizer.eos_token_id)}
    assert special <= keep  # role markers and the generation prompt
    assert set(range(1, 11)) <= keep  # the system prompt
    assert set(range(len(ids) - 14, len(ids))) <= keep  # the short last turn and the generation prompt
    assert len(keep) == len(ids) - 300  # only the long content may be cut


@pytest.mark.parametrize("messages", [False, True], ids=["ids", "messages"])
def test_chat_through_the_proxy(engine, messages):
    with running(proxy_service(engine[0], messages=messages)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        conversation = [{"role": "system", "content": words(6)}, {"role": "user", "content": words(300, seed=5)}]
        out = client.chat.completions.create(model="proxied", messages=conversation, temperature=0, max_tokens=5,
                                             extra_body={"draftapprox": PC})
        extra = out.model_extra["draftapprox"]
        assert extra["kept_tokens"] < extra["prompt_tokens"] and out.choices[0].message.content is not None
        if messages:  # the upstream rendered the compressed contents with its own template: same count
            assert extra["upstream_prompt_tokens"] == extra["kept_tokens"]
        parts = list(client.chat.completions.create(model="proxied", messages=conversation, temperature=0,
                                                    max_tokens=5, stream=True, extra_body={"draftapprox": PC}))
        assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == out.choices[0].message.content


def test_a_different_tokenizer_is_refused_at_start_naming_the_difference(engine):
    with pytest.raises(InputError, match="not the draft's: at token 0"):
        proxy_service(engine[0], tokenizer=tiny_tokenizer(shift=1, chat=True))
    service = proxy_service(engine[0], tokenizer=tiny_tokenizer(shift=1, chat=True), allow_text=True)
    assert service.backend.upstream.ids is False


def test_an_upstream_that_is_down_gives_a_502_naming_it(engine):
    service = proxy_service(engine[0])
    port = free_port()
    service.backend.upstream.url = f"http://127.0.0.1:{port}/v1"
    with running(service) as url:
        response = httpx.post(f"{url}/completions", timeout=60,
                              json={"model": "proxied", "prompt": words(50), "max_tokens": 3})
        assert response.status_code == 502 and f"127.0.0.1:{port}" in response.json()["error"]["message"]
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200  # the proxy stays up


def test_an_upstream_refusal_is_relayed_with_its_status_and_message(engine):
    service = proxy_service(engine[0])
    service.backend.upstream.model = "not-served"
    with running(service) as url:
        response = httpx.post(f"{url}/completions", timeout=60,
                              json={"model": "proxied", "prompt": words(50), "max_tokens": 3})
        assert response.status_code == 400 and "unknown model 'not-served'" in response.json()["error"]["message"]


def test_the_upstreams_context_bounds_requests_before_they_are_forwarded(proxy):
    response = httpx.post(f"{proxy}/completions", timeout=60,
                          json={"model": "proxied", "prompt": words(50), "max_tokens": 2040})
    assert response.status_code == 400 and "context of 2048" in response.json()["error"]["message"]


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
    service = proxy_service(engine[0], timeout=1.0)
    with silent_upstream() as stalled, running(service) as url:
        service.backend.upstream.url = stalled
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


def test_a_full_draft_queue_answers_429(engine):
    service = proxy_service(engine[0], max_queue=0)
    with running(service) as url:
        response = httpx.post(f"{url}/completions", timeout=60,
                              json={"model": "proxied", "prompt": words(100), "max_tokens": 2,
                                    "draftapprox": PC})
        assert response.status_code == 429 and response.headers["retry-after"]
