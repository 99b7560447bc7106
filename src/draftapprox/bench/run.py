"""Latency and memory of every method against FullKV, measured side by side in one run (`draftapprox bench`).

Each job (a method at a budget, or a floor) runs in its own process, which loads only the models the job needs:
the process's resident set is then what a user running that method would pay, so "SpecKV's RSS over FullKV's"
really measures the draft's cost. Inside the process, lengths run in increasing order, each with one warm-up
(which also measures the memory) and `repeats` timed generations of exactly `new_tokens` tokens (EOS ignored).
Every (job, length) becomes one fsynced JSONL row as soon as it is measured, so a benchmark resumes where a kill
left it.

Floors (what the SpecPC/SpecKV targets of `bench report --targets` are stated against):
- `draft-prefill`: the draft's forward over the whole prompt, no logits (all SpecPC's draft needs);
- `target-prefill@r`: the target's prefill of the first `r * n` prompt tokens (what SpecPC's target runs).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import forward as forward_module
from ..cache import new_cache
from ..errors import ConfigError, DraftApproxError, InputError
from ..eval import harness, ruler
from ..eval.answer_log import Results, at_budget
from ..forward import forward
from ..generation import generate
from ..kernels import probe
from ..models import scratch
from ..models.loading import Pair, load_model, load_pair
from . import limits

DRAFT_PREFILL, TARGET_PREFILL = "draft-prefill", "target-prefill"
DRAFT_LIMIT, TARGET_LIMIT = "draft-limit", "target-limit"  # GEMM-bound prefill, bandwidth-bound decode (limits.py)
LIMITS = (DRAFT_LIMIT, TARGET_LIMIT)
FLOORS = (DRAFT_PREFILL, TARGET_PREFILL, *LIMITS)


@dataclass
class Settings:
    """Everything a worker needs to load its models and build its prompts; recorded with every row."""

    lengths: list[int]
    repeats: int = 3
    new_tokens: int = 64
    task: str = "niah_multikey_1"
    seed: int = 42
    draft: str | None = None
    target: str | None = None
    dtype: str = "bfloat16"
    draft_dtype: str | None = None
    device: str = "cpu"
    threads: int | None = None
    cache_dir: str | None = None
    prefill_chunk: int | None = None  # None: forward.PREFILL_CHUNK; rows measured otherwise are labelled apart


def _uses_draft(job: harness.Job) -> bool:
    if job.method in (DRAFT_PREFILL, DRAFT_LIMIT, harness.DRAFT_ALONE):
        return True
    return job.method not in (TARGET_PREFILL, TARGET_LIMIT) and job.build().needs_draft


def variant(job: harness.Job, settings: Settings) -> str:
    """What this run sets apart from the defaults (a draft dtype, a prefill chunk), so rows of different settings
    sit side by side in one file."""
    parts = []
    if settings.draft_dtype is not None and _uses_draft(job):
        parts.append(f"draft={settings.draft_dtype}")
    if settings.prefill_chunk is not None:
        parts.append(f"chunk={settings.prefill_chunk}")
    return " ".join(parts)


def label(job: harness.Job, settings: Settings) -> str:
    """The job (method@budget, then its knobs: `speckv@256 lookahead=32`) and the run's variant."""
    knobs = (f"{k}={v}" for k, v in job.knobs)
    return " ".join([at_budget(job.method, job.budget), *knobs, variant(job, settings)]).strip()


def plan(methods: list[str], budgets: list[str], knobs: dict[str, dict[str, str]] | None = None,
         floors: bool = True) -> list[harness.Job]:
    """The eval grid's jobs (token budgets to KV methods, ratios to prompt methods), plus the floors."""
    jobs = harness.plan(methods, budgets, knobs)
    if floors:
        ratios = sorted({j.budget for j in jobs if isinstance(j.budget, float)})
        jobs += [harness.Job(DRAFT_PREFILL, None)] + [harness.Job(TARGET_PREFILL, r) for r in ratios]
        jobs += [harness.Job(DRAFT_LIMIT, None), harness.Job(TARGET_LIMIT, None)]
    return jobs


def key(job: harness.Job, settings: Settings, length: int) -> str:
    return f"{label(job, settings)}|{length}"


def measurable(jobs: list[harness.Job], settings: Settings) -> list[harness.Job]:
    """The jobs this run can measure: a GEMM-bound limit is the model's multiply-adds at the measured GEMM rate of
    its own dtype, which a dynamically quantised int8 draft does not have (its products are int8 GEMMs that the
    probe does not time), so its draft limit is left out."""
    if (settings.draft_dtype or "") == "int8":
        return [j for j in jobs if j.method != DRAFT_LIMIT]
    return jobs


