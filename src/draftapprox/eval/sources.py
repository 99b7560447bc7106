"""Offline stand-ins for the text RULER downloads at generation time. Each is documented as a substitution.

- Essay haystack: RULER uses Paul Graham's essays (fetched from the web). We use the English prose of CPython's
  own reference documentation, `pydoc_data.topics` (PSF licence), as a snapshot shipped in `data/essay.txt.gz`
  (CPython 3.11.7's text; `scripts/snapshot_essay.py` made it). Not the running Python's copy: that text changes
  between versions, and a seed must give the same prompt on every machine.
- Word lists: RULER uses `wonderwords`' noun/adjective/verb lists; so do we (same package, same files).
- QA: RULER uses SQuAD (qa_1) and HotpotQA (qa_2), which cannot be downloaded here. We generate a *synthetic*
  fact-passage QA instead, labelled as such everywhere: qa_1 asks about one fictional entity's passage among
  distractor passages (single hop, SQuAD-like); qa_2 needs two passages (person -> employer -> city), as HotpotQA's
  bridge questions do. Fictional names keep the model from answering from memory.
"""

from __future__ import annotations

import functools
import gzip
import random
import re
from importlib import resources


@functools.cache
def essay_words() -> tuple[str, ...]:
    """The essay haystack as whitespace-separated words, in a fixed order (RULER slices a prefix of these)."""
    data = resources.files("draftapprox").joinpath("data/essay.txt.gz").read_bytes()
    return tuple(gzip.decompress(data).decode().split(" "))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentences(text: str) -> list[str]:
    """Split prose into sentences (RULER uses nltk's punkt, whose data cannot be downloaded here)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


@functools.cache
def _wordlist(name: str) -> tuple[str, ...]:
    from wonderwords.random_word import _get_words_from_text_file

    return tuple(_get_words_from_text_file(name))


def key_word(rng: random.Random) -> str:
    """A RULER needle key: a random `adjective-noun` pair (RULER draws from the sorted set of all such pairs)."""
    return f"{rng.choice(_wordlist('adjectivelist.txt'))}-{rng.choice(_wordlist('nounlist.txt'))}"


@functools.cache
def common_words(seed: int) -> tuple[str, ...]:
    """RULER's cwe vocabulary: nouns + adjectives + verbs, de-duplicated, sorted, then shuffled by the seed."""
    words = sorted(set(_wordlist("nounlist.txt") + _wordlist("adjectivelist.txt") + _wordlist("verblist.txt")))
    random.Random(seed).shuffle(words)
    return tuple(words)


_SYLLABLES = ("ka", "lo", "ven", "dra", "mi", "sor", "tel", "quin", "ba", "ru", "zen", "fa", "lor", "phe", "gri",
              "no", "vas", "til", "mar", "od", "ush", "ke", "bri", "sa", "than", "el", "yo", "cal", "dun", "ix")
_PROFESSIONS = ("architect", "botanist", "cartographer", "violinist", "glassblower", "astronomer", "novelist",
                "chemist", "sculptor", "engineer", "historian", "photographer", "linguist", "surgeon", "weaver")
_THINGS = ("a bridge of woven steel", "a catalogue of alpine mosses", "a map of the northern straits",
           "a cycle of twelve sonatas", "a blue glass chandelier", "a survey of variable stars",
           "a novel about lighthouse keepers", "a synthesis of rare dyes", "a bronze statue of a heron",
           "a tidal power station", "a history of river trade", "a series of desert portraits",
           "a dictionary of island dialects", "a method for repairing heart valves", "a tapestry of the four winds")
_INDUSTRIES = ("shipping", "textiles", "optics", "software", "ceramics", "railways", "publishing", "mining")


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _person(rng: random.Random) -> str:
    return f"{_name(rng, 2)} {_name(rng, 3)}"


def qa_example(rng: random.Random, hops: int, docs: int) -> tuple[list[str], str, list[str]]:
    """`docs` passages (gold first, then distractors), a question and its accepted answers.

    hops=1: "Where was P born?" from P's passage. hops=2: "In which city is the company that employs P
    headquartered?", which needs P's passage (employer) and the employer's passage (city).
    """
    def person_doc(person: str, city: str, employer: str) -> str:
        year, job, work = rng.randint(1901, 1999), rng.choice(_PROFESSIONS), rng.choice(_THINGS)
        return (f"{person}\n{person} is a {job} born in {city} in {year}. {person.split()[0]} is best known for "
                f"{work}, and has worked for {employer} for many years.")

    def company_doc(company: str, city: str) -> str:
        year, industry = rng.randint(1850, 1990), rng.choice(_INDUSTRIES)
        return (f"{company}\n{company} is a {industry} company founded in {year}. Its headquarters are in {city}, "
                f"where it employs several hundred people.")

    cities = iter(dict.fromkeys(_name(rng, 3) for _ in range(4 * docs + 8)))
    person, employer = _person(rng), f"{_name(rng, 2)} {rng.choice(('Works', 'Group', 'Company', 'Partners'))}"
    birth, hq = next(cities), next(cities)
    if hops == 1:
        gold = [person_doc(person, birth, employer)]
        question, answers = f"In which city was {person} born?", [birth]
    else:
        gold = [person_doc(person, birth, employer), company_doc(employer, hq)]
        question, answers = f"In which city is the headquarters of the company that {person} works for?", [hq]
    distractors = []
    while len(gold) + len(distractors) < docs:
        other = f"{_name(rng, 2)} {rng.choice(('Works', 'Group', 'Company', 'Partners'))}"
        if hops == 2 and len(distractors) % 2:
            distractors.append(company_doc(other, next(cities)))
        else:
            distractors.append(person_doc(_person(rng), next(cities), other))
    return gold + distractors, question, answers
