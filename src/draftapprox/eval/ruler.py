"""A seeded, offline generator of RULER's 13 synthetic tasks (Hsieh et al., 2024), built with the target's tokenizer.

Templates, answer prefixes, needle formats, haystack kinds and counts follow RULER's `constants.py`, `synthetic.yaml`
and task scripts (niah, variable_tracking, common/freq words, qa); the text sources RULER downloads are replaced as
documented in `sources.py`. A sample is split as kvpress splits RULER (`context`, `question`, `answer_prefix`), so
query-agnostic peers can compress the context alone. The prompt a model sees is the target's chat template around
`context + question`, followed by the answer prefix (`render`); its token count is fitted to the requested length:
the largest haystack whose prompt has at most `length` tokens, and never fewer than 98% of it.
"""

from __future__ import annotations

import hashlib
import math
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from . import sources

NIAH_TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_v} afterwards.\n{context}\n")
NIAH_QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT_TEMPLATE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n")
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\n")
FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n{context}\n\n")
QA_QUESTION = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nQuestion: {query}")
QA_PREFIX = " Answer:"
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.linspace(0, 100, 40) rounded


@dataclass(frozen=True)
class Task:
    """One RULER task: its generator kind and arguments, its answer length, and how it is scored and stopped."""

    name: str
    kind: str
    args: dict
    max_new_tokens: int  # the reference implementation's values (niah 128, vt 64, cwe 120, fwe 64, qa 64)
    metric: str  # "all": fraction of expected strings present; "part": any of them (QA)
    single_line: bool  # the answer fits on one line, so decoding may stop at a newline

    @property
    def stop(self) -> list[str] | None:
        return ["\n"] if self.single_line else None


def _niah(name, haystack, key, value, k=1, v=1, q=1) -> Task:
    args = dict(haystack=haystack, key=key, value=value, num_k=max(k, q), num_v=v, num_q=q)
    return Task(name, "niah", args, 128, "all", single_line=v * q == 1)


TASKS: dict[str, Task] = {t.name: t for t in (
    _niah("niah_single_1", "noise", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", k=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    _niah("niah_multivalue", "essay", "words", "numbers", v=4),
    _niah("niah_multiquery", "essay", "words", "numbers", q=4),
    Task("vt", "vt", dict(num_chains=1, num_hops=4), 64, "all", single_line=False),  # a list may wrap
    Task("cwe", "cwe", dict(num_cw=10), 120, "all", single_line=False),
    Task("fwe", "fwe", dict(alpha=2.0, coded_wordlen=6), 64, "all", single_line=False),
    Task("qa_1", "qa", dict(hops=1), 64, "part", single_line=True),
    Task("qa_2", "qa", dict(hops=2), 64, "part", single_line=True),
)}


# The protocol's split of the sample indices (docs/guides/evaluation.md): every idea is tried and every knob
# chosen on the development samples; the test samples are answered once per final candidate and never used to choose.
SPLITS = {"dev": range(0, 5), "test": range(5, 10)}


def split_of(index: int) -> str:
    """The split a sample index belongs to: `dev`, `test`, or `beyond` (indices past the protocol's ten)."""
    return next((name for name, indices in SPLITS.items() if index in indices), "beyond")


def sample_id(task: str, length: int, seed: int, index: int) -> str:
    """A sample's name in answer files, known before (and without) generating it."""
    return f"{task}/{length}/{seed}/{index}"


@dataclass(frozen=True)
class Sample:
    """One generated prompt and its expected answers; `prompt_tokens` counts the rendered prompt (`render`)."""

    task: str
    index: int
    length: int
    seed: int
    context: str
    question: str
    answer_prefix: str
    outputs: tuple[str, ...]
    max_new_tokens: int
    prompt_tokens: int

    @property
    def id(self) -> str:
        return sample_id(self.task, self.length, self.seed, self.index)

    @property
    def fingerprint(self) -> str:
        """A short hash of what the model reads and the scorer expects: every answer to a sample id must come
        from the same prompt, and the id alone cannot tell (another haystack or word list gives another one)."""
        text = "\x00".join((self.context, self.question, self.answer_prefix, *self.outputs))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def render(tokenizer, user: str, answer_prefix: str) -> str:
    """The prompt text: the chat template around the user turn, then the answer prefix opening the reply."""
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        return head + answer_prefix.lstrip()
    return user + answer_prefix


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt: the chat template already holds the special tokens, if there is one."""
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenize(tokenizer, text))


def encode(tokenizer, user: str, answer_prefix: str) -> torch.Tensor:
    """The ids `(1, n)` a model is fed for a user turn and an answer prefix (`render`, then `tokenize`)."""
    return torch.tensor([tokenize(tokenizer, render(tokenizer, user, answer_prefix))])


# --- task builders: (rng, size) -> (context, question, answer_prefix, outputs) --------------------------------------

def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return sources.key_word(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _insert_at_depths(rng: random.Random, sents: list[str], inserts: list[str]) -> str:
    """RULER's essay insertion: each insert goes at a sentence boundary at a depth drawn from DEPTHS."""
    cuts = [0, *sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(inserts))), len(sents)]
    parts = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(inserts):
            parts.append(inserts[i - 1])
    return " ".join(p for p in parts if p)


