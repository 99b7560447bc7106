"""A long built-in example prompt: Python reference text (CPython 3.11.7's `pydoc_data`, PSF licence, shipped as
`data/example.txt.gz` so that the prompt is the same under every Python) with one planted fact and a question about
it, so that a compression that loses the fact visibly gets the answer wrong."""

from __future__ import annotations

import functools
import gzip
from importlib import resources

NEEDLE = "Note from the release team: the code name of the next interpreter release is Blue Heron 7421."
QUESTION = "What is the code name of the next interpreter release? Answer with the code name only."
ANSWER = "Blue Heron 7421"
TOPICS = ("assert", "assignment", "break", "class", "continue", "del", "exceptions", "for", "function", "global",
          "if", "import", "lambda", "nonlocal", "pass", "raise", "return", "try", "while", "with", "yield")


@functools.cache
def _reference_words() -> tuple[str, ...]:
    """The words of the topics `TOPICS`, in order (`scripts/snapshot_essay.py` wrote the snapshot)."""
    data = resources.files("draftapprox").joinpath("data/example.txt.gz").read_bytes()
    return tuple(gzip.decompress(data).decode().split(" "))


def long_prompt(words: int = 1100, depth: float = 0.4) -> str:
    """About `words` words of reference text (~1.3 tokens each) with the planted fact at relative `depth`."""
    text = _reference_words()
    if words > len(text):
        raise ValueError(f"at most {len(text)} words are available")
    body = text[:words]
    cut = int(len(body) * depth)
    document = " ".join(body[:cut]) + "\n\n" + NEEDLE + "\n\n" + " ".join(body[cut:])
    return f"Read the following document and answer the question after it.\n\n{document}\n\nQuestion: {QUESTION}"
