"""The compression primitive every compressor door shares: protected parts come back byte for byte, the budget
counts only what may be cut, and the kept tokens are the method's choice."""

from __future__ import annotations

import pytest
import torch

import draftapprox as da
from draftapprox import parts
from draftapprox.generation import new_state
from tests.conftest import prompt_ids


def words(ids: torch.Tensor) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


@pytest.mark.parametrize("budget", [0.25, 0.5, 40])
def test_protected_parts_stay_whole_and_the_budget_counts_only_the_rest(qwen_pair, budget):
    question = parts.Part(words(prompt_ids(12, seed=9)[0]), protected=True)
    instruction = parts.Part(words(prompt_ids(20, seed=8)[0]), protected=True)
    documents = [parts.Part(words(prompt_ids(n, seed=s)[0])) for n, s in ((90, 1), (60, 2), (110, 3))]
    method = da.SpecPC(budget=budget, window=8, kernel=5, start_layer=1)
    out = parts.compress(qwen_pair, [instruction, *documents, question], method)
    assert out.texts[0] == instruction.text and out.texts[-1] == question.text
    before, kept = out.cuttable
    assert before == 260
    wanted = int(budget * 260) if isinstance(budget, float) else budget
    assert wanted - 8 <= kept <= wanted  # held, short at most by the neighbours' granularity
    for part, text, count in zip(out.parts[1:-1], out.texts[1:-1], out.kept[1:-1], strict=True):
        assert len(text.split()) == count and set(text.split()) <= set(part.text.split())


def test_the_kept_tokens_are_the_methods_choice_on_the_joint_prompt(qwen_pair):
    """With nothing protected, the primitive keeps what the method keeps on the concatenated prompt."""
    documents = [parts.Part(words(prompt_ids(n, seed=s)[0])) for n, s in ((90, 1), (70, 2))]
    method = da.SpecPC(budget=40, window=8, kernel=5, start_layer=1)
    out = parts.compress(qwen_pair, documents, method)
    ids = torch.cat([prompt_ids(90, seed=1), prompt_ids(70, seed=2)], dim=1)
    chosen = method.select(new_state(qwen_pair, ids, 1))[0].tolist()
    assert out.texts == [words(ids[0, [p for p in chosen if p < 90]]), words(ids[0, [p for p in chosen if p >= 90]])]
    assert sum(out.kept) == len(chosen) == 40


def test_nothing_to_cut_and_nothing_given():
    pair = None
    with pytest.raises(da.InputError, match="no parts"):
        parts.compress(pair, [], da.SpecPC())