def run(jobs: list[harness.Job], settings: Settings, output: Path, progress: bool = True) -> int:
    """Measure every (job, length) not yet in `output`, one worker process per job; returns rows written."""
    if settings.prefill_chunk is not None and settings.prefill_chunk < 1:
        raise ConfigError(f"--prefill-chunk must be >= 1, got {settings.prefill_chunk}")
    if settings.repeats < 1 or settings.new_tokens < 2:
        raise ConfigError("bench needs --repeats >= 1 and --new-tokens >= 2 (decode time is per token after the "
                          "first)")
    harness.check_grid([settings.task], settings.lengths)
    jobs = measurable(jobs, settings)
    done = Results(output).done
    todo = [(job, [n for n in sorted(settings.lengths) if key(job, settings, n) not in done]) for job in jobs]
    todo = [(job, lengths) for job, lengths in todo if lengths]
    bar = harness.progress_bar(progress)
    written = 0
    with bar:
        tid = bar.add_task("bench", total=sum(len(lengths) for _, lengths in todo))
        for job, lengths in todo:
            bar.update(tid, description=f"{job.label} ({', '.join(map(str, lengths))} tokens)")
            spec = json.dumps({"job": asdict(job), "lengths": lengths, "settings": asdict(settings),
                               "output": str(output)})
            proc = subprocess.Popen([sys.executable, "-m", "draftapprox.bench.run", spec], stdout=subprocess.PIPE,
                                    text=True)
            for _ in proc.stdout:  # one line per measured length
                written += 1
                bar.advance(tid)
            if proc.wait() != 0:
                raise DraftApproxError(f"the benchmark worker for {job.label} failed (exit {proc.returncode}); "
                                       "its error is above")
    return written


# --- inside the worker process -----------------------------------------------------------------------------------


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's record of this process's peak RSS to its current RSS (Linux: `clear_refs` 5), so that
    `VmHWM` afterwards is the peak of what follows; False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _peak_rss() is not None
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


class Memory:
    """Peak memory of a block, and on CUDA the allocator's own peak. `extra_*` is the peak minus what was held on
    entry: the activations and caches of the block, the weights excluded.

    The RSS peak is the kernel's own (`VmHWM`, reset on entry), exact and free. Where that reset is not allowed,
    a thread samples RSS every millisecond instead; on a machine of few cores that sampler slows a generation
    measurably, time the methods' rows would otherwise carry and an engine's would not."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def __enter__(self) -> Memory:
        scratch.release_heap()
        self.base_rss = self.peak_rss = _rss()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_device = torch.cuda.memory_allocated(self.device)
        self._kernel_peak = self.base_rss is not None and _reset_peak_rss()
        self._running = self.base_rss is not None and not self._kernel_peak
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak_rss = max(self.peak_rss, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        if self.base_rss is not None:
            peak = _peak_rss() if self._kernel_peak else None
            self.peak_rss = max(self.peak_rss, _rss(), peak or 0)
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def result(self) -> dict:
        out = {"peak_rss": self.peak_rss,
               "extra_rss": None if self.base_rss is None else self.peak_rss - self.base_rss}
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            out.update(peak_device=peak, extra_device=peak - self.base_device)
        return out


def _models(job: harness.Job, settings: Settings) -> tuple[Pair | None, object, object]:
    """(pair for a generation job, the model a floor times, tokenizer); only what the job needs is loaded."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    common = {"device": settings.device, "threads": settings.threads, "cache": settings.cache_dir}
    draft_dtype = settings.draft_dtype or settings.dtype
    if job.method in (DRAFT_PREFILL, DRAFT_LIMIT):
        model, tokenizer = load_model(settings.draft or "qwen2.5-coder-0.5b-instruct", dtype=draft_dtype, **common)
        return None, model, tokenizer
    if job.method == harness.DRAFT_ALONE:
        model, tokenizer = load_model(settings.draft or "qwen2.5-coder-0.5b-instruct", dtype=draft_dtype, **common)
        return Pair(model, tokenizer), None, tokenizer
    pair = load_pair(settings.draft, settings.target, with_draft=_uses_draft(job), dtype=settings.dtype,
                     draft_dtype=draft_dtype, **common)
    if job.method == TARGET_LIMIT:
        return None, pair.target, pair.tokenizer
    return pair, pair.target, pair.tokenizer


def _limit(model, measured: dict, n: int) -> dict:
    bound = limits.bounds(model, measured["gemm_flops"], measured["gemv_bytes"], n)
    return {"first_token": bound["prefill"], "phases": {"gemm_bound": bound["prefill"]},
            "decode_per_token": bound["decode"], "kv_bytes": None, "kv_bytes_full": None, "prompt_tokens": n}


