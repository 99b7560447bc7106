"""`eval`: the offline RULER accuracy grid, its reports, and the peer implementations it is compared with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError
from .common import (
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
    check_report_file,
    err,
    grid,
    local_model,
    method_knobs,
    pairs,
    require_files,
    say_written,
    write_report,
)

eval_app = typer.Typer(help="Accuracy on an offline RULER grid: run it resumably (no subcommand), then report.",
                       invoke_without_command=True)
app.add_typer(eval_app, name="eval")
DEFAULT_METHODS = ("fullkv,draft,streamingllm,snapkv,pyramidkv,adakv,speckv,adaspeckv,laq,speckvpc,"
                   "specpc,targetpc,specprefill,randompc,recencypc")


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must be I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise InputError(f"--shard {text}: need 0 <= I < N")
    return index, count


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
    split: Annotated[str, typer.Option(
        help="all, or dev (samples 0-4: choose knobs on these) or test (samples 5-9: report on these) among the "
             "first --samples.")] = "all",
    cache_dir: CacheOpt = None,
) -> None:
    """Run every method x budget x length x task x sample not yet in OUTPUT, appending each answer as it ends."""
    if ctx.invoked_subcommand is not None:
        return
    from ..eval import harness
    from ..models.loading import load_pair

    task_list, length_list = grid(tasks, lengths, samples, output)
    if decode_batch < 1:
        raise InputError(f"--decode-batch must be >= 1, got {decode_batch}")
    shard_index, shards = _shard(shard)
    if split not in ("all", "dev", "test"):
        raise InputError(f"--split must be all, dev or test, got {split!r}")
    jobs = harness.plan(harness.parse_list(methods, "methods"), harness.parse_list(budgets, "budgets"),
                        method_knobs(knob))
    pair = load_pair(draft, target, dtype=dtype, draft_dtype=draft_dtype, device=device, threads=threads,
                     cache=cache_dir, log=err.print)
    models = {"draft_model": draft or "offline qwen2.5-coder-0.5b-instruct",
              "target_model": target or "offline qwen2.5-coder-1.5b-instruct"}
    written = harness.run(pair, jobs, task_list, length_list, samples, output, seed=seed, models=models,
                          decode_batch=decode_batch, shard=(shard_index, shards),
                          split=None if split == "all" else split, log=err.print)
    say_written(written, "answers", output)


@eval_app.command("report")
def eval_report(
    inputs: Annotated[list[Path], typer.Argument(help="JSONL files written by `draftapprox eval`.")],
    out: Annotated[Path, typer.Option(help="Directory for accuracy.md, accuracy.csv and the plots.")] =
    Path("docs/results"),
    command: Annotated[str | None, typer.Option(help="The command that produced the JSONL, quoted in the report.")]
    = None,
) -> None:
    """Write the markdown and CSV tables and the plots of the evaluation protocol from answer files."""
    from ..eval import report

    write_report(report.write, inputs, out, command, ("accuracy.md",))


@eval_app.command("study")
def eval_study(
    inputs: Annotated[list[Path], typer.Argument(help="JSONL files written by `draftapprox eval`: the candidates' "
                                                      "development answers, the chosen method's test answers and the "
                                                      "baselines' answers on the same prompts.")],
    chosen: Annotated[str | None, typer.Option(help="The chosen method as the grid names it, e.g. verispeckv or "
                                                    "verispeckv(window=8); none: the development study alone.")]
    = None,
    timing: Annotated[list[Path] | None, typer.Option(help="`draftapprox bench` file with SpecKV and the chosen "
                                                           "method timed in one run.")] = None,
    out: Annotated[Path, typer.Option(help="The study's markdown report; its CSV and plot go beside it.")] =
    Path("robust-speckv.md"),
    command: Annotated[str | None, typer.Option(help="The command that produced the JSONL, quoted in the report.")]
    = None,
    targets: TargetsOpt = None,
) -> None:
    """A method chosen on the development samples (0-4), reported against its baselines on the test samples
    (5-9): overall, split by whether the draft alone was right, with paired intervals and the goal figures
    given (`--targets`)."""
    from ..bench.report import load as load_bench
    from ..bench.targets import load as load_targets
    from ..eval import study

    require_files([*inputs, *(timing or [])])
    check_report_file(out, "--out")
    study.headline(chosen)  # an unknown method or knob is refused before any file is read
    goals = load_targets(targets, study.TARGETS)
    study.check_goals(goals)
    timings = [load_bench([path]) for path in timing or []]  # one benchmark file per prompt
    for path in study.write(inputs, out, chosen, timings, command=command, targets=goals):
        err.print(f"wrote {path}")


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
    from ..eval import report
    from ..report_pages import splice

    require_files(inputs)
    if out is not None:
        check_report_file(out, "--out")
    text = "\n".join(report.diff(report.load(inputs), method, against))
    if out is None:
        print(text, end="")
    else:
        splice(out, text)
        err.print(f"wrote {out}")


@eval_app.command("setup-peer")
def eval_setup_peer(
    name: Annotated[str, typer.Argument(
        help="Peer to install in its own virtual environment: kvpress, llmlingua, reference, vllm (an engine).")],
    source: Annotated[str | None, typer.Option(
        help="Where to clone a peer's code from (reference: default its GitHub URL; a local clone works).")] = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Create a peer's own virtual environment (its pins conflict with ours); idempotent."""
    from ..eval import peers

    peers.setup(name, cache_dir, log=err.print, source=source)


