"""LiteLLM: SpecPC in a pre-call hook, before any provider. Here the provider is `draftapprox serve` itself on the
offline pair (FullKV, in this process), so the example needs no other server: the hook cuts the chat's long text,
the server answers from what was kept."""

import asyncio
import os
import socket
import threading
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of LiteLLM's price list
import litellm
import uvicorn

import draftapprox as da
from draftapprox.examples import long_prompt
from draftapprox.integrations.litellm import DraftCompressionHook
from draftapprox.serve.app import create_app
from draftapprox.serve.local import LocalBackend
from draftapprox.serve.metrics import Metrics
from draftapprox.serve.responses import Service
from draftapprox.serve.scheduler import Scheduler

pair = da.load_pair()
service = Service(pair, LocalBackend(Scheduler(pair, kv_cache_memory=2**30, metrics=Metrics())), "local",
                  da.FullKV())
with socket.socket() as probe:  # a free port
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
threading.Thread(target=server.run, daemon=True).start()
while not server.started:
    time.sleep(0.05)

hook = DraftCompressionHook(pair, da.SpecPC(budget=0.25))
litellm.callbacks = [hook]
answer = asyncio.run(litellm.acompletion(
    model="openai/local", api_base=f"http://127.0.0.1:{port}/v1", api_key="unused", max_tokens=12, temperature=0,
    messages=[{"role": "user", "content": long_prompt()}], metadata={"draftapprox": {"budget": 0.25}}))
print(answer.choices[0].message.content)
print(f"the server read {answer.usage.prompt_tokens} tokens of {hook.last_record['prompt_tokens']}")
server.should_exit = True
