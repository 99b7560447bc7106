"""The docs are tested: every Python block of the README and of the site runs, page by page in one namespace a
page, and prints what its comments say; every `draftapprox ...` line of a shell block is parsed by the command line
itself (a renamed command or option fails here), every `python scripts/...` line's options exist in its script;
JSON blocks parse; the CLI reference is what the command line generates; the HTTP and environment references name
every metric and variable the code defines."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import draftapprox as da
from draftapprox.cli import run as cli
from draftapprox.examples import ANSWER

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "raw" not in p.parts)]
# blocks that need more than a loaded pair, run where that exists
ELSEWHERE = {"OpenAI(": "tests/serve/test_real.py, against a served real pair",
             "integrations.kvpress": "tests/integrations/test_kvpress.py, in kvpress's environment"}


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def runnable(path: Path) -> list[str]:
    return [b for b in blocks(path, "python") if not any(marker in b for marker in ELSEWHERE)]


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


PYTHON = [p for p in PAGES if runnable(p)]


def elsewhere_blocks(marker: str) -> list[tuple[Path, str]]:
    """The blocks another test runs (`ELSEWHERE`), with their pages."""
    return [(p, b) for p in PAGES for b in blocks(p, "python") if marker in b]


@pytest.mark.parametrize("path", [pytest.param(p, id=page_id(p), marks=[pytest.mark.real] if any(
    "load_pair" in b for b in runnable(p)) else []) for p in PYTHON])
def test_the_python_blocks_of_a_page_run_and_print_what_they_say(path, request, monkeypatch):
    if any("load_pair" in b for b in runnable(path)):
        pair = request.getfixturevalue("real_pair")  # one loaded pair for every page; the blocks load it as written
        original = da.load_pair
        monkeypatch.setattr(da, "load_pair", lambda *a, **k: pair if not a and not k else original(*a, **k))
    namespace: dict = {"__name__": "docs"}
    for block in runnable(path):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(path), "exec"), namespace)
        printed = out.getvalue()
        for line in block.splitlines():  # a print whose comment names the planted fact must have printed it
            if line.lstrip().startswith("print(") and f"# {ANSWER}" in line:
                assert ANSWER in printed, (line, printed)
    result, fixed = namespace.get("result"), namespace.get("fixed")
    if fixed is not None and result is not None:
        assert fixed.tokens == result.tokens  # static decode steps: the ordinary loop's tokens


def test_every_block_another_test_runs_is_there():
    for marker, where in ELSEWHERE.items():
        assert elsewhere_blocks(marker), f"no block with {marker!r} left for {where}"


def _commands(block: str) -> list[list[str]]:
    """The command lines of a shell block: continuations joined, comments cut, `&&` and pipes split, environment
    assignments dropped."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue  # a quoted program (`python -c "..."`) is not a command of ours
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "|", ";", "&", "||"):
                while command and re.match(r"^[A-Z_]+=", command[0]):
                    command.pop(0)
                if command:
                    out.append(command)
                command = []
            else:
                command.append(word)
    return out


SHELL = [(p, c) for p in PAGES for b in blocks(p, "bash") for c in _commands(b)]
OURS = [(p, c) for p, c in SHELL if c[0] == "draftapprox"]
SCRIPTS = [(p, c) for p, c in SHELL if c[:1] == ["python"] and len(c) > 1 and c[1].startswith("scripts/")]


@pytest.mark.parametrize(("path", "command"), OURS, ids=[f"{page_id(p)}:{' '.join(c[:3])}" for p, c in OURS])
def test_every_draftapprox_command_in_the_docs_parses(path, command, capsys):
    """Parsed with `--help` last: click checks every command name and option before it answers the help."""
    args = [a for a in command[1:] if a != "--debug"]
    assert cli([*args, "--help"]) == 0, (page_id(path), command, capsys.readouterr().err)


@pytest.mark.parametrize(("path", "command"), SCRIPTS, ids=[f"{page_id(p)}:{c[1]}" for p, c in SCRIPTS])
def test_every_script_in_the_docs_exists_with_its_options(path, command):
    script = ROOT / command[1]
    assert script.is_file(), (page_id(path), command)
    source = script.read_text()
    for option in (a.split("=")[0] for a in command[2:] if a.startswith("--")):
        assert f'"{option}"' in source, (page_id(path), option)


@pytest.mark.parametrize("path", [p for p in PAGES if blocks(p, "json")], ids=page_id)
def test_json_blocks_parse(path):
    for block in blocks(path, "json"):
        json.loads(block)


def test_the_cli_reference_is_what_the_command_line_generates(tmp_path):
    out = tmp_path / "cli.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_reference.py"), "--out", str(out)], check=True,
                   capture_output=True)
    assert out.read_text() == (ROOT / "docs" / "reference" / "cli.md").read_text(), \
        "docs/reference/cli.md is stale: python scripts/cli_reference.py"


def test_the_references_name_every_metric_and_environment_variable():
    from draftapprox.serve.metrics import Metrics

    http = (ROOT / "docs" / "reference" / "http.md").read_text()
    for metric in Metrics().registry.collect():
        name = metric.name + ("_total" if metric.type == "counter" else "")
        assert f"`{name}" in http, f"{name} is not in docs/reference/http.md"
    environment = (ROOT / "docs" / "reference" / "environment.md").read_text()
    variables = {v for p in (ROOT / "src").rglob("*.py") for v in re.findall(r"DRAFTAPPROX_[A-Z_]+", p.read_text())}
    assert variables and all(f"`{v}`" in environment for v in variables), variables
