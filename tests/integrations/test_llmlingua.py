"""The LLMLingua-compatible compressor: llmlingua 0.2.2's call shapes (its README's, LangChain's and LlamaIndex's
call sites) give its result keys and its budget arithmetic, with the instruction and question kept whole; what it
cannot honour is refused by name; on the real pair the planted fact survives a quarter of the prompt."""

from __future__ import annotations

import pytest

import draftapprox as da
from draftapprox.integrations.llmlingua import PromptCompressor
from tests.conftest import prompt_ids

KEYS = {"compressed_prompt", "compressed_prompt_list", "origin_tokens", "compressed_tokens", "ratio", "rate",
        "saving", "draftapprox"}


def words(n: int, seed: int) -> str:
    return " ".join(f"w{int(i)}" for i in prompt_ids(n, seed=seed)[0])


@pytest.fixture
def compressor(qwen_pair):
    return PromptCompressor(pair=qwen_pair, method=da.SpecPC(window=8, kernel=5, start_layer=1))


def test_llmlinguas_readme_call_keeps_the_target_token_count(compressor):
    prompt = words(300, 1)
    out = compressor.compress_prompt(prompt, instruction="", question="", target_token=60)
    assert set(out) == KEYS and out["origin_tokens"] == 300
    assert 52 <= out["compressed_tokens"] <= 60 and out["draftapprox"]["kept_context_tokens"] <= 60
    assert set(out["compressed_prompt"].split()) <= set(prompt.split())
    assert out["ratio"] == f"{300 / out['compressed_tokens']:.1f}x"


def test_positional_calls_and_llmlinguas_rate_arithmetic(compressor):
    """rate counts the whole prompt; the context's budget is that less the instruction and the question, which come
    back whole, instruction first and question last."""
    contexts, instruction, question = [words(100, 2), words(140, 3)], words(20, 4), words(10, 5)
    out = compressor.compress_prompt(contexts, instruction, question, 0.5)  # positional, as llmlingua allows
    budget = int((20 + 10 + 240) * 0.5 - 20 - 10)
    assert out["draftapprox"]["context_budget_tokens"] == budget
    assert budget - 8 <= out["draftapprox"]["kept_context_tokens"] <= budget
    assert out["compressed_prompt"].startswith(instruction + "\n\n")
    assert out["compressed_prompt"].endswith("\n\n" + question)
    assert len(out["compressed_prompt_list"]) == 2
    assert out["compressed_prompt"] == "\n\n".join([instruction, *out["compressed_prompt_list"], question])


def test_langchain_and_llama_index_call_sites(compressor):
    """LangChain's LLMLinguaCompressor and LlamaIndex's LongLLMLinguaPostprocessor pass LongLLMLingua's ranker
    settings; they are accepted and reported as not applied (the draft ranks), and the budget holds."""
    contexts, question = [words(120, 6), words(80, 7)], words(12, 8)
    out = compressor.compress_prompt(contexts, instruction="", question=question, rate=0.5,
                                     rank_method="longllmlingua", condition_in_question="after_condition",
                                     reorder_context="sort", dynamic_context_compression_ratio=0.3,
                                     condition_compare=True, context_budget="+100", concate_question=False)
    assert out["draftapprox"]["not_applied"] == {
        "rank_method": "longllmlingua", "condition_in_question": "after_condition",
        "dynamic_context_compression_ratio": 0.3, "condition_compare": True}
    assert question not in out["compressed_prompt"]  # concate_question=False
    origins = [next(i for i, c in enumerate(contexts) if set(t.split()) <= set(c.split()))
               for t in out["compressed_prompt_list"]]
    shares = [len(t.split()) / (120, 80)[i] for t, i in zip(out["compressed_prompt_list"], origins, strict=True)]
    assert sorted(origins) == [0, 1] and shares == sorted(shares, reverse=True)  # sort: most kept first


def test_forced_contexts_and_tokens_are_kept_whole(compressor):
    contexts = [words(100, 9), words(100, 10), "w1 w2 MARK w3 " + words(100, 11)]
    out = compressor.compress_prompt(contexts, question=words(8, 12), rate=0.3, force_context_ids=[1],
                                     force_tokens=["MARK"])
    assert out["compressed_prompt_list"][1] == contexts[1]
    assert "MARK" in out["compressed_prompt_list"][-1]


@pytest.mark.parametrize(("call", "name"), [
    (lambda c: c.compress_prompt("w1 w2", use_sentence_level_filter=True), "use_sentence_level_filter"),
    (lambda c: c.compress_prompt("w1 w2", context_segs=["w1"]), "context_segs"),
    (lambda c: c.compress_prompt("w1 w2", rate=1.5), "rate"),
    (lambda c: c.compress_prompt("w1 w2", reorder_context="random"), "reorder_context"),
    (lambda c: c.compress_prompt(["w1"], force_context_ids=[3]), "force_context_ids"),
    (lambda c: c.structured_compress_prompt("<llmlingua>w1</llmlingua>"), "structured_compress_prompt"),
    (lambda c: c.recover("w1", "w1", "w1"), "recover"),
])
def test_what_is_not_implemented_is_refused_by_name(compressor, call, name):
    with pytest.raises(da.ConfigError, match=name):
        call(compressor)


def test_constructor_refusals(qwen_pair):
    with pytest.raises(da.ConfigError, match="use_llmlingua2"):
        PromptCompressor(use_llmlingua2=True, pair=qwen_pair)
    with pytest.raises(da.ConfigError, match="prompt method"):
        PromptCompressor(pair=qwen_pair, method="snapkv")
    with pytest.raises(da.ConfigError, match="revision"):
        PromptCompressor(model_config={"revision": "main"}, method="recencypc")


@pytest.mark.real
def test_the_planted_fact_survives_a_quarter_on_the_real_draft():
    from draftapprox.examples import ANSWER, NEEDLE, QUESTION, long_prompt

    compressor = PromptCompressor(device_map="cpu")  # model_name: the offline draft
    document = long_prompt().split("\n\nQuestion:")[0]
    out = compressor.compress_prompt([document], instruction="", question=QUESTION, rate=0.25)
    assert ANSWER in out["compressed_prompt"] and out["compressed_prompt"].endswith(QUESTION)
    assert out["compressed_tokens"] < 0.3 * out["origin_tokens"]
    assert NEEDLE not in document or "Blue Heron" in out["compressed_prompt_list"][0]


def test_a_budget_below_the_window_keeps_the_window_not_nothing(qwen_pair):
    """llmlingua's arithmetic can ask for fewer context tokens than SpecPC's window: the window is kept, as a ratio
    budget keeps it, rather than an empty prompt."""
    compressor = PromptCompressor(pair=qwen_pair, method=da.SpecPC(start_layer=1))  # the reference window, 64
    out = compressor.compress_prompt(words(100, 13), rate=0.3, drop_consecutive=True)
    assert out["draftapprox"]["kept_context_tokens"] == 64 and out["compressed_prompt"]
    assert out["draftapprox"]["not_applied"] == {"drop_consecutive": True}  # LLMLingua-2's, ignored by v1 too


def test_a_target_method_needs_a_target(qwen_pair):
    from draftapprox.models.loading import Pair

    draft_only = Pair(qwen_pair.draft, qwen_pair.tokenizer, qwen_pair.draft)
    with pytest.raises(da.ConfigError, match="only a draft"):
        PromptCompressor(pair=draft_only, method="targetpc").compress_prompt(words(100, 14), rate=0.5)
