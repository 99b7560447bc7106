"""docs/reference/cli.md from the typer app itself: every command, its help, arguments and options with their
defaults. `tests/test_docs.py` checks the committed page is what this writes.

    python scripts/cli_reference.py --out docs/reference/cli.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import typer

from draftapprox.cli import app

HEAD = ("# Command-line reference\n\nGenerated from the command line's own definitions by "
        "`python scripts/cli_reference.py --out docs/reference/cli.md`; the tests fail when it is out of date. "
        "Every command also answers `--help`.\n")


def _option(param, context) -> str:
    """One option as its `--help` shows it: names and value, help, default and environment variable."""
    record = param.get_help_record(context)
    if record is None:
        return ""
    names, text = record
    return f"- `{names}`: {' '.join(text.split())}".rstrip(": ")


def _render(command, path: str, out: list[str]) -> None:
    """`command`, then its subcommands (typer's own click classes: read by their attributes)."""
    if command.callback is not None or not hasattr(command, "commands"):
        out += [f"## `{path}`", "", (command.help or "").strip().split("\n\n")[0].replace("\n", " "), ""]
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        options = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
        if arguments:
            out += ["Arguments: " + ", ".join(f"`{a.name.upper()}`" for a in arguments), ""]
        context = command.context_class(command, info_name=path.rsplit(" ", 1)[-1])
        out += [line for line in (_option(p, context) for p in options) if line]
        out.append("")
    for name in sorted(getattr(command, "commands", {})):
        sub = command.commands[name]
        if not sub.hidden:
            _render(sub, f"{path} {name}", out)


def render() -> str:
    root = typer.main.get_command(app)
    out: list[str] = [HEAD]
    _render(root, "draftapprox", out)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/reference/cli.md"))
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
