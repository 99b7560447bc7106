"""The accuracy grid: every (sample, method, budget) on one draft/target pair, appended to a JSONL file as each
answer finishes, so a grid can span several runs and survive a kill (at most the answer in flight is lost).

Work is shared where the methods agree: per sample, one target prefill serves every KV method (captured with the
most window rows any of them needs) and one draft lookahead serves SpecKV, Ada-SpecKV and SpecKV-PC. Samples are
visited sample-major (index 0 of every task, then index 1, ...), so a partial grid covers every cell evenly.
"""

from __future__ import annotations

import dataclasses
import platform
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, InputError
from ..generation import Prepared, generate, generate_batched, new_state, prefill, prepare
from ..methods import METHODS, FullKV, KVMethod, Method, PromptMethod, make, parse_budget, parse_setting
from ..models.loading import Pair, precision
from . import ruler
from .answer_log import Results, answer_key, at_budget
from .metrics import score

DRAFT_ALONE = "draft"  # the draft model answering by itself: the floor the draft-based methods must beat


@dataclass(frozen=True)
class Job:
    """One method at one budget (None for FullKV and the draft floor, which have none)."""

    method: str
    budget: int | float | None
    knobs: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        """The method as its answers and the report name it: `speckv`, or `speckv(window=64)` when set."""
        return self.method + knob_suffix(dict(self.knobs))

    @property
    def label(self) -> str:
        return at_budget(self.name, self.budget)

    def build(self) -> Method:
        return make(self.method, self.budget, **dict(self.knobs)) if self.method != DRAFT_ALONE else FullKV()

    def describe(self) -> str:
        if self.method == DRAFT_ALONE:
            return "the draft model alone, full cache"
        return self.method if self.budget is None else self.build().describe()


def knob_suffix(settings: dict[str, object]) -> str:
    """`(key=value,...)` after the name of a method run at other than its defaults, so that each setting has its
    own answers (a rerun at another setting must not skip as done) and its own line in the report."""
    return "(" + ",".join(f"{k}={v}" for k, v in sorted(settings.items())) + ")" if settings else ""


_SPEC = re.compile(r"\s*([\w-]+)\s*(?:\((.*)\))?\s*")


def parse_method(spec: str) -> tuple[str, dict[str, str]]:
    """`speckv(window=64,pool=avg)` -> ("speckv", {"window": "64", "pool": "avg"}): one grid can run a method at
    several settings, sharing the sample's prefill and draft lookahead."""
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise ConfigError(f"cannot read method {spec!r}; write NAME or NAME(KEY=VALUE,...), e.g. speckv(window=64)")
    try:
        settings = dict(parse_setting(item) for item in filter(str.strip, (match[2] or "").split(",")))
    except ConfigError as error:
        raise ConfigError(f"method {spec!r}: {error}") from None
    return match[1].lower(), settings


def plan(methods: Iterable[str], budgets: Iterable[str], knobs: dict[str, dict[str, str]] | None = None
         ) -> list[Job]:
    """Jobs for every method at the budgets of its kind: token counts go to KV methods and SpecKV-PC, ratios to
    prompt methods; FullKV and the draft run once. KV methods run first so they share the prefill.
    A method may carry its own knobs, `speckv(window=64)`; `knobs` sets them for every use of a method, e.g.
    {"specpc": {"window": "32"}}, and the inline ones win."""
    parsed = [parse_budget(b) if isinstance(b, str) else b for b in budgets]
    counts = [b for b in parsed if isinstance(b, int)]
    ratios = [b for b in parsed if isinstance(b, float)]
    jobs: list[Job] = []
    for spec in methods:
        name, inline = parse_method(spec)
        if name in ("fullkv", DRAFT_ALONE):
            if inline:
                raise ConfigError(f"{name} has no knobs, got {spec!r}")
            jobs.append(Job(name, None))
            continue
        cls = METHODS.get(name)
        if cls is None:
            raise ConfigError(f"unknown method {name!r}; choose from {', '.join([*METHODS, DRAFT_ALONE])}")
        own = tuple(sorted({**(knobs or {}).get(name, {}), **inline}.items()))
        mine = ratios if issubclass(cls, PromptMethod) else counts
        if not mine:
            kind = "ratios (0.25)" if issubclass(cls, PromptMethod) else "token counts (128)"
            raise ConfigError(f"{name} needs budgets given as {kind}; none were given")
        jobs += [Job(name, b, own) for b in mine]
    for job in jobs:
        job.build()  # reject bad knobs before any model loads
    twice = [label for label, count in Counter(j.label for j in jobs).items() if count > 1]
    if twice:
        raise ConfigError(f"given twice: {', '.join(sorted(twice))}")
    order = {"kv": 0, "cascade": 1, "prompt": 2}
    return sorted(jobs, key=lambda j: 3 if j.method == DRAFT_ALONE else order[METHODS[j.method].kind])


