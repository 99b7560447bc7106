"""Generated tables inside hand-written reports: what `eval report` and `bench report` share."""

from __future__ import annotations

from pathlib import Path

from .safe_write import replace_generated

START, END = "<!-- generated tables: start -->", "<!-- generated tables: end -->"


def is_report(text: str, markers: tuple[str, str] = (START, END)) -> bool:
    """Whether `text` is a report of ours: it holds the generated-tables markers (or the `markers` given)."""
    return markers[0] in text and markers[1] in text


def splice(path: Path, generated: str, markers: tuple[str, str] = (START, END)) -> None:
    """Write the tables; in an existing report, replace only what is between the markers, so the prose written
    around them survives a regeneration. A file without the markers is not ours and is refused, untouched.
    `markers`: another pair, for a page that holds more than one generated block (the README)."""
    start, end = markers
    block = f"{start}\n{generated}\n{end}\n"
    if path.is_file():
        text = path.read_text(errors="replace")
        if is_report(text, markers):
            head, rest = text.split(start, 1)
            block = head + block + rest.split(end, 1)[1].lstrip("\n")
    replace_generated(path, block, lambda text: is_report(text, markers))


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, first column left-aligned, the others right-aligned."""
    align = [":--"] + ["--:"] * (len(header) - 1)
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def publish(path: Path, intro: list[str], command: str | None, body: list[str]) -> Path:
    """Splice a measurement's page: what was measured (`intro`), the command that measured it, then `body`."""
    lines = [*intro, *([f"Command: `{command}`", ""] if command else []), *body]
    path.parent.mkdir(parents=True, exist_ok=True)
    splice(path, "\n".join(lines))
    return path
