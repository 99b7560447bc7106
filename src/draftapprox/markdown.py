"""Generated tables inside hand-written reports: what `eval report` and `bench report` share."""

from __future__ import annotations

from pathlib import Path

START, END = "<!-- generated tables: start -->", "<!-- generated tables: end -->"


def splice(path: Path, generated: str) -> None:
    """Write the tables; in an existing report with the markers, replace only what is between them, so the
    prose written around them survives a regeneration."""
    block = f"{START}\n{generated}\n{END}\n"
    if path.exists():
        text = path.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            block = head + block + rest.split(END, 1)[1].lstrip("\n")
    path.write_text(block)


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