def coordinates(tasks: list[str], lengths: list[int], count: int, shard: tuple[int, int] = (0, 1),
                split: str | None = None) -> Iterator[tuple[int, int, str]]:
    """(index, length, task) in sample-major order: a stopped grid is short of whole samples, not of tasks.
    `shard` (i, n) keeps the sample indices equal to i modulo n: n processes, each with its own answer file, split
    a grid between them (one per GPU, or several on one GPU that a single process leaves mostly idle).
    `split` (`dev`, `test`): only that split's indices among the first `count` (`ruler.SPLITS`)."""
    for index in range(shard[0], count, shard[1]):
        if split is not None and ruler.split_of(index) != split:
            continue
        for length in lengths:
            for task in tasks:
                yield index, length, task


def samples(tokenizer, tasks: list[str], lengths: list[int], count: int, seed: int) -> Iterator[ruler.Sample]:
    for index, length, task in coordinates(tasks, lengths, count):
        yield ruler.generate_sample(tokenizer, task, length, index, seed)


class Prompts:
    """The prompt each sample of an answer file was answered on (its fingerprint; the token count for rows older
    than fingerprints), so that a resumed run cannot give a sample's remaining answers another prompt after a
    change to the generator, its haystack or its word lists; and what our rows were made with, so that a resumed
    run can say when it would add answers from other library versions or another device. Filled by `open`, from
    the rows `Results` reads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.seen: dict[str, tuple[str | None, int | None]] = {}
        self.made_with: set[str] = set()

    @classmethod
    def open(cls, output: Path) -> tuple[Results, Prompts]:
        """The answer log and the prompts its rows were given, from one read of the file."""
        prompts = cls(output)
        return Results(output, each=prompts._note), prompts

    def _note(self, row: dict) -> None:
        if "sample" in row:
            self.seen.setdefault(row["sample"], (row.get("prompt_sha"), row.get("prompt_tokens")))
        if "env" in row and "peer" not in row["env"]:  # a peer's rows record its own virtualenv
            self.made_with.add(made_with(row["env"]))

    def check(self, sample: ruler.Sample) -> None:
        sha, tokens = self.seen.get(sample.id, (None, None))
        if (sha is not None and sha != sample.fingerprint) or (tokens is not None and tokens != sample.prompt_tokens):
            raise ConfigError(f"{sample.id}: its answers in {self.path} were given another prompt ({tokens} tokens, "
                              f"fingerprint {sha or 'not recorded'}; now {sample.prompt_tokens} tokens, "
                              f"{sample.fingerprint}). The RULER generator, its haystack or its word lists differ "
                              "from that run's: write to a new output file")


def made_with(env: dict) -> str:
    """What in an environment can change an answer: library versions, device and precision."""
    return ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "device", "dtype", "draft_dtype") if k in env)


def environment(pair: Pair) -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "device": str(pair.target.device), "dtype": precision(pair.target),
            **({"draft_dtype": precision(pair.draft)} if pair.draft is not None else {}),
            "threads": torch.get_num_threads()}


def check_grid(tasks: list[str], lengths: list[int]) -> None:
    for task in tasks:
        if task not in ruler.TASKS:
            raise ConfigError(f"unknown task {task!r}; choose from {', '.join(ruler.TASKS)}")
    for length in lengths:
        if length < 256:
            raise ConfigError(f"prompt lengths must be at least 256 tokens, got {length}")


def run(pair: Pair, jobs: list[Job], tasks: list[str], lengths: list[int], count: int, output: Path, *,
        seed: int = 42, models: dict | None = None, progress: bool = True, max_new_tokens: int | None = None,
        decode_batch: int = 1, shard: tuple[int, int] = (0, 1), split: str | None = None, log=print) -> int:
    """Run every job on every sample not yet in `output`; returns the number of answers written.

    `max_new_tokens` caps each task's answer length (RULER's by default), for quick smoke runs.
    `decode_batch` > 1: a sample's answers on the target are prepared first, then decoded together in groups of up
    to that many (`generation.generate_batched`), each written as soon as it finishes; a kill then loses the
    sample's answers still in flight, at most one group's. 1: one answer at a time, each written when done.
    `split`: answer only the development (`dev`) or the test (`test`) samples; every row records its split.
    """
    if not jobs:
        raise ConfigError("no methods to run")
    if decode_batch < 1:
        raise ConfigError(f"decode_batch must be >= 1, got {decode_batch}")
    if not 0 <= shard[0] < shard[1]:
        raise ConfigError(f"shard {shard[0]}/{shard[1]}: need 0 <= i < n")
    check_grid(tasks, lengths)
    if any(j.method == DRAFT_ALONE or j.build().needs_draft for j in jobs) and pair.draft is None:
        raise ConfigError("these methods need the draft model; load the pair with a draft")
    results, prompts = Prompts.open(output)
    env = {**environment(pair), **(models or {})}
    if others := prompts.made_with - {made_with(env)}:
        log(f"note: {output} holds answers made with {'; '.join(sorted(others))}. This run adds answers made with "
            f"{made_with(env)}; `eval report` lists every environment with its answers.")
    draft_pair = Pair(pair.draft, pair.tokenizer, None) if pair.draft is not None else None
    # what is left is known from the sample ids alone; each prompt is generated only when its turn comes (a 16k
    # prompt takes about half a second, and a large grid would otherwise wait minutes before its first answer)
    todo = []  # (index, length, task, jobs not yet answered), in sample-major order
    if split is not None and split not in ruler.SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose from {', '.join(ruler.SPLITS)}")
    for index, length, task in coordinates(tasks, lengths, count, shard, split):
        sid = ruler.sample_id(task, length, seed, index)
        pending = [j for j in jobs if answer_key(sid, j.name, j.budget) not in results.done]
        if pending:
            todo.append((index, length, task, pending))
    written = 0
    bar = progress_bar(progress)
    with bar:
        tid = bar.add_task("RULER grid", total=sum(len(p) for *_, p in todo))
        for index, length, task, pending in todo:
            sample = ruler.generate_sample(pair.tokenizer, task, length, index, seed)
            prompts.check(sample)
            if max_new_tokens is not None:
                sample = dataclasses.replace(sample, max_new_tokens=min(max_new_tokens, sample.max_new_tokens))
            written += _Sample(pair, draft_pair, sample, results, env, bar, tid).run(pending, decode_batch)
    return written


@dataclass
class _Sample:
    """One sample's answers: one shared target prefill for the KV methods, then each job's answer."""

    pair: Pair
    draft_pair: Pair | None
    sample: ruler.Sample
    results: Results
    env: dict
    bar: object
    tid: object
    shared: dict[str, float] = dataclasses.field(default_factory=dict)  # the prefill's phases, until reported

    def run(self, jobs: list[Job], decode_batch: int) -> int:
        pair, sample = self.pair, self.sample
        ids = ruler.encode(pair.tokenizer, sample.context + sample.question, sample.answer_prefix)
        if ids.shape[1] != sample.prompt_tokens:
            raise InputError(f"{sample.id}: prompt re-encodes to {ids.shape[1]} tokens, not {sample.prompt_tokens}")
        stop = ruler.TASKS[sample.task].stop
        state = new_state(pair, ids, sample.max_new_tokens)
        methods = {j: j.build() for j in jobs}
        rows = [m.rows for j, m in methods.items() if j.method != DRAFT_ALONE and (isinstance(m, KVMethod) or m.rows)]
        if rows:
            prefill(state, max(rows))  # once, with the most rows any method reads from it
            self.shared = dict(state.timings.seconds)
        options = {"max_new_tokens": sample.max_new_tokens, "stop": stop}
        batched: list[tuple[Job, Prepared, float]] = []
        for job, method in methods.items():
            self._status(job)
            start = time.perf_counter()
            if job.method == DRAFT_ALONE:
                self._write(job, generate(self.draft_pair, ids, method, **options), time.perf_counter() - start)
            elif decode_batch == 1:
                self._write(job, generate(pair, ids, method, state=state, **options), time.perf_counter() - start)
            else:
                batched.append((job, prepare(pair, ids, method, state=state, **options), time.perf_counter() - start))
        if batched:
            self.bar.update(self.tid, description=f"{sample.task} #{sample.index}: decoding {len(batched)} together")
            prepared = [p for _, p, _ in batched]
            last = time.perf_counter()
            for i, result in generate_batched(pair, prepared, decode_batch):
                # charged: its preparation, plus the decoding time since the previous answer finished, so that a
                # sample's seconds add up to its wall time (its own latency is in timings["decode"])
                job, _, seconds = batched[i]
                now = time.perf_counter()
                self._write(job, result, seconds + now - last)
                last = now
        return len(methods)

    def _status(self, job: Job) -> None:
        self.bar.update(self.tid, description=f"{self.sample.task} #{self.sample.index} {job.label}")

    def _write(self, job: Job, result, seconds: float) -> None:
        sample, record = self.sample, result.record.to_dict()
        # what a prompt method gave the target, for the report's "is the answer still in it" split
        cut = {} if result.kept_ids is None else {"compressed": self.pair.tokenizer.decode(result.kept_ids[0])}
        self.results.append({
            "key": answer_key(sample.id, job.name, job.budget), "sample": sample.id, "task": sample.task,
            "index": sample.index, "split": ruler.split_of(sample.index), "length": sample.length, "seed": sample.seed,
            "method": job.name, "budget": job.budget, "config": job.describe(),
            "prediction": result.text, "expected": list(sample.outputs),
            "score": score(sample.task, result.text, list(sample.outputs)),
            "prompt_tokens": record["prompt_tokens"], "prompt_sha": sample.fingerprint,
            "kept_tokens": record["kept_tokens"], "budget_tokens": record["budget_tokens"],
            "kv_bytes_full": record["kv_bytes_full"],
            "kv_bytes_kept": record["kv_bytes_kept"], "new_tokens": record["new_tokens"],
            "stop_reason": record["stop_reason"], "timings": record["timings"],
            "decode_batch": record["decode_batch"], "seconds": round(seconds, 3), "shared_timings": self.shared,
            "finished": time.time(), "env": self.env, **cut,
        })
        self.shared = {}  # the shared prefill is reported once, with the first answer that used it
        self.bar.advance(self.tid)


def progress_bar(enabled: bool):
    """The rich progress bar every long run shows (grid, bench, overlap)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=not enabled)


def parse_list(text: str | list[str] | None, what: str) -> list[str]:
    """Comma-separated values; a comma inside parentheses belongs to its value (`speckv(window=64,pool=avg)`)."""
    parts = [text] if isinstance(text, str) else text or []
    items = [x.strip() for part in parts for x in re.split(r",(?![^()]*\))", part)]
    items = [x for x in items if x]
    if not items:
        raise InputError(f"--{what}: give at least one value")
    return items

