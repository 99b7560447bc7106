"""`draftapprox bench serve`: our server under concurrent clients, as a user would run it.

Each cell starts nothing new: one `draftapprox serve` process per prefill-chunk setting serves every method (the
method is per request), and a cell is `clients` streaming requests of one method and prompt length sent at once,
each a different RULER prompt as token ids, `new_tokens` long (`ignore_eos`). Per request it keeps the client's
timestamps and our record; per cell, the server's own decode-step counters (from `/metrics`), so that
decode-phase throughput is tokens per second of decode steps, prefill excluded, whatever the batch was.

The stall study admits one long prompt while a short-prompt stream is decoding, per prefill chunk, and keeps the
running stream's token gaps before and during the admission and the admitted request's time to first token.
Rows go to a JSONL file as they are measured; a rerun skips what is there.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..errors import ConfigError, InputError
from ..eval import ruler
from ..eval.answer_log import Results
from ..speculative import parse as parse_speculative
from .engine import free_port, server_process, stream

METHODS = {
    "fullkv": {"method": "fullkv"},
    "speckv@256": {"method": "speckv", "budget": 256},
    "adaspeckv@256": {"method": "adaspeckv", "budget": 256},
    "specpc@0.25": {"method": "specpc", "budget": 0.25},
    "verispeckv@128": {"method": "verispeckv", "budget": 128},
}
SPECULATIVE = "+spec="
"""A method's name followed by this and a setting asks for speculative decoding: `fullkv+spec=auto`."""
STARTUP_SECONDS = 600


def options(method: str) -> dict:
    """The `draftapprox` field of a request for `method` (a name of `METHODS`, optionally `+spec=K`)."""
    base, _, speculative = method.partition(SPECULATIVE)
    if base not in METHODS:
        raise ConfigError(f"unknown serving method {base!r}; choose from {', '.join(METHODS)}, each optionally "
                          f"{SPECULATIVE}K or {SPECULATIVE}auto (speculative decoding)")
    return METHODS[base] | ({"speculative": parse_speculative(speculative)} if speculative else {})


@dataclass
class Plan:
    """What to measure: the throughput grid and the stall study."""

    methods: list[str]
    lengths: list[int]
    clients: list[int]
    new_tokens: int = 64
    prefill_chunk: int | str = "auto"  # the grid's --prefill-chunk (the server's default: auto)
    stall_chunks: tuple[int | str, ...] = ("auto", 16, 32, 64, 128)
    stall_length: int = 4096
    task: str = "niah_single_2"
    seed: int = 42
    dtype: str = "auto"
    skip: tuple[str, ...] = ()  # cells "method|length|clients" left out (too slow to be worth it)

    def __post_init__(self) -> None:
        for method in self.methods:
            options(method)
        if any(c < 1 for c in self.clients) or self.new_tokens < 2:
            raise ConfigError("clients must be >= 1 and new_tokens >= 2")


