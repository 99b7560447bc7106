"""The server through the official `openai` client: endpoints, streaming, per-request methods, errors, auth."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from draftapprox.generation import DecodeBatch
from draftapprox.methods import SpecPC

from .conftest import MODEL, running, tiny_service, wait_for, words


def client(url: str, key: str = "unused", timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout)


def options(method: str) -> dict:
    """A method at a budget and knobs that fit the tiny models (a 3-layer draft, prompts of tens of tokens)."""
    if method == "fullkv":
        return {"method": method}
    settings = {"window": 4} | ({"start_layer": 1} if method == "specpc" else {})
    return {"method": method, "budget": 16, "settings": settings}


def complete(url: str, prompt: str, **kwargs):
    return client(url).completions.create(model=MODEL, prompt=prompt, temperature=0, **kwargs)


def test_models_and_health(server):
    url, _ = server
    assert [m.id for m in client(url).models.list().data] == [MODEL]
    assert httpx.get(url.removesuffix("/v1") + "/health").json() == {"status": "ok"}


def test_completion_reports_usage_and_the_method_record(server):
    url, _ = server
    out = complete(url, words(60), max_tokens=5)
    assert out.object == "text_completion" and out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens == 60  # the tiny tokenizer adds no special tokens
    extra = out.model_extra["draftapprox"]
    assert extra["method"] == "speckv" and extra["prompt_tokens"] == out.usage.prompt_tokens
    assert extra["budget_tokens"] == 16 and extra["kv_bytes_kept"] < extra["kv_bytes_full"]
    assert out.usage.completion_tokens == extra["new_tokens"] <= 5
    assert {"method", "prompt_tokens", "kept_tokens", "kv_bytes_full", "kv_bytes_kept", "timings",
            "config"} <= set(extra)


@pytest.mark.parametrize("method", ["fullkv", "speckv", "verispeckv", "specpc"])
def test_a_stream_gives_the_same_text_as_the_whole_answer(server, method):
    url, _ = server
    body = {"draftapprox": options(method)}
    prompt = words(50, seed=2)
    whole = complete(url, prompt, max_tokens=8, extra_body=body)
    chunks = list(client(url).completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=body))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finish = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finish.model_extra["draftapprox"]["method"] == method
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert whole.model_extra["draftapprox"]["method"] == method


def test_chat_applies_the_template_and_streams(server):
    url, _ = server
    messages = [{"role": "system", "content": words(10)}, {"role": "user", "content": words(40, seed=3)}]
    whole = client(url).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    assert whole.choices[0].message.role == "assistant"
    # the template adds <s> ... </s> around each message and <s> as the generation prompt: 2 * 2 + 1 tokens
    assert whole.usage.prompt_tokens == 50 + 5
    parts = list(client(url).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6,
                                                     stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == whole.choices[0].message.content
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_token_id_prompts_and_stop_strings(server):
    url, _ = server
    ids = client(url).completions.create(model=MODEL, prompt=list(range(40)), temperature=0, max_tokens=6,
                                         extra_body={"draftapprox": {"method": "fullkv"}})
    assert ids.usage.prompt_tokens == 40
    first = ids.choices[0].text.split()
    if len(first) >= 3:
        cut = client(url).completions.create(model=MODEL, prompt=list(range(40)), temperature=0, max_tokens=6,
                                             stop=[first[2]], extra_body={"draftapprox": {"method": "fullkv"}})
        assert cut.choices[0].finish_reason == "stop" and first[2] not in cut.choices[0].text


def test_a_ratio_on_a_short_prompt_passes_it_through_and_says_so(server):
    url, _ = server
    out = complete(url, words(6), max_tokens=3, extra_body={"draftapprox": {"method": "specpc", "budget": 0.25,
                                                                            "settings": {"start_layer": 1}}})
    note = out.model_extra["draftapprox"]["budget_note"]
    assert "passed through" in note
    tiny_ratio = {"method": "specpc", "budget": 0.01, "settings": {"window": 8, "start_layer": 1}}
    out = complete(url, words(200), max_tokens=3, extra_body={"draftapprox": tiny_ratio})
    assert "kept the window" in out.model_extra["draftapprox"]["budget_note"]


BAD = [
    ({"model": "other"}, "unknown model", "model"),
    ({"draftapprox": {"method": "nope"}}, "unknown method", "draftapprox.method"),
    ({"draftapprox": {"settings": {"nope": 1}}}, "unknown knob", "draftapprox.settings"),
    ({"draftapprox": {"settings": {"window": "x"}}}, "window", "draftapprox.settings"),
    ({"draftapprox": {"budget": 0}}, "budget must be > 0", "draftapprox.budget"),
    ({"draftapprox": {"budget": 1.5}}, "ratio must be in (0, 1]", "draftapprox.budget"),
    ({"draftapprox": {"method": "speckv", "extra": 1}}, "unknown field", "draftapprox.extra"),
    ({"prompt": ""}, "the prompt is empty", "prompt"),
    ({"prompt": "   "}, "the prompt is empty", "prompt"),
    ({"prompt": words(3000), "max_tokens": 4}, "exceeds", "prompt"),
    ({"prompt": [1, 2, 99999]}, "token ids must be in", "prompt"),
    ({"prompt": ["a", "b"]}, "one prompt per request", "prompt"),
    ({"max_tokens": 0}, "max_tokens must be >= 1", "max_tokens"),
    ({"max_tokens": 2040}, "exceeds the model's context", "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings", "stop"),
    ({"stop": [""]}, "must not be empty", "stop"),
    ({"temperature": -1}, "temperature", "temperature"),
    ({"top_p": 0}, "top_p", "top_p"),
    ({"n": 2}, "n > 1", "n"),
    ({"logprobs": 2}, "logprobs", "logprobs"),
    ({"echo": True}, "echo", "echo"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "frequency_penalty"),
    ({"tools_unknown_field": 1}, "unknown field", "tools_unknown_field"),
]


@pytest.mark.parametrize(("change", "message", "param"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_input_gets_a_400_that_says_why(server, change, message, param):
    url, _ = server
    body = {"model": MODEL, "prompt": words(20), "max_tokens": 4} | change
    response = httpx.post(f"{url}/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


def test_malformed_json_and_chat_mistakes_get_400s(server):
    url, _ = server
    response = httpx.post(f"{url}/completions", content=b'{"model": "tiny", "prompt": ', timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    for change, message in [({"messages": []}, "messages"), ({"tools": [{"type": "function"}]}, "tools"),
                            ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
                            ({"messages": [{"role": "user", "content": "  "}]}, "messages are empty")]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": words(5)}]} | change
        response = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


def test_the_api_key_is_required_on_v1_routes_only():
    service = tiny_service()
    with running(service, api_key="sekrit") as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        assert client(url, key="sekrit").models.list().data[0].id == MODEL
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200
        response = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": "w1"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def metric(url: str, name: str) -> float:
    text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_move(server):
    url, _ = server
    before = (metric(url, 'draftapprox_requests_total{status="200"}'), metric(url, "draftapprox_prompt_tokens_total"),
              metric(url, "draftapprox_time_to_first_token_seconds_count"))
    complete(url, words(30), max_tokens=3)
    after = (metric(url, 'draftapprox_requests_total{status="200"}'), metric(url, "draftapprox_prompt_tokens_total"),
             metric(url, "draftapprox_time_to_first_token_seconds_count"))
    assert after[0] == before[0] + 1 and after[1] == before[1] + 30 and after[2] == before[2] + 1
    assert metric(url, "draftapprox_kv_cache_bytes") == 0 and metric(url, "draftapprox_queue_depth") == 0


def test_speculative_requests_answer_as_plain_ones_and_count_in_metrics():
    """A draft close to the target, so that proposals are taken; per request, or by the server's default."""
    service = tiny_service(close=True)
    with running(service) as url:
        prompt = words(80, seed=3)
        plain = complete(url, prompt, max_tokens=16, extra_body={"draftapprox": {"method": "fullkv"}})
        for asked in (3, "auto"):
            fast = complete(url, prompt, max_tokens=16,
                            extra_body={"draftapprox": {"method": "fullkv", "speculative": asked}})
            extra = fast.model_extra["draftapprox"]
            assert fast.choices[0].text == plain.choices[0].text and extra["speculative"] == asked
            assert extra["kv_bytes_draft"] > 0 and 0 <= extra["accepted_tokens"] <= extra["proposed_tokens"]
        proposed = metric(url, "draftapprox_speculative_proposed_tokens_total")
        accepted = metric(url, "draftapprox_speculative_accepted_tokens_total")
        assert 0 < accepted <= proposed
        assert metric(url, "draftapprox_speculative_acceptance_rate") == pytest.approx(accepted / proposed)
        service.speculative = 2  # the server's default (`serve --speculative 2`)
        stream = list(client(url).completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16,
                                                     stream=True, extra_body={"draftapprox": {"method": "fullkv"}}))
        assert "".join(c.choices[0].text for c in stream if c.choices) == plain.choices[0].text
        assert stream[-1].model_extra["draftapprox"]["speculative"] == 2
        for bad in (-1, "lots", 2.5):
            response = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2,
                                                              "draftapprox": {"speculative": bad}}, timeout=60)
            error = response.json()["error"]
            assert response.status_code == 400 and error["param"] == "draftapprox.speculative", response.text
            assert "speculative must be a number of tokens" in error["message"]


