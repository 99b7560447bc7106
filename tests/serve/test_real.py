"""The real pair behind the server: a planted fact answered through the OpenAI API by FullKV, SpecKV and SpecPC at
a quarter of the prompt, streaming and not, all six requests in flight together."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import re
from pathlib import Path

import openai
import pytest

import draftapprox as da
from draftapprox.examples import ANSWER, long_prompt
from draftapprox.serve.local import LocalBackend
from draftapprox.serve.metrics import Metrics
from draftapprox.serve.responses import Service
from draftapprox.serve.scheduler import Scheduler

from .conftest import running

pytestmark = pytest.mark.real
SERVING = Path(__file__).resolve().parents[2] / "docs" / "guides" / "serving.md"
MODEL = "qwen2.5-coder-1.5b-instruct"  # the name the serving guide's example sends


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_planted_fact_is_answered_through_the_server(stream, real_server):
    url, messages = real_server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    def ask(method: str) -> tuple[str, dict]:
        body = {"draftapprox": {"method": method, "budget": 0.25}} if method != "fullkv" else \
            {"draftapprox": {"method": "fullkv"}}
        if not stream:
            out = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12,
                                                 extra_body=body)
            return out.choices[0].message.content, out.model_extra["draftapprox"]
        parts = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                    max_tokens=12, stream=True, extra_body=body))
        text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        return text, next(p for p in parts if p.choices and p.choices[0].finish_reason).model_extra["draftapprox"]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = dict(zip(["fullkv", "speckv", "specpc"], pool.map(ask, ["fullkv", "speckv", "specpc"]),
                           strict=True))
    for method, (text, record) in answers.items():
        assert ANSWER.lower() in text.lower(), (method, text)
        assert record["method"] == method
    assert answers["specpc"][1]["kept_tokens"] < answers["specpc"][1]["prompt_tokens"] // 3
    assert answers["speckv"][1]["kv_bytes_kept"] < answers["fullkv"][1]["kv_bytes_kept"] // 3


@pytest.fixture(scope="module")
def real_server(real_pair):
    pair = real_pair
    scheduler = Scheduler(pair, kv_cache_memory=2**30, metrics=Metrics())
    service = Service(pair, LocalBackend(scheduler), MODEL, da.SpecKV(0.25))
    messages = [{"role": "user", "content": long_prompt(words=400, depth=0.35)}]
    with running(service) as url:
        yield url, messages


def test_the_serving_guide_example_runs_and_finds_the_fact(real_server):
    url, _ = real_server
    block = next(b for b in re.findall(r"```python\n(.*?)```", SERVING.read_text(), flags=re.S) if "OpenAI(" in b)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.replace("http://127.0.0.1:8000/v1", url), str(SERVING), "exec"), {})
    lines = out.getvalue().splitlines()
    assert ANSWER in lines[0], lines
    prompt_tokens, kept = map(int, lines[1].split())
    assert kept < prompt_tokens // 3