@contextlib.contextmanager
def _launch(plan: Plan, chunk: int | str, log_path: Path, target: str | None, draft: str | None,
            cache: str | Path | None) -> Iterator[str]:
    """`draftapprox serve` in a process of its own at this prefill chunk; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "draftapprox", "serve", "--port", str(port), "--prefill-chunk", str(chunk),
               "--kv-cache-memory", "16GiB", "--max-queue", "256", "--dtype", plan.dtype, "--served-model-name",
               "target", "--method", "fullkv"]
    for flag, value in (("--target", target), ("--draft", draft), ("--cache-dir", cache)):
        if value is not None:
            command += [flag, str(value)]
    url = f"http://127.0.0.1:{port}"
    with server_process("draftapprox serve", command, dict(os.environ), url, log_path, STARTUP_SECONDS):
        yield url


def _prompts(tokenizer, plan: Plan, length: int, count: int) -> list[list[int]]:
    samples = [ruler.generate_sample(tokenizer, plan.task, length, i, plan.seed) for i in range(count)]
    return [ruler.encode(tokenizer, s.context + s.question, s.answer_prefix)[0].tolist() for s in samples]


def decode_counters(url: str) -> tuple[float, float, float]:
    """(steps, tokens, seconds) of all decode steps so far, from the server's `draftapprox_decode_step_seconds` and
    its generated tokens (a step gives a sequence several when it speculates)."""
    steps = tokens = seconds = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        match = re.match(r'draftapprox_decode_step_seconds_(count|sum)\{batch="(\d+)"\} (\S+)', line)
        if match:
            value = float(match.group(3))
            if match.group(1) == "count":
                steps += value
            else:
                seconds += value
        elif line.startswith("draftapprox_generation_tokens_total "):
            tokens = float(line.split()[1])
    return steps, tokens, seconds


def _body(method: str, ids: list[int], new_tokens: int) -> dict:
    return {"model": "target", "prompt": ids, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "draftapprox": options(method)}


def _cell(url: str, method: str, prompts: list[list[int]], new_tokens: int) -> tuple[list[dict], dict]:
    before = decode_counters(url)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(lambda ids: stream(url, _body(method, ids, new_tokens)), prompts))
    after = decode_counters(url)
    origin = min(o["start"] for o in outs)
    requests = [{"start": o["start"] - origin, "stamps": [t - origin for t in o["stamps"]], "end": o["end"] - origin,
                 "usage": o["usage"], "record": o["draftapprox"]} for o in outs]
    return requests, {"decode_steps": after[0] - before[0], "decode_tokens": after[1] - before[1],
                      "decode_seconds": after[2] - before[2]}


def _running_stream(url: str, ids: list[int], new_tokens: int, stamps: list[float], stop: threading.Event,
                    failed: list[str]) -> None:
    """Stream a long FullKV answer, stamping each token, until `stop` is set (then hang up: the server cancels)."""
    with httpx.stream("POST", f"{url}/v1/completions", timeout=None,
                      json={**_body("fullkv", ids, new_tokens), "stream": True}) as response:
        if response.status_code != 200:
            failed.append(f"the running stream was refused ({response.status_code}): {response.read()[:200]!r}")
            return
        for line in response.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
            if stop.is_set():
                return


def _stall(url: str, chunk: int | str, short: list[int], long: list[int]) -> dict:
    """A short-prompt FullKV stream, then a long prompt admitted beside it: the stream's gaps before and during."""
    stamps: list[float] = []
    failed: list[str] = []
    stop = threading.Event()
    context = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0].get("max_model_len") or 8192
    new_tokens = min(4000, context - len(short))  # as long as the stream may run: it is hung up on when done
    reader = threading.Thread(target=_running_stream, args=(url, short, new_tokens, stamps, stop, failed),
                              daemon=True)
    reader.start()
    while len(stamps) < 30:  # the running stream reaches its steady step
        if not reader.is_alive():
            raise InputError(failed[0] if failed else "the running stream ended before its 30th token")
        time.sleep(0.05)
    admitted = stream(url, _body("fullkv", long, 2))
    stop.set()
    reader.join(timeout=120)
    began, first = admitted["start"], admitted["stamps"][0]
    gaps = list(itertools.pairwise(stamps))
    return {"prefill_chunk": chunk, "steady_gaps": [b - a for a, b in gaps if b < began][-20:],
            "gaps_during": [b - a for a, b in gaps if began <= a and b <= first],
            "admitted_first_token": first - began, "admitted_prompt_tokens": admitted["usage"]["prompt_tokens"]}


def wait_while(pause: Path | None, log: Callable[[str], object]) -> None:
    """Hold the next cell while `pause` exists: on a shared machine, other work can run between cells without
    landing inside a measurement."""
    if pause is not None and pause.exists():
        log(f"paused while {pause} exists")
        while pause.exists():
            time.sleep(2)


def measure(plan: Plan, output: Path, tokenizer, *, target: str | None = None, draft: str | None = None,
            cache: str | Path | None = None, log: Callable[[str], object] = print, pause: Path | None = None) -> int:
    """Every cell and stall point not yet in `output`; returns rows written. `pause`: a file whose existence holds
    the next cell."""
    results = Results(output)
    env = {"device": "cpu", "threads": os.cpu_count(), "dtype": plan.dtype, "task": plan.task,
           "new_tokens": plan.new_tokens}
    written = 0
    cells = [(m, n, c) for n in plan.lengths for c in plan.clients for m in plan.methods
             if f"{m}|{n}|{c}" not in plan.skip]
    todo = [cell for cell in cells if f"cell|{cell[0]}|{cell[1]}|{cell[2]}|{plan.prefill_chunk}" not in results.done]
    work = output.parent / ".serve-work" / "server.log"
    if todo:
        with _launch(plan, plan.prefill_chunk, work, target, draft, cache) as url:
            stream(url, _body("fullkv", _prompts(tokenizer, plan, 256, 1)[0], 2))  # warm-up
            for method, n, c in todo:
                wait_while(pause, log)
                requests, counters = _cell(url, method, _prompts(tokenizer, plan, n, c), plan.new_tokens)
                key = f"cell|{method}|{n}|{c}|{plan.prefill_chunk}"
                results.append({"key": key, "kind": "cell", "method": method, "length": n, "clients": c,
                                "prefill_chunk": plan.prefill_chunk, "requests": requests, **counters,
                                "env": env, "finished": time.time()})
                written += 1
                wall = max(r["end"] for r in requests)
                log(f"{method} at {n} tokens, {c} clients: {c / wall * 60:.2f} requests/min")
    for chunk in plan.stall_chunks:
        key = f"stall|{chunk}|{plan.stall_length}"
        if key in results.done:
            continue
        wait_while(pause, log)
        with _launch(plan, chunk, work, target, draft, cache) as url:
            short = _prompts(tokenizer, plan, 256, 1)[0]
            stream(url, _body("fullkv", short, 2))  # warm-up
            row = _stall(url, chunk, short, _prompts(tokenizer, plan, plan.stall_length, 1)[0])
        results.append({"key": key, "kind": "stall", **row, "env": env, "finished": time.time()})
        written += 1
        log(f"prefill chunk {chunk}: admitted first token {row['admitted_first_token']:.1f} s")
    return written
