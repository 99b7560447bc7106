"""The `draftapprox` command, one module per command group: generate (+ compress, methods), eval, bench, models,
serve.

Whatever goes wrong ends as one line on stderr: a user's mistake (bad arguments, a bad or foreign file, a path
that cannot be written) with exit code 2; a bug with exit code 1, its traceback written to a log file that the
line names (`--debug` prints it instead).
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

import typer
from rich.markup import escape

from ..errors import DraftApproxError
from ..eval.answer_log import NotOurs
from . import bench, doctor, eval, generate, models, serve  # noqa: F401  (each registers its commands on `app`)
from .common import app, err


def _say(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def _crash_log(error: BaseException) -> Path:
    folder = Path(tempfile.gettempdir()) / "draftapprox-logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{id(error):x}.log"
    path.write_text(f"draftapprox {' '.join(sys.argv[1:])}\n\n"
                    + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    return path


def run(argv: list[str]) -> int:
    """Run the command line `argv` (without the program name); returns the exit code."""
    debug = "--debug" in argv
    args = [a for a in argv if a != "--debug"]
    try:
        code = app(args=args, prog_name="draftapprox", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        err.print("interrupted")
        return 130
    except typer.TyperException as error:  # usage: an unknown option, a bad value, a missing argument
        context = getattr(error, "ctx", None)
        if type(error).__name__ == "NoArgsIsHelpError" and context is not None:
            print(context.get_help())
            return 0
        command = context.command_path if context is not None else "draftapprox"
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        _say(f"{message} (see `{command} --help`)".replace("\n", " "))
        return getattr(error, "exit_code", 2) or 2
    except (DraftApproxError, NotOurs) as error:
        _say(str(error).replace("\n", " "))
        return 2
    except OSError as error:  # the environment refused: a missing, unwritable or occupied path
        if debug:
            raise
        where = f": {error.filename}" if error.filename else ""
        _say(f"{error.strerror or type(error).__name__}{where}")
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as error:
        if debug:
            raise
        _say(f"internal error, a bug: {type(error).__name__}: {str(error)[:300]!s}; the traceback is in "
             f"{_crash_log(error)} (rerun with --debug to print it)".replace("\n", " "))
        return 1


def main() -> None:
    """Entry point."""
    raise SystemExit(run(sys.argv[1:]))


__all__ = ["app", "main", "run"]