def test_a_server_without_a_draft_or_with_static_steps_refuses_speculation():
    static = tiny_service(static_decode=True)
    with running(static) as url:
        response = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": words(20), "max_tokens": 2,
                                                          "draftapprox": {"speculative": 2}}, timeout=60)
        assert response.status_code == 400 and "static" in response.json()["error"]["message"]
    lone = tiny_service(method="fullkv")
    lone.pair.draft = None
    with running(lone) as url:
        response = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": words(20), "max_tokens": 2,
                                                          "draftapprox": {"speculative": 2}}, timeout=60)
        assert response.status_code == 400 and "needs a draft" in response.json()["error"]["message"]


def test_a_failing_request_fails_alone(server, monkeypatch):
    url, _ = server

    def boom(self, state):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(SpecPC, "select", boom)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good = pool.submit(complete, url, words(40), max_tokens=20, extra_body={"draftapprox": {"method": "fullkv"}})
        with pytest.raises(openai.InternalServerError, match="planted failure"):
            complete(url, words(40, seed=5), max_tokens=4, extra_body={"draftapprox": options("specpc")})
        assert good.result().usage.completion_tokens >= 1
    assert complete(url, words(10), max_tokens=2).usage.prompt_tokens == 10


def test_batched_answers_equal_answers_served_alone(server):
    url, _ = server
    requests = [(words(30 + 15 * i, seed=i), m) for i, m in enumerate(["fullkv", "speckv", "snapkv", "adakv",
                                                                        "specpc", "verispeckv", "fullkv"])]

    def ask(prompt, method):
        return complete(url, prompt, max_tokens=12, extra_body={"draftapprox": options(method)})

    alone = [ask(*r).choices[0].text for r in requests]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = [f.result().choices[0].text for f in [pool.submit(ask, *r) for r in requests]]
    assert together == alone


