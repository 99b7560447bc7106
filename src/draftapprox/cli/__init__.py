"""The `draftapprox` command, one module per command group: generate (+ compress, methods), eval, bench, models,
serve.

User mistakes end as one line on stderr and exit code 2; only bugs keep a traceback.
"""

from __future__ import annotations

from ..errors import DraftApproxError
from . import bench, eval, generate, models, serve  # noqa: F401  (each registers its commands on `app`)
from .common import app, err


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


__all__ = ["app", "main"]
