"""What the proxy relays, read against an engine whose answers are written out here (a real HTTP server on
loopback): server-sent events object for object, comment lines, several choices, a stream without its end marker,
the engine's headers, a tokenizer check the engine cannot answer yet, and bodies the engine must judge."""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tests.conftest import tiny_tokenizer

from ..conftest import running_app, words
from .conftest import serving_proxy, tiny_proxy


class Scripted:
    """An OpenAI-style engine with fixed answers, counting what it was sent."""

    def __init__(self, *, loading: bool = False, done: bool = True):
        self.tokenizer, self.bodies = tiny_tokenizer(chat=True), []
        self.loading, self.done = loading, done  # loading: /tokenize answers 503

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": "scripted", "max_model_len": 4096}]})

        async def tokenize(request):
            if self.loading:
                return JSONResponse({"error": "loading"}, status_code=503)
            body = await request.json()
            text = body.get("content", body.get("prompt"))
            return JSONResponse({"tokens": self.tokenizer.encode(text, add_special_tokens=False)})

        async def completions(request):
            body = await request.json()
            self.bodies.append(body)
            if body.get("max_tokens") == 1:  # the ids probe
                return JSONResponse({"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})
            if body.get("busy"):
                return JSONResponse({"error": {"message": "busy"}}, status_code=429,
                                    headers={"Retry-After": "7", "x-request-id": "r-1"})
            if not body.get("stream"):
                return JSONResponse({"id": "c1", "object": "text_completion", "choices": [
                    {"index": 0, "text": "a", "finish_reason": "stop", "stop_reason": None}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}},
                    headers={"x-request-id": "r-2"})
            return StreamingResponse(self.events(body), media_type="text/event-stream")

        self.app = Starlette(routes=[Route("/v1/models", models), Route("/tokenize", tokenize, methods=["POST"]),
                                     Route("/v1/completions", completions, methods=["POST"]),
                                     Route("/v1/chat/completions", completions, methods=["POST"])])

    def chunks(self, body: dict) -> list[dict]:
        base = {"id": "c1", "object": "text_completion", "model": "scripted"}
        out = [{**base, "choices": [{"index": 0, "text": "a", "finish_reason": None}]},
               {**base, "choices": [{"index": 1, "text": "b", "finish_reason": None}]},
               {**base, "choices": [{"index": 0, "text": "c", "finish_reason": "stop"}]},
               {**base, "choices": [{"index": 1, "text": "d", "finish_reason": "length"}]}]
        if (body.get("stream_options") or {}).get("include_usage"):
            out.append({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4,
                                                         "total_tokens": 9}})
        return out

    async def events(self, body: dict):
        yield ": keep-alive\n\n"
        for chunk in self.chunks(body):
            yield f"data: {json.dumps(chunk)}\n\n"
        if self.done:
            yield "data: [DONE]\n\n"


def events(response: httpx.Response) -> tuple[list[dict], list[str]]:
    objects, other = [], []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            objects.append(json.loads(line[6:]))
        elif line:
            other.append(line)
    return objects, other


@pytest.mark.parametrize("done", [True, False], ids=["done", "no-done"])
def test_a_stream_comes_back_object_for_object(done):
    engine = Scripted(done=done)
    with running_app(engine.app) as url, serving_proxy(tiny_proxy(url)) as proxy:
        body = {"model": "scripted", "prompt": "w1 w2", "n": 2, "stream": True}
        response = httpx.post(f"{proxy}/completions", json=body)
    objects, other = events(response)
    sent = engine.bodies[-1]
    assert sent == {**body, "stream_options": {"include_usage": True}}  # usage asked for the record, nothing else
    assert other == [": keep-alive", *(["data: [DONE]"] if done else [])]
    expected = engine.chunks(body)  # the engine's chunks, the usage the client did not ask for left out
    assert [{k: v for k, v in o.items() if k != "draftapprox"} for o in objects] == expected
    assert [("draftapprox" in o) for o in objects] == [False, False, True, True]  # on the finishing chunks


def test_one_choice_carries_the_engines_count_in_its_record():
    engine = Scripted()
    with running_app(engine.app) as url, serving_proxy(tiny_proxy(url)) as proxy:
        response = httpx.post(f"{proxy}/completions", json={"model": "scripted", "prompt": "w1", "stream": True,
                                                             "stream_options": {"include_usage": True}})
    objects, _ = events(response)
    assert objects[-1]["usage"]["prompt_tokens"] == 5 and objects[-1]["choices"] == []
    assert objects[-2]["draftapprox"]["upstream_prompt_tokens"] == 5  # the finishing chunk waited for it


def test_the_engines_status_headers_and_body_come_back():
    engine = Scripted()
    with running_app(engine.app) as url, serving_proxy(tiny_proxy(url)) as proxy:
        busy = httpx.post(f"{proxy}/completions", json={"model": "scripted", "prompt": "w1", "busy": True})
        fine = httpx.post(f"{proxy}/completions", json={"model": "scripted", "prompt": "w1"})
    assert busy.status_code == 429 and busy.json() == {"error": {"message": "busy"}}
    assert busy.headers["retry-after"] == "7" and busy.headers["x-request-id"] == "r-1"
    assert fine.headers["x-request-id"] == "r-2" and fine.json()["choices"][0]["stop_reason"] is None


def test_a_tokenizer_check_the_engine_cannot_answer_yet_is_asked_again():
    engine = Scripted(loading=True)
    with running_app(engine.app) as url, serving_proxy(tiny_proxy(url), probe_every=60) as proxy:
        root = proxy.removesuffix("/v1")
        first = httpx.get(f"{root}/health").json()
        assert first["forwarding"] == "uncut" and "no answer yet" in first["note"]
        engine.loading = False
        out = httpx.post(f"{proxy}/completions", json={"model": "scripted", "prompt": words(200),
                                                       "draftapprox": {"method": "specpc", "budget": 0.25,
                                                                       "settings": {"window": 4}}}).json()
        assert out["draftapprox"]["forwarded"] == "ids" and out["draftapprox"]["kept_tokens"] == 50
        assert httpx.get(f"{root}/health").json()["forwarding"] == "ids"


@pytest.mark.parametrize("body", [
    {"prompt": "w1", "stream": True, "stream_options": True},
    {"messages": [{"role": "user", "content": ["w1"]}]},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": ["f"]}]},
    {"messages": "w1"},
    {"prompt": 7},
], ids=["stream-options", "part", "call", "messages", "prompt"])
def test_a_body_only_the_engine_can_judge_reaches_it(body):
    engine = Scripted()
    path = "/chat/completions" if "messages" in body else "/completions"
    with running_app(engine.app) as url, serving_proxy(tiny_proxy(url)) as proxy:
        response = httpx.post(f"{proxy}{path}", json={"model": "scripted", **body})
    assert response.status_code == 200, response.text  # the scripted engine answers anything
    assert engine.bodies[-1] == {"model": "scripted", **body}


def test_a_batch_with_one_prompt_cut_goes_all_as_ids():
    engine = Scripted()
    with running_app(engine.app) as url, serving_proxy(tiny_proxy(url)) as proxy:
        out = httpx.post(f"{proxy}/completions", json={
            "model": "scripted", "prompt": ["w1 w2", words(200)],
            "draftapprox": {"method": "specpc", "budget": 0.25, "settings": {"window": 4}}}).json()
    prompts = engine.bodies[-1]["prompt"]
    assert prompts[0] == tiny_tokenizer().encode("w1 w2") and len(prompts[1]) == 50
    assert [p["forwarded_whole"] for p in out["draftapprox"]["prompts"]] == ["short", None]


def test_ids_outside_the_vocabulary_are_the_engines_to_judge():
    engine = Scripted()
    with running_app(engine.app) as url, serving_proxy(tiny_proxy(url)) as proxy:
        out = httpx.post(f"{proxy}/completions", json={"model": "scripted", "prompt": [10**6] * 100}).json()
    assert out["draftapprox"]["forwarded_whole"] == "vocabulary" and engine.bodies[-1]["prompt"] == [10**6] * 100
