"""A prompt method over a prompt made of parts, some of them protected: what every compressor door shares (the
proxy's chats, the LLMLingua-compatible compressor, LangChain's documents, LlamaIndex's nodes).

Protected parts (instructions, questions, role markers, forced tokens, reference tags) are never cut and come back
byte for byte; the budget counts only what may be cut, so a ratio of 0.25 keeps a quarter of the documents, not a
quarter of the documents and the question. The draft scores the whole prompt, protected parts included, in the
order given: put the question last, where SpecPC's window reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .errors import ConfigError, InputError
from .generation import compress_prompt, new_state
from .methods import Method, PromptMethod, SpecPC, make
from .models.loading import Pair
from .prompt_state import PromptState


def select(state: PromptState, method: PromptMethod, protected: set[int], keep: int | None = None) -> list[int]:
    """Kept positions of `state`'s prompt: every protected one, and the method's choice among the others, `method`'s
    budget counted over the others alone (a ratio of them, or a count), or `keep` of them where given; never fewer
    than the method's window of them (it cannot choose fewer).

    A method's budget counts the whole prompt, so the budget it is run with is the largest whose choice keeps no
    more cuttable tokens than asked; the scores do not depend on the budget and are computed once (`scores_for`).
    """
    n = state.n
    cuttable = n - len(protected)
    if cuttable <= 0:
        return list(range(n))
    wanted = keep if keep is not None else method.tokens(cuttable)
    # never below the method's window, as a ratio budget is not (`Method.tokens`): it cannot choose fewer
    wanted = max(wanted, min(getattr(method, "window", 0) or 0, cuttable))
    if wanted >= cuttable:
        return list(range(n))

    def kept(budget: int) -> set[int]:
        return set(compress_prompt(state, dataclasses.replace(method, budget=budget))[0].tolist())

    best: set[int] = set()
    low, high = max(1, getattr(method, "window", 1) or 1), n  # a method cannot run below its window
    while low <= high:
        middle = (low + high) // 2
        chosen = kept(middle)
        if len(chosen - protected) <= wanted:
            best, low = chosen, middle + 1
        else:
            high = middle - 1
    return sorted(best | protected)


@dataclass(frozen=True)
class Part:
    """A piece of a prompt; `protected`: kept whole."""

    text: str
    protected: bool = False


@dataclass
class CompressedParts:
    """Each part's text after compression (protected ones as they came), with each part's tokens before and
    after."""

    parts: list[Part]
    texts: list[str]
    tokens: list[int]
    kept: list[int]

    @property
    def cuttable(self) -> tuple[int, int]:
        """(tokens before, tokens kept) of the parts that could be cut: what the budget counted."""
        pairs = [(t, k) for p, t, k in zip(self.parts, self.tokens, self.kept, strict=True) if not p.protected]
        return sum(t for t, _ in pairs), sum(k for _, k in pairs)


def compress(pair: Pair, parts: list[Part], method: PromptMethod, keep: int | None = None) -> CompressedParts:
    """Compress `parts` jointly with `method` (a prompt method; its budget counts the unprotected parts only, or
    `keep` tokens of them where given).

    Each part is tokenised on its own, so its tokens are its own (a cut part decodes from its kept tokens), and
    the prompt the draft scores is their concatenation, in order.
    """
    if not parts:
        raise InputError("nothing to compress: no parts given")
    check_pair(pair, method)
    pieces = [pair.tokenizer.encode(p.text, add_special_tokens=False) for p in parts]
    ids = [t for piece in pieces for t in piece]
    if not ids:
        return CompressedParts(parts, [p.text for p in parts], [0] * len(parts), [0] * len(parts))
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + len(piece))
    protected = {i for p, a, b in zip(parts, starts[:-1], starts[1:], strict=True) if p.protected for i in range(a, b)}
    state = new_state(pair, torch.tensor([ids], dtype=torch.long), 1)
    kept = set(select(state, method, protected, keep))
    texts, counts = [], []
    for part, piece, a in zip(parts, pieces, starts[:-1], strict=True):
        chosen = [tok for i, tok in enumerate(piece) if a + i in kept]
        counts.append(len(chosen))
        whole = part.protected or len(chosen) == len(piece)
        texts.append(part.text if whole else pair.tokenizer.decode(chosen))
    return CompressedParts(parts, texts, [len(p) for p in pieces], counts)


def prompt_method(method: Method | str | None) -> PromptMethod:
    """A compressor's method: an instance or a name of `draftapprox methods` (None: SpecPC keeping a quarter)."""
    method = make(method) if isinstance(method, str) else method if method is not None else SpecPC(budget=0.25)
    if not isinstance(method, PromptMethod):
        raise ConfigError(f"{getattr(method, 'name', method)} keeps KV pairs, not prompt tokens: a compressor needs a "
                         "prompt method (specpc, targetpc, specprefill, randompc, recencypc)")
    return method


def check_pair(pair: Pair, method: PromptMethod) -> None:
    """A method that scores with the target needs one: a draft-only pair's draft stands in its place."""
    if method.needs_target and (pair.target is pair.draft):
        raise ConfigError(f"{method.name} scores with the target, and this pair holds only a draft: load the target "
                          "too, or use a draft method (specpc, specprefill)")


@dataclass
class Document:
    """One document compressed with others: its text after compression, and its tokens before and after."""

    text: str
    tokens: int
    kept: int


def compress_documents(pair: Pair, texts: list[str], method: PromptMethod,
                       question: str | None = None) -> list[Document]:
    """Documents compressed jointly under `method`'s one budget (over the documents alone), a blank line between
    them and the question, protected, last: what a retriever's compressor does."""
    pieces = []
    for text in texts:
        pieces += [Part(text), Part("\n\n", protected=True)]
    if question:
        pieces.append(Part(question, protected=True))
    out = compress(pair, pieces, method)
    return [Document(out.texts[2 * i], out.tokens[2 * i], out.kept[2 * i]) for i in range(len(texts))]