def test_a_client_that_goes_away_has_its_work_cancelled_and_its_cache_freed(server, monkeypatch):
    url, service = server
    scheduler = service.backend.scheduler
    step = DecodeBatch.step

    def slowed(self):  # every step a few milliseconds: the answers below cannot end before their client leaves
        time.sleep(0.005)
        return step(self)

    monkeypatch.setattr(DecodeBatch, "step", slowed)
    stream = client(url).completions.create(model=MODEL, prompt=words(100), max_tokens=1500, stream=True,
                                            extra_body={"draftapprox": {"method": "fullkv"}, "ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert scheduler.held_bytes() > 0
    stream.close()
    assert wait_for(lambda: scheduler.held_bytes() == 0 and not scheduler._running, 120)
    # and without streaming: the request's timeout is the client's
    with pytest.raises(openai.APITimeoutError):
        client(url, timeout=1.0).completions.create(model=MODEL, prompt=words(100), max_tokens=1800,
                                                     extra_body={"draftapprox": {"method": "fullkv"},
                                                                 "ignore_eos": True})
    assert wait_for(lambda: scheduler.held_bytes() == 0 and not scheduler._running, 120)


def test_a_burst_beyond_the_queue_gets_429_with_retry_after():
    # room for one request at a time, one more may wait
    service = tiny_service(method="fullkv", budget=None, kv_cache_memory=600 * 512, max_queue=1)
    with running(service) as url:
        def ask(i):
            return httpx.post(f"{url}/completions", timeout=120,
                              json={"model": MODEL, "prompt": words(40, seed=i), "max_tokens": 200,
                                    "ignore_eos": True})

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        codes = sorted(a.status_code for a in answers)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        refused = next(a for a in answers if a.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["code"] == "queue_full"
        # a request that can never fit names the limit
        too_big = httpx.post(f"{url}/completions", timeout=60,
                             json={"model": MODEL, "prompt": words(1500), "max_tokens": 200})
        assert too_big.status_code == 400 and "--kv-cache-memory" in too_big.json()["error"]["message"]


def test_a_request_that_runs_too_long_ends_with_an_error():
    service = tiny_service(method="fullkv", budget=None, request_timeout=0.5)
    with running(service) as url:
        response = httpx.post(f"{url}/completions", timeout=60,
                              json={"model": MODEL, "prompt": words(50), "max_tokens": 1900, "ignore_eos": True})
        assert response.status_code == 408 and "timed out" in response.json()["error"]["message"]
        assert wait_for(lambda: service.backend.scheduler.held_bytes() == 0)