def _essay(size: int) -> list[str]:
    words = sources.essay_words()
    words = (words * (size // len(words) + 1))[:size]
    return sources.sentences(" ".join(words))


def build_niah(rng: random.Random, size: int, haystack: str, key: str, value: str, num_k: int, num_v: int,
               num_q: int) -> tuple[str, str, str, list[str]]:
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random_value(rng, key))
        values.append([_random_value(rng, value) for _ in range(num_v)])
        needles += [NEEDLE.format(type_v=value, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if haystack == "essay":
        context = _insert_at_depths(rng, _essay(size), needles)
    else:
        if haystack == "noise":
            lines = [NOISE] * size
        else:
            lines = [NEEDLE.format(type_v=value, key=_random_value(rng, key), value=_random_value(rng, value))
                     for _ in range(size)]
        for index, needle in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles, strict=True):
            lines.insert(index, needle)
        context = "\n".join(lines)
    asked = rng.sample(range(num_k), num_q)
    queries = [keys[i] for i in asked]
    outputs = [v for i in asked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    parts = [NIAH_TEMPLATE, NIAH_QUESTION, NIAH_PREFIX]
    type_v = value
    if num_q * num_v == 1:  # RULER's singular rewrite of the whole template
        parts = [p.replace("Some", "A").replace("are all", "is").replace("are", "is") for p in parts]
        type_v = value[:-1]
    head, question, prefix = (p.format(type_v=type_v, context=context, query=query) for p in parts)
    return head, question, prefix, outputs


def _vt_chain(rng: random.Random, hops: int, letters: int, value: str) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, chain


def _vt_text(rng: random.Random, noises: int, hops: int, letters: int, value: str) -> tuple[str, str, str, list[str]]:
    names, chain = _vt_chain(rng, hops, letters, value)
    lines = [NOISE] * noises
    for offset, index in enumerate(sorted(rng.sample(range(noises), len(chain)))):
        lines.insert(index + offset, chain[offset])
    context = "\n".join(lines).replace(". \n", ".\n")
    return (VT_TEMPLATE.format(context=context), VT_QUESTION.format(query=value),
            VT_PREFIX.format(num_v=hops + 1, query=value), names)


def build_vt(rng: random.Random, size: int, num_chains: int, num_hops: int,
             icl_tokens: Callable[[str], int] | None = None, icl_budget: int = 500,
             memo: dict | None = None) -> tuple[str, str, str, list[str]]:
    """RULER's variable tracking with its one in-context example (3-letter names, noise fitted to ~500 tokens).

    `memo` keeps the example's fitted noise count across the haystack-size search (it does not depend on it)."""
    if num_chains != 1:
        raise ConfigError("only one variable chain is supported")
    icl_seed = rng.getrandbits(32)

    def example(noises: int) -> str:
        r = random.Random(icl_seed)
        head, question, prefix, names = _vt_text(r, noises, num_hops, 3, str(r.randint(10000, 99999)))
        return head + question + prefix + " ".join(names) + "\n"

    memo = {} if memo is None else memo
    if icl_seed not in memo:
        noises = 5
        while icl_tokens is not None and noises < 200 and icl_tokens(example(noises + 5)) <= icl_budget:
            noises += 5
        memo[icl_seed] = noises
    noises = memo[icl_seed]
    head, question, prefix, names = _vt_text(rng, size, num_hops, 5, str(rng.randint(10000, 99999)))
    return example(noises) + "\n" + head, question, prefix, names


def build_cwe(rng: random.Random, size: int, num_cw: int, long: bool) -> tuple[str, str, str, list[str]]:
    """Common words: `num_cw` words repeated often among words repeated rarely, plus one solved example."""
    words = sources.common_words(0)
    repeats = (30, 3) if long else (6, 1)
    example_repeats = (10, 3) if long else (3, 1)

    def word_list(count: int, common: int, uncommon: int) -> tuple[str, list[str]]:
        chosen = rng.sample(words, count)
        items = chosen[:num_cw] * common + chosen[num_cw:] * uncommon
        rng.shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), chosen[:num_cw]

    ex_context, ex_answer = word_list(40 if long else 20, *example_repeats)
    shot = (CWE_TEMPLATE.format(context=ex_context) + CWE_QUESTION + CWE_PREFIX + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer)))
    context, answer = word_list(min(size, len(words)), *repeats)
    return shot + "\n" + CWE_TEMPLATE.format(context=context), CWE_QUESTION, CWE_PREFIX, answer


