"""`doctor`: what the engine chooses on this machine (kernel level, `auto`'s precision, kernel or PyTorch per
path) and why."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .common import app


@app.command("doctor")
def doctor() -> None:
    """Show what the engine runs on this machine and why: the kernels' instruction-set level, --dtype auto's
    choice, and for each path whether the compiled kernel or PyTorch runs (probing, once, what only a measurement
    settles)."""
    from ..models.doctor import report

    table = Table("what", "chosen", "why", title="draftapprox on this machine")
    for row in report():
        table.add_row(*row)
    Console(width=200).print(table)
