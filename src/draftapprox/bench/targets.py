"""Targets a report checks, read from a TOML file its caller names (`--targets`): the library holds no goals of
its own. A file is one table of `name = threshold` pairs (a threshold may be a table of them, by engine or
length); a report checks the names it knows and refuses names it does not, so a typo never passes silently."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _numbers(value) -> bool:
    """A threshold, or a table of them; a list (an array of tables: goals) is the report's to check."""
    if isinstance(value, dict):
        return all(_numbers(v) for v in value.values())
    return isinstance(value, list) or (isinstance(value, int | float) and not isinstance(value, bool))


def load(path: Path | None, known: dict[str, str]) -> dict:
    """The thresholds of `path` (none without one); `known`: the names a report checks, with what each means."""
    if path is None:
        return {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"targets file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, IsADirectoryError) as error:
        raise InputError(f"{path} is not a TOML targets file: {error}") from None
    unknown = [name for name in data if name not in known]
    if unknown:
        raise InputError(f"{path}: unknown target {unknown[0]!r}; this report checks: {', '.join(known)}")
    bad = [name for name, value in data.items() if not _numbers(value)]
    if bad:
        raise InputError(f"{path}: target {bad[0]!r} must be a number (or a table of numbers), got "
                         f"{data[bad[0]]!r}")
    return data