def _timed_floor(job: harness.Job, model, ids: torch.Tensor) -> dict:
    if job.method == TARGET_PREFILL:
        ids = ids[:, : max(1, int(job.budget * ids.shape[1]))]
    sync = model.device.type == "cuda"
    start = time.perf_counter()
    forward(model, ids, new_cache(), 0, logits=job.method == TARGET_PREFILL)
    if sync:
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    return {"first_token": seconds, "phases": {job.method: seconds}, "decode_per_token": None, "kv_bytes": None,
            "kv_bytes_full": None, "prompt_tokens": ids.shape[1]}


def _timed_generation(job: harness.Job, pair: Pair, ids: torch.Tensor, new_tokens: int) -> dict:
    record = generate(pair, ids, job.build(), max_new_tokens=new_tokens, ignore_eos=True).record
    phases = {k: v for k, v in record.timings.items() if k != "decode"}
    return {"first_token": record.first_token_seconds, "phases": phases,
            "decode_per_token": record.timings.get("decode", 0.0) / max(record.new_tokens - 1, 1),
            "kv_bytes": record.kv_bytes_kept, "kv_bytes_full": record.kv_bytes_full,
            "prompt_tokens": record.prompt_tokens, "kept_tokens": record.kept_tokens}


def _median(runs: list[dict]) -> dict:
    """Median of each number over the repetitions (phases too), and the per-repetition raw values."""
    out: dict = {}
    for name in ("first_token", "decode_per_token", "peak_rss", "extra_rss", "peak_device", "extra_device"):
        values = [r[name] for r in runs if r.get(name) is not None]
        out[name] = statistics.median(values) if values else None
    out["phases"] = {p: statistics.median(r["phases"].get(p, 0.0) for r in runs)
                     for p in dict.fromkeys(p for r in runs for p in r["phases"])}
    for name in ("kv_bytes", "kv_bytes_full", "prompt_tokens", "kept_tokens"):
        out[name] = runs[-1].get(name)
    out["runs"] = [{"first_token": r["first_token"], "decode_per_token": r["decode_per_token"]} for r in runs]
    return out


def worker(job: harness.Job, lengths: list[int], settings: Settings, output: Path) -> None:
    results = Results(output)
    if settings.prefill_chunk is not None:
        forward_module.PREFILL_CHUNK = settings.prefill_chunk
    scratch.release_heap()
    before = _rss()
    pair, model, tokenizer = _models(job, settings)
    scratch.release_heap()
    loaded = None if before is None else _rss() - before  # what the job's models add to a process
    device = (model if model is not None else pair.target).device
    env = {**harness.environment(pair or Pair(model, tokenizer)), "cpu": probe.cpu_name(), "loaded_rss": loaded,
           "settings": asdict(settings)}
    if job.method in LIMITS:
        # measured once, with this process's threads and the model's dtype, after a short forward: a cold process
        # measures a far lower GEMM rate (a limit that low flatters the engine)
        forward(model, torch.randint(0, model.config.get_text_config().vocab_size, (1, 128)), new_cache(), 0)
        env["rates"] = limits.rates(model)
    for length in lengths:
        sample = ruler.generate_sample(tokenizer, settings.task, length, 0, settings.seed)
        ids = ruler.encode(tokenizer, sample.context + sample.question, sample.answer_prefix)

        def once(ids=ids) -> dict:
            if pair is None or job.method == TARGET_PREFILL:
                return _timed_floor(job, model, ids)
            return _timed_generation(job, pair, ids, settings.new_tokens)

        memory: dict = {}
        if job.method in LIMITS:
            runs = [_limit(model, env["rates"], ids.shape[1])]
        else:
            # the warm-up is also the memory run: its heap is trimmed first, so that the peak over the base is what
            # the block needs; the timed runs then reuse the heap as a serving process would (a trimmed heap is
            # faulted in again page by page, which a long prefill pays in system time)
            with Memory(device) as measured:
                once()
            memory = measured.result()
            runs = [once() for _ in range(settings.repeats)]
        results.append({"key": key(job, settings, length), "method": job.method, "budget": job.budget,
                        "variant": variant(job, settings), "knobs": dict(job.knobs),
                        "config": job.describe() if job.method not in FLOORS else job.label, "length": length,
                        **_median(runs), **memory, "finished": time.time(), "env": env})
        print(length, flush=True)


def _main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    job = harness.Job(spec["job"]["method"], spec["job"]["budget"],
                      tuple(tuple(kv) for kv in spec["job"]["knobs"]))
    try:
        worker(job, spec["lengths"], Settings(**spec["settings"]), Path(spec["output"]))
    except (DraftApproxError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
