"""Options, the root `app` and helpers that several command groups share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..errors import ConfigError, InputError
from ..safe_write import check_writable_folder

app = typer.Typer(help="Draft-based approximate inference (SpecKV, SpecPC) for long-context LLMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
err = Console(stderr=True, soft_wrap=True)  # a log line stays one line in a file, whatever its length
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
def _dtype(value: str | None) -> str | None:
    """A dtype is checked when the command line is read, not when a model loads minutes later."""
    from ..models.loading import CHOICES

    if value is not None and value not in CHOICES:
        raise typer.BadParameter(f"{value!r} is not a dtype; choose from {', '.join(CHOICES)}")
    return value


DtypeOpt = Annotated[str, typer.Option(callback=_dtype,
    help="auto (bfloat16 where the device computes it natively; on other CPUs bfloat16-weights, on older GPUs "
         "float16), float32, bfloat16, float16, bfloat16-weights (CPU: weights held in bfloat16, products in "
         "float32) or int8 (CPU: dynamic quantisation of linear layers).")]
DraftDtypeOpt = Annotated[str | None, typer.Option(
    callback=_dtype, help="The draft's own dtype (default: --dtype), e.g. int8.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for torch.")]
def _cache_folder(value: Path | None) -> Path | None:
    if value is not None:
        try:
            check_writable_folder(value, "--cache-dir")
        except InputError as error:
            raise typer.BadParameter(str(error).removeprefix("--cache-dir ")) from None
    return value


CacheOpt = Annotated[Path | None, typer.Option(
    "--cache-dir", help="Model cache directory (default: $DRAFTAPPROX_CACHE or the user cache dir).",
    callback=_cache_folder)]


def pairs(items: list[str] | None, option: str) -> dict[str, str]:
    from ..methods import parse_setting

    try:
        return dict(parse_setting(item) for item in items or [])
    except ConfigError as error:
        raise InputError(f"{option}: {error}") from None


def method_from(name: str, budget: str | None, settings: list[str] | None):
    from ..methods import make, parse_budget

    return make(name, parse_budget(budget) if budget is not None else None, **pairs(settings, "--set"))


TargetsOpt = Annotated[Path | None, typer.Option(
    help="A TOML file of `name = threshold` targets the report checks (scripts/targets/ holds ours).")]
SpeculativeOpt = Annotated[str, typer.Option(
    help="Speculative decoding: the draft proposes this many tokens a step and the target checks them in one "
         "forward (the same greedy tokens, the same sampling distribution); auto = chosen each step; 0 = off.")]


def pair_for(method, draft, target, dtype, draft_dtype, device, threads, cache_dir, with_target: bool = True,
             speculative: int | str = 0):
    from ..models.loading import load_pair

    return load_pair(draft, target, with_draft=method.needs_draft or bool(speculative), with_target=with_target,
                     dtype=dtype,
                     draft_dtype=draft_dtype, device=device, threads=threads, cache=cache_dir, log=err.print)


LengthsOpt = Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens.")]
TasksOpt = Annotated[str, typer.Option(help="Comma-separated RULER tasks (default: all 13).")]
SamplesOpt = Annotated[int, typer.Option(help="Samples per task and length.")]
OutputOpt = Annotated[Path, typer.Option(help="JSONL file answers are appended to (reruns skip what is there).")]
SeedOpt = Annotated[int, typer.Option(help="RULER generation seed.")]
BENCH_ROWS = ("key", "length", "first_token")  # of a `bench` row
METHODS_HELP = ("Comma-separated methods, each NAME or NAME(KEY=VALUE,...) to run it at other knobs (e.g. "
                "speckv(window=64)); `draft` = the draft model alone.")


def grid(tasks: str, lengths: str, samples: int, output: Path | None = None,
         fields: tuple[str, ...] | None = None) -> tuple[list[str], list[int]]:
    """The tasks and lengths of a grid, checked (with the sample count and the answer file, whose rows must have
    `fields`) before any model loads."""
    from ..eval import harness, ruler

    if output is not None:
        from ..eval.answer_log import ANSWER_FIELDS

        check_output(output, fields or ANSWER_FIELDS)

    task_list = list(ruler.TASKS) if tasks == "all" else harness.parse_list(tasks, "tasks")
    try:
        length_list = [int(x) for x in harness.parse_list(lengths, "lengths")]
    except ValueError:
        raise InputError(f"--lengths must be whole token counts, got {lengths!r}") from None
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}")
    harness.check_grid(task_list, length_list)
    return task_list, length_list


def say_written(count: int, what: str, output: Path) -> None:
    """Close a resumable run: a rerun that finds everything done says so, rather than "0 ... written"."""
    err.print(f"{count} {what} written to {output}" if count else
              f"every one of the {what} this run asks for is already in {output}; nothing to run")


def check_output(path: Path, fields: tuple[str, ...] = ("key",)) -> None:
    """An answer file to append to must be one: absent, or every complete line a row of ours with `fields` (a torn
    last line is a killed run's, cut when the run resumes), in a folder that can be written."""
    from ..eval.answer_log import NotOurs, read

    if path.is_dir():
        raise InputError(f"--output {path} is a folder; give a .jsonl file")
    if path.exists():
        try:
            read(path, lambda row: all(f in row for f in fields), "results")
        except NotOurs as error:
            raise InputError(f"--output {error}; it was left untouched: give another file") from None
    check_writable_folder(path.parent, "--output's folder")


def check_report_file(path: Path, option: str) -> None:
    """A markdown report to splice into, before any work: absent, or a report of ours (it has the markers)."""
    from ..report_pages import is_report

    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a .md file")
    check_writable_folder(path.parent, f"{option}'s folder")
    if path.exists():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            text = None
        if text is None or (text.strip() and not is_report(text)):
            raise InputError(f"{option} {path} exists and is not a report of ours (no generated-tables markers); "
                             "it was left untouched: give another file")


def check_pause_file(path: Path | None) -> None:
    if path is not None and path.is_dir():
        raise InputError(f"--pause-file {path} is a folder")


def check_report_folder(folder: Path, option: str, names: tuple[str, ...] = ()) -> None:
    """A folder reports go to, before any work: it is or can be a folder, and the reports `names` in it are ours."""
    check_writable_folder(folder, option)
    for name in names:
        if name.endswith(".md"):
            check_report_file(folder / name, option)


def method_knobs(items: list[str] | None) -> dict[str, dict[str, str]]:
    """`--set METHOD.KEY=VALUE` options as {method: {key: value}}."""
    from ..methods import parse_setting

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


def local_model(source: str | None, default: str, option: str, cache_dir: Path | None) -> Path:
    """A model directory a peer can load from its own environment (default: the offline model, fetched)."""
    from ..models import offline

    path = Path(source) if source else offline.fetch(default, cache_dir)
    if not path.is_dir():
        raise InputError(f"{option} must be a local model directory for the peer to load, got {source}")
    return path


def require_files(inputs: list[Path]) -> None:
    for path in inputs:
        if not path.is_file():
            raise InputError(f"no such file: {path}")


def write_report(write, inputs: list[Path], out: Path, command: str | None, names: tuple[str, ...] = ()) -> None:
    require_files(inputs)
    check_report_folder(out, "--out", names)
    for path in write(inputs, out, command=command):
        err.print(f"wrote {path}")