def _zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann zeta for alpha > 1: a partial sum plus the integral of the tail (scipy is not a dependency)."""
    return math.fsum(k ** -alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1)


def build_fwe(rng: random.Random, size: int, alpha: float, coded_wordlen: int, vocab_size: int
              ) -> tuple[str, str, str, list[str]]:
    """Frequent words: coded words drawn with Zipf(alpha) counts; the top word is '...' noise, answer ranks 2-4."""
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."
    z = _zeta(alpha)
    stream = [w for k, w in enumerate(ranked, start=1) for _ in range(int(size * k ** -alpha / z))]
    rng.shuffle(stream)
    return FWE_TEMPLATE.format(context=" ".join(stream)), FWE_QUESTION, FWE_PREFIX, ranked[1:4]


def build_qa(rng: random.Random, size: int, hops: int) -> tuple[str, str, str, list[str]]:
    docs, question, answers = sources.qa_example(rng, hops, max(size, hops + 1))
    rng.shuffle(docs)
    context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
    return QA_TEMPLATE.format(context=context), QA_QUESTION.format(query=question), QA_PREFIX, answers


# --- fitting to a length ---------------------------------------------------------------------------------------------

def _builder(task: Task, length: int, tokens: Callable[[str], int]) -> Callable[[random.Random, int], tuple]:
    a = task.args
    if task.kind == "niah":
        return lambda rng, size: build_niah(rng, size, **a)
    if task.kind == "vt":
        memo: dict = {}
        return lambda rng, size: build_vt(rng, size, a["num_chains"], a["num_hops"], tokens,
                                          min(500, length // 4), memo)
    if task.kind == "cwe":
        return lambda rng, size: build_cwe(rng, size, a["num_cw"], long=length >= 4096)
    if task.kind == "fwe":
        vocab = max(8, (length - task.max_new_tokens) // 50)  # RULER: max_seq_length // 50
        return lambda rng, size: build_fwe(rng, size, a["alpha"], a["coded_wordlen"], vocab)
    return lambda rng, size: build_qa(rng, size, a["hops"])


def generate_sample(tokenizer, task: str, length: int, index: int, seed: int = 42) -> Sample:
    """Sample `index` of `task` at `length` prompt tokens; the same arguments always give the same sample."""
    spec = TASKS.get(task)
    if spec is None:
        raise ConfigError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    if length < 256:
        raise ConfigError(f"length must be at least 256 tokens, got {length}")

    def tokens(text: str) -> int:
        return count_tokens(tokenizer, text)

    build = _builder(spec, length, tokens)

    def attempt(variant: int, size: int) -> tuple[tuple, int]:
        parts = build(random.Random(f"{seed}/{task}/{length}/{index}/{variant}"), size)
        return parts, tokens(render(tokenizer, parts[0] + parts[1], parts[2]))

    for variant in range(32):  # a coarse haystack unit (a needle line, a document) can overshoot 2%: redraw
        low, high = 8, 16  # 8: room for every task's needles, chain, or documents
        while attempt(variant, high)[1] <= length:  # exponential search for an upper bound, then bisect
            low, high = high, high * 2
            if high > 50 * length:
                break
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if attempt(variant, mid)[1] <= length else (low, mid)
        parts, count = attempt(variant, low)
        if 0.98 * length <= count <= length:
            break
    else:
        raise ConfigError(f"{task}: cannot fit {length} tokens within 2% with this tokenizer (closest: {count})")
    context, question, prefix, outputs = parts
    return Sample(task, index, length, seed, context, question, prefix, tuple(outputs), spec.max_new_tokens, count)


def generate(tokenizer, tasks: list[str], length: int, samples: int, seed: int = 42) -> list[Sample]:
    return [generate_sample(tokenizer, t, length, i, seed) for t in tasks for i in range(samples)]
