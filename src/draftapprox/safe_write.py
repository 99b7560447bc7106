"""Writing results without ever losing a user's file: whole files are written to a temporary sibling and renamed
into place (a kill leaves the old file or the new one, never half of one), and a file that exists is replaced only
when it is evidently one we generated."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import InputError


def check_writable_folder(folder: Path, what: str) -> None:
    """`folder` exists as a folder or can be made one (no file in the way), before any work starts."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{what} {folder} cannot be a folder: {parent} is a file")
            if not os.access(parent, os.W_OK):
                raise InputError(f"{what} {folder} is not writable ({parent} is read-only)")
            return


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_generated(path: Path, data: str, ours: Callable[[str], bool], what: str = "report") -> Path:
    """Write `data` over `path` only if `path` is absent or `ours` recognises its text as one we generated."""
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a {what}; choose another output")
    if path.exists():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            text = None
        if text is None or (text.strip() and not ours(text)):
            raise InputError(f"{path} exists and is not a {what} we generated; move it away or choose another "
                             "output (it was left untouched)")
    return write_atomic(path, data)


def save_figure(fig, path: Path, **options) -> Path:
    """A matplotlib figure saved atomically (the format from the file name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, **options)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
