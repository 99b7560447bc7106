"""Every command and subcommand driven with generated bad arguments and bad files: each must end with exit code 2
and one line on stderr, without a traceback, before it loads a model, and without changing any file it was given.

Loading a model, fetching one, starting a server or running a peer is replaced by a tripwire: bad input that gets
that far was not caught where it should have been (the tripwire's error is an internal one, exit code 1).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from draftapprox.cli import app, run
from draftapprox.report_pages import END, START


class Tripwire(Exception):
    """Reached work that bad input should never reach."""


def _commands() -> dict[tuple[str, ...], object]:
    """Every command by its path, groups that run on their own (`bench`, `eval`) included."""
    found = {}

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if not subcommands or getattr(command, "invoke_without_command", False):
            found[path] = command
        for name, sub in (subcommands or {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return {path: command for path, command in found.items() if path}


COMMANDS = _commands()
ANSWER = {"key": "vt/2048/42/0|fullkv", "sample": "vt/2048/42/0", "task": "vt", "length": 2048, "method": "fullkv",
          "budget": None, "score": 100.0}
BENCH = {"key": "fullkv|2048", "method": "fullkv", "budget": None, "length": 2048, "first_token": 1.0}
# what each file-taking parameter reads or writes
INPUTS = {"inputs", "reference", "baseline"}  # our JSONL files, read
OUTPUTS = {"output"}  # our JSONL files, appended to
FOLDERS = {("bench", "report"): "out", ("eval", "report"): "out", ("bench", "serve"): "report",
           ("bench", "proxy"): "report"}
REPORTS = {("bench", "overlap"): "out", ("bench", "kvpress"): "report", ("eval", "diff"): "out",
           ("eval", "kvpress-selection"): "report", ("eval", "reference"): "report"}


@pytest.fixture(autouse=True)
def tripwires(monkeypatch, tmp_path):
    from draftapprox.bench import engine
    from draftapprox.eval import peers
    from draftapprox.models import loading, offline
    from draftapprox.serve import app as serve_app

    def trip(*args, **kwargs):
        raise Tripwire("bad input reached the work it should have been refused before")

    for module, name in ((loading, "load_model"), (loading, "load_pair"), (offline, "assemble"), (offline, "convert"),
                         (serve_app, "serve_app"), (peers, "_step"), (engine, "server_process")):
        monkeypatch.setattr(module, name, trip)
    monkeypatch.setenv("DRAFTAPPROX_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # defaults that name files write here, never into the checkout


def invoke(args: list[str]) -> tuple[int, str]:
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        code = run(args)
    return code, stderr.getvalue()


def assert_one_line_refusal(args: list[str]) -> None:
    code, stderr = invoke(args)
    lines = stderr.strip().splitlines()
    assert code == 2, f"{args}: exit {code}, stderr {stderr!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{args}: {stderr!r}"
    assert "Traceback" not in stderr


def required(path: tuple[str, ...], folder: Path) -> list[str]:
    """What a command needs besides the parameter under test: a valid input file, a method to compare."""
    extra = []
    if path in {("bench", "report")}:
        good = folder / "good-bench.jsonl"
        good.write_text(json.dumps(BENCH) + "\n")
        extra.append(str(good))
    elif path in {("eval", "report"), ("eval", "diff")}:
        good = folder / "good-answers.jsonl"
        good.write_text(json.dumps(ANSWER) + "\n")
        extra.append(str(good))
    if path == ("eval", "diff"):
        extra += ["--method", "fullkv"]
    if path == ("eval", "setup-peer"):
        extra.append("kvpress")
    return extra


def _numeric(command) -> list[tuple[str, type]]:
    return [(p.opts[0], p.type_descriptor.annotation) for p in command.params
            if p.opts and p.opts[0].startswith("--") and p.type_descriptor.annotation in (int, float)]


NUMERIC = [(path, option, kind) for path, command in COMMANDS.items() for option, kind in _numeric(command)]


def _not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return not text.startswith("-")  # a leading dash would read as another option
    return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(NUMERIC), value=st.text(min_size=0, max_size=12).filter(_not_a_number))
def test_a_malformed_number_is_one_line(tmp_path, case, value):
    path, option, _ = case
    assert_one_line_refusal([*path, *required(path, tmp_path), option, value])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(sorted(COMMANDS)), name=st.from_regex(r"--[a-z][a-z-]{2,12}", fullmatch=True))
def test_an_unknown_option_is_one_line(tmp_path, path, name):
    known = {o for p in COMMANDS[path].params for o in (*p.opts, *p.secondary_opts)}
    if name in known:
        return
    assert_one_line_refusal([*path, *required(path, tmp_path), name])


def bad_file(kind: str, folder: Path, data: bytes) -> Path:
    """A file that is not what a command wants, of one `kind`; `data` varies its content."""
    path = folder / f"bad-{kind}.jsonl"
    if kind == "missing":
        return path
    if kind == "folder":
        path.mkdir(exist_ok=True)
        return path
    if kind == "under-a-file":
        (folder / "a-file").write_text("x")
        return folder / "a-file" / "bad.jsonl"
    content = {"empty": b"", "binary": b"\x00\xff\xfe" + data, "truncated": b'{"key": "vt/2048/42/0|fu' + data[:5],
               "not-jsonl": b"hello\n" + data.replace(b"{", b"(") + b"\nworld\n",
               "wrong-kind": (json.dumps({"key": "x|y", "stage": "cold"}) + "\n").encode(),
               "huge-line": b'{"key": "' + b"x" * (2 << 20) + b'"'}[kind]
    path.write_bytes(content)
    return path


def _file_cases() -> list[tuple[tuple[str, ...], str, str]]:
    cases = []
    for path, command in COMMANDS.items():
        names = {p.name: p for p in command.params}
        for name in names.keys() & (INPUTS | OUTPUTS):
            kinds = ["folder", "under-a-file", "binary", "truncated", "not-jsonl", "huge-line"]
            kinds += ["missing", "empty"] if name in INPUTS else []
            kinds += ["wrong-kind"]
            cases += [(path, name, kind) for kind in kinds]
        if FOLDERS.get(path) in names:
            cases += [(path, FOLDERS[path], kind) for kind in ("binary", "under-a-file", "foreign-report")]
        if "prompt_file" in names:
            cases += [(path, "prompt_file", kind) for kind in ("missing", "folder", "empty", "binary", "under-a-file")]
        if REPORTS.get(path) in names:
            cases += [(path, REPORTS[path], kind) for kind in ("folder", "under-a-file", "foreign-report", "binary")]
    return cases


FILE_CASES = _file_cases()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(FILE_CASES), data=st.binary(min_size=1, max_size=64))
def test_a_bad_file_is_one_line_and_left_untouched(tmp_path, case, data):
    path, name, kind = case
    folder = tmp_path / f"case-{abs(hash((case, data))) % 10**9}"
    folder.mkdir()
    if kind == "foreign-report":  # someone's own file where a report would go
        target = folder / "notes"
        target.mkdir()
        for report in ("performance.md", "accuracy.md", "serving.md", "proxy.md"):
            (target / report).write_text("# my notes\n")
        if path in REPORTS:
            target = folder / "notes.md"
            target.write_text("# my notes\n")
    else:
        target = bad_file(kind, folder, data)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    option = next(p for p in COMMANDS[path].params if p.name == name)
    args = [*path, *required(path, folder)]
    if option.param_type_name == "argument":
        args = [*path, str(target)] + (["--method", "fullkv"] if path == ("eval", "diff") else [])
    else:
        args += [option.opts[0], str(target)]
    assert_one_line_refusal(args)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p in before} == before


@pytest.mark.parametrize("args", [["models", "list"], ["models", "fetch"]], ids=["list", "fetch"])
def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch, args):
    monkeypatch.undo()  # the real fetch: it must stop at the path, before it downloads anything
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").write_text("not a folder")
    assert_one_line_refusal([*args, "--cache-dir", str(tmp_path / "cache")])


def test_an_internal_error_is_one_line_naming_its_log_and_debug_prints_it(monkeypatch):
    from draftapprox import methods

    monkeypatch.setattr(methods, "make", lambda *a, **k: {}["bug"])
    code, stderr = invoke(["generate", "--example", "-m", "fullkv"])
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert "internal error, a bug: KeyError" in stderr and "draftapprox-logs" in stderr
    log = Path(stderr.split("the traceback is in ")[1].split(" (rerun")[0])
    assert "Traceback" in log.read_text() and "KeyError" in log.read_text()
    with pytest.raises(KeyError):
        run(["generate", "--example", "-m", "fullkv", "--debug"])


def test_a_report_file_of_ours_is_spliced_and_a_foreign_one_refused(tmp_path):
    from draftapprox.report_pages import splice

    ours = tmp_path / "ours.md"
    ours.write_text(f"# Title\n\nprose\n\n{START}\nold\n{END}\nafter\n")
    splice(ours, "new")
    assert ours.read_text() == f"# Title\n\nprose\n\n{START}\nnew\n{END}\nafter\n"
    foreign = tmp_path / "foreign.md"
    foreign.write_text("# mine\n")
    with pytest.raises(Exception, match="not a report we generated"):
        splice(foreign, "new")
    assert foreign.read_text() == "# mine\n"


BAD_VALUES = [
    ["serve", "--upstream", "localhost:8000"], ["serve", "--upstream", "http://h:1/v2"],
    ["serve", "--kv-cache-memory", "lots"], ["serve", "--prefill-chunk", "soon"], ["serve", "--chat-forward", "x"],
    ["serve", "--method", "nope"], ["serve", "--upstream", "http://h:1/v1", "--method", "speckv"],
    ["serve", "--upstream", "http://h:1/v1", "--budget", "4096:2"], ["serve", "--budget", "4096:1.0"],
    ["serve", "--upstream", "http://h:1/v1", "--model-budget", "m"],
    ["serve", "--upstream", "http://h:1/v1", "--model-budget", "m=2", "--set", "window=4"],
    ["serve", "--upstream", "http://h:1/v1", "--model-budget", "m=1.5"],
    ["serve", "--upstream", "http://h:1/v1", "--target", "somewhere"],
    ["serve", "--upstream", "http://h:1/v1", "--on-compress-error", "x"],
    ["serve", "--upstream", "http://h:1/v1", "--compress-timeout", "0"],
    ["generate", "--example", "-b", "abc"], ["generate", "--example", "-m", "speckv", "--set", "window"],
    ["generate", "--example", "--dtype", "float64"], ["compress", "--example", "-m", "fullkv"],
    ["bench", "--methods", "nope"], ["bench", "--budgets", "x"], ["bench", "--lengths", "12"],
    ["eval", "--tasks", "nope"], ["eval", "--methods", "speckv(window=)"], ["eval", "--shard", "3/2"],
    ["eval", "--split", "train"], ["eval", "study", "--chosen", "nosuchkv", "README.md"],
    ["eval", "study", "--chosen", "verispeckv(share=2)", "README.md"],
    ["bench", "proxy", "--engine", "nope"], ["bench", "proxy", "--stages", "nope"],
    ["bench", "proxy", "--ratio", "2"], ["bench", "serve", "--methods", "nope"],
    ["bench", "serve", "--clients", "two"], ["bench", "engine", "--engine", "sglang"],
    ["bench", "overlap", "--ratio", "1.5"], ["eval", "reference", "--method", "laq"],
    ["eval", "kvpress", "--presses", "magic"], ["eval", "kvpress-selection", "--cases", "magic"],
    ["eval", "setup-peer", "nope"], ["models", "fetch", "nope"],
]


@pytest.mark.parametrize("args", BAD_VALUES, ids=[" ".join(a) for a in BAD_VALUES])
def test_a_bad_value_is_one_line_before_any_model_loads(args):
    assert_one_line_refusal(args)