@eval_app.command("kvpress")
def eval_kvpress(
    presses: Annotated[str, typer.Option(
        help="Comma-separated kvpress presses; kvzip too, at 2-3 times a prefill's cost; speckv and adaspeckv are "
             "draftapprox's own presses inside kvpress's pipeline (they use --draft).")] =
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
    draft: DraftOpt = None,
    dtype: DtypeOpt = "bfloat16",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Run NVIDIA kvpress's presses on the same RULER prompts and target, in kvpress's own environment."""
    from transformers import AutoTokenizer

    from ..eval import harness, peers
    from ..models import offline

    task_list, length_list = grid(tasks, lengths, samples, output)
    try:
        budget_list = [int(x) for x in harness.parse_list(budgets, "budgets")]
    except ValueError:
        raise InputError(f"--budgets must be whole token counts, got {budgets!r}") from None
    press_list, mode_list = harness.parse_list(presses, "presses"), harness.parse_list(modes, "modes")
    peers.check_kvpress(press_list, mode_list)  # before the target is fetched
    model_dir = local_model(target, offline.TARGET.name, "--target", cache_dir)
    draft_dir = (local_model(draft, offline.DRAFT.name, "--draft", cache_dir)
                 if any(p in peers.DRAFT_PRESSES for p in press_list) else None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    written = peers.run_kvpress(tokenizer, model_dir, press_list, budget_list, mode_list, task_list, length_list,
                                samples, output,
                                seed=seed, dtype=dtype, threads=threads, cache=cache_dir,
                                knobs=pairs(knob, "--set"), draft_dir=draft_dir, log=err.print)
    say_written(written, "kvpress answers", output)


@eval_app.command("kvpress-selection")
def eval_kvpress_selection(
    cases: Annotated[str, typer.Option(help="Comma-separated comparisons (default: all): snapkv, pyramidkv, adakv, "
                                            "adakv-nofloor, streamingllm, snapkv-settings, snapkv-input.")] = "all",
    budgets: Annotated[str, typer.Option(help="Comma-separated KV budgets (pairs per head).")] = "128",
    lengths: LengthsOpt = "2048",
    tasks: TasksOpt = "all",
    samples: SamplesOpt = 1,
    output: OutputOpt = Path("kvpress-selection.jsonl"),
    report: Annotated[Path, typer.Option(help="Markdown file the comparison table is written (spliced) into: a "
                                              "report of ours or a new file.")] = Path("kvpress-selection.md"),
    command: Annotated[str | None, typer.Option(help="The command quoted in the report.")] = None,
    seed: SeedOpt = 42,
    target: TargetOpt = None,
    dtype: Annotated[str, typer.Option(help="The target's dtype on both sides.")] = "float32",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Which KV pairs our SnapKV/PyramidKV/AdaKV/StreamingLLM and kvpress's presses keep on the same prompts, one
    difference (implementation, setting, allocation, input) per case."""
    from ..eval import harness
    from ..eval.answer_log import read
    from ..eval.peers import kvpress_selection
    from ..models import offline
    from ..models.loading import load_pair

    task_list, length_list = grid(tasks, lengths, samples, output, ("key", "case", "sample"))
    check_report_file(report, "--report")
    case_list = list(kvpress_selection.CASES) if cases == "all" else harness.parse_list(cases, "cases")
    kvpress_selection.check_cases(case_list)  # before any model loads
    try:
        budget_list = [int(x) for x in harness.parse_list(budgets, "budgets")]
    except ValueError:
        raise InputError(f"--budgets must be whole token counts, got {budgets!r}") from None
    model_dir = local_model(target, offline.TARGET.name, "--target", cache_dir)
    pair = load_pair(None, str(model_dir), with_draft=False, dtype=dtype, threads=threads, cache=cache_dir,
                     log=err.print)
    written = kvpress_selection.run(pair, model_dir, case_list, budget_list, task_list, length_list, samples, output,
                                    seed=seed, dtype=dtype, threads=threads, cache=cache_dir, log=err.print)
    say_written(written, "comparisons", output)
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
    from ..eval import peers
    from ..models import offline
    from ..models.loading import load_pair

    task_list, length_list = grid(tasks, lengths, samples, output)
    ratio_list = _ratios(ratios)
    draft_dir = local_model(draft, offline.DRAFT.name, "--draft", cache_dir)
    pair = load_pair(None, target, with_draft=False, dtype=dtype, threads=threads, cache=cache_dir, log=err.print)
    written = peers.run_llmlingua(pair, draft_dir, ratio_list, task_list, length_list, samples, output, seed=seed,
                                  threads=threads, cache=cache_dir, log=err.print)
    say_written(written, "LongLLMLingua answers", output)


def _ratios(text: str) -> list[float]:
    from ..eval import harness

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
        help="Markdown file the comparison table is written (spliced) into, a report of ours or a new file "
             "[default: reference.md, reference-speckv.md for speckv].")] = None,
    command: Annotated[str | None, typer.Option(help="The command quoted in the report.")] = None,
    seed: SeedOpt = 42,
    draft: DraftOpt = None,
    target: TargetOpt = None,
    dtype: Annotated[str, typer.Option(help="The models' dtype on both sides.")] = "float32",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Our selections against the authors' reference implementation (its own environment), same prompts."""
    from ..eval import harness
    from ..eval.answer_log import read
    from ..eval.peers import reference
    from ..methods import parse_budget
    from ..models import offline
    from ..models.loading import Pair, load_model

    task_list, length_list = grid(tasks, lengths, samples, output, ("key", "sample", "overlap"))
    if method not in ("specpc", "speckv"):
        raise InputError(f"--method must be specpc or speckv, got {method!r}")
    report = report or Path("reference.md" if method == "specpc" else "reference-speckv.md")
    check_report_file(report, "--report")
    ratio_list = _ratios(ratios) if method == "specpc" else []
    budget_list = [parse_budget(b) for b in harness.parse_list(budgets, "budgets")] if method == "speckv" else []
    if not all(isinstance(b, int) for b in budget_list):
        raise InputError("SpecKV's --budgets are KV pairs per head (whole numbers)")
    draft_dir = local_model(draft, offline.DRAFT.name, "--draft", cache_dir)
    draft_model, tokenizer = load_model(draft_dir, dtype=dtype, threads=threads, log=err.print)
    common = {"seed": seed, "dtype": dtype, "threads": threads, "cache": cache_dir, "log": err.print}
    if method == "specpc":
        written = reference.run_specpc(Pair(draft_model, tokenizer, draft_model), draft_dir, ratio_list,
                                       task_list, length_list, samples, output, **common)
    else:
        target_dir = local_model(target, offline.TARGET.name, "--target", cache_dir)
        target_model, _ = load_model(target_dir, dtype=dtype, threads=threads, log=err.print)
        written = reference.run_speckv(Pair(target_model, tokenizer, draft_model), target_dir, draft_dir,
                                       budget_list, task_list, length_list, samples, output, **common)
    say_written(written, "comparisons", output)
    err.print(f"wrote {reference.report(read(output), report, command)}")
