"""`models fetch` / `models list`: the offline pair."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .common import CacheOpt, app, err

models_app = typer.Typer(help="Fetch and list the offline Qwen2.5-Coder 0.5B (draft) / 1.5B (target) pair.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("fetch")
def models_fetch(
    names: Annotated[list[str] | None, typer.Argument(help="Offline model names (default: the pair).")] = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Download, verify and convert the offline models (idempotent, resumable)."""
    from ..models import offline

    for name in names or [offline.DRAFT.name, offline.TARGET.name]:
        folder = offline.model_dir(name, cache_dir)
        already = folder.exists() and offline.intact(folder) is None
        path = offline.fetch(name, cache_dir)
        err.print(f"{name}: {'already cached' if already else 'ready'} at {path}")


@models_app.command("list")
def models_list(cache_dir: CacheOpt = None) -> None:
    """Show the offline models and what is cached."""
    from ..models import offline
    from ..paths import cache_dir as root

    table = Table("model", "state", "size", "path", title=f"cache: {root(cache_dir)}")
    for row in offline.list_cached(cache_dir):
        table.add_row(row.name, row.state, f"{row.bytes / 2**30:.2f} GiB" if row.bytes else "-", str(row.path))
    Console(width=200).print(table)
