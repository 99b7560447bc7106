"""The offline RULER generator with the target's real tokenizer: deterministic, answers really in the haystack,
lengths within 2%, and RULER's scoring rules on hand-made answers."""

import hashlib
import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

from draftapprox.errors import ConfigError
from draftapprox.eval import ruler, sources
from draftapprox.eval.metrics import bootstrap_mean_over_tasks, score
from draftapprox.models import offline


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(offline.fetch(offline.TARGET.name))


@pytest.fixture(scope="module")
def samples(tokenizer):
    return {t: ruler.generate_sample(tokenizer, t, 2048, 3) for t in ruler.TASKS}


def test_thirteen_tasks_as_the_protocol_lists():
    assert list(ruler.TASKS) == ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                 "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt",
                                 "cwe", "fwe", "qa_1", "qa_2"]


@pytest.mark.real
@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_length_within_two_percent_and_counted_on_the_rendered_prompt(tokenizer, samples, task):
    s = samples[task]
    text = ruler.render(tokenizer, s.context + s.question, s.answer_prefix)
    assert len(tokenizer(text, add_special_tokens=False).input_ids) == s.prompt_tokens
    assert 0.98 * 2048 <= s.prompt_tokens <= 2048
    assert text.startswith("<|im_start|>system") and text.endswith(s.answer_prefix.lstrip())


@pytest.mark.real
@pytest.mark.parametrize("length", [1024, 4096])
def test_other_lengths_fit_too(tokenizer, length):
    for task in ("niah_multikey_3", "vt", "cwe", "fwe", "qa_2"):
        assert 0.98 * length <= ruler.generate_sample(tokenizer, task, length, 0).prompt_tokens <= length


@pytest.mark.real
def test_generation_is_deterministic_and_samples_differ(tokenizer, samples):
    again = ruler.generate_sample(tokenizer, "niah_multikey_1", 2048, 3)
    assert again == samples["niah_multikey_1"]
    other = ruler.generate_sample(tokenizer, "niah_multikey_1", 2048, 4)
    assert other.outputs != again.outputs and other.context != again.context


@pytest.mark.real
def test_a_seed_gives_the_same_prompt_on_every_machine(samples):
    """The essay haystack is a shipped snapshot, not the running Python's documentation (3.12's differs), and the
    word lists are wonderwords 3.0.1's (2.2.0's noun list differs)."""
    text = " ".join(sources.essay_words())
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "32a3364906a7c76cbe607d9dea712d0b8d2bbab987a87063ffc8e2a15d56f9d5")
    assert samples["niah_single_2"].fingerprint == "bfe6483b36cf9d94"  # an essay task, as the CPU grid has it
    assert samples["cwe"].fingerprint == "006360c9e4188b2d"  # all three word lists


@pytest.mark.real
def test_the_answers_are_in_the_haystack(samples):
    for task in [t for t in ruler.TASKS if t.startswith(("niah", "qa"))]:
        s = samples[task]
        for value in s.outputs:
            assert value in s.context, task
        if task.startswith("niah"):
            needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", s.context)
            asked = [k for k, v in needles if v in s.outputs]
            assert all(k in s.question for k in asked) and len(asked) == len(s.outputs), task
    vt = samples["vt"]
    body = vt.context.split("Memorize and track", 2)[2]  # after the in-context example
    value = re.search(r"value (\d+)", vt.question).group(1)
    chain = {m[0]: m[1] for m in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)", body)}
    holders, frontier = set(), {value}
    while frontier:
        frontier = {k for k, v in chain.items() if v in frontier} - holders
        holders |= frontier
    assert holders == set(vt.outputs) and len(holders) == 5


@pytest.mark.real
def test_aggregation_answers_are_the_most_frequent_words(samples):
    cwe = samples["cwe"]
    main_list = cwe.context.rsplit("Below is a numbered list", 1)[1]
    counts = Counter(re.findall(r"\d+\. (\S+)", main_list))
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(cwe.outputs) and min(counts[w] for w in top) > max(
        c for w, c in counts.items() if w not in top)
    fwe = samples["fwe"]
    stream = fwe.context.split("coded words. ", 1)[1].split()
    ranked = [w for w, _ in Counter(w for w in stream if w != "...").most_common(3)]
    assert ranked == list(fwe.outputs)


@pytest.mark.real
def test_qa_needs_both_hops(samples):
    qa2 = samples["qa_2"]
    person = re.search(r"company that (.+) works for", qa2.question).group(1)
    employer = re.search(rf"{person} is a .*?has worked for (.+?) for many years", qa2.context).group(1)
    assert re.search(rf"{employer} is a \w+ company founded in \d+\. Its headquarters are in {qa2.outputs[0]},",
                     qa2.context)


def test_scorers_on_hand_made_answers():
    assert score("niah_single_1", " 1234567.", ["1234567"]) == 100
    assert score("niah_single_1", " 1234568.", ["1234567"]) == 0
    assert score("niah_multivalue", "1. 111 2. 222\n3. 333", ["111", "222", "333", "444"]) == 75
    assert score("vt", "VAR ABCDE, VAR FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"]) == 40
    assert score("cwe", "Apple banana", ["apple", "BANANA"]) == 100  # case-insensitive
    assert score("fwe", "\x00abc", ["abc", "def", "ghi"]) == pytest.approx(100 / 3)
    assert score("qa_1", "It was Paris.", ["Paris", "paris city"]) == 100  # any expected string counts
    assert score("qa_2", "London", ["Paris"]) == 0
    assert score("niah_multikey_3", "", ["a60ca667-6062-4195-a1fd-947ac4e4b4a9"]) == 0


def test_bootstrap_interval_brackets_the_mean_and_is_degenerate_without_spread():
    point, lo, hi = bootstrap_mean_over_tasks({"a": [0, 100, 100, 0, 100], "b": [100] * 5})
    assert lo <= point <= hi and point == 80 and hi - lo > 5
    assert bootstrap_mean_over_tasks({"a": [50.0] * 4}) == (50.0, 50.0, 50.0)
    # one answer in a task: no spread to resample, so no interval rather than a zero-width one
    assert bootstrap_mean_over_tasks({"a": [0.0, 100.0], "b": [100.0]}) == (75.0, None, None)


@pytest.mark.real
def test_bad_requests_are_refused(tokenizer):
    with pytest.raises(ConfigError, match="unknown RULER task"):
        ruler.generate_sample(tokenizer, "niah_single_9", 2048, 0)
    with pytest.raises(ConfigError, match="at least 256"):
        ruler.generate_sample(tokenizer, "vt", 100, 0)
