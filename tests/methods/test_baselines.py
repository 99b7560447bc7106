"""The paper's extra baselines: LAQ (the target as its own drafter) and SpecPrefill (chunks, original positions)."""

import torch
from transformers import DynamicCache

import draftapprox as da
from draftapprox.cache import compress_cache
from draftapprox.draft import greedy_from
from draftapprox.forward import forward
from draftapprox.generation import compress_prompt, new_state, prefill
from draftapprox.models.loading import Pair
from draftapprox.scoring import chunk_select

from ..conftest import prompt_ids
from ..reference import specprefill_positions

N = 160


def test_laq_is_speckv_with_the_targets_own_answer_from_a_snapkv_cache(pair):
    ids = prompt_ids(N)
    laq = da.LAQ(40, window=8, kernel=5, lookahead=5)
    state = new_state(pair, ids, 5)
    prefill(state, laq.rows)
    snap = da.SnapKV(40, window=8, kernel=5).select(state).keep
    own = greedy_from(pair.target, state.logits, compress_cache(state.cache, snap), N, 5, state.eos_ids,
                      compressed=True)
    laq_keep = laq.select(state).keep

    spec_state = new_state(pair, ids, 5)
    spec_state.remember_lookahead(own, 5)  # SpecKV given the target's tokens instead of the draft's
    prefill(spec_state, laq.rows)
    spec_keep = da.SpecKV(40, window=8, kernel=5, lookahead=5).select(spec_state).keep
    assert all(torch.equal(a, b) for a, b in zip(laq_keep, spec_keep, strict=True))
    assert state.cache.layers[0].keys.shape[2] == N  # the shared prefill cache is left uncompressed


def test_laq_needs_no_draft(pair):
    alone = Pair(pair.target, pair.tokenizer, None)
    result = da.generate(alone, prompt_ids(N), da.LAQ(40, window=8, kernel=5), max_new_tokens=4)
    assert result.record.kv_bytes_kept < result.record.kv_bytes_full and "self_lookahead" in result.record.timings


def test_specprefill_selection_equals_slow_reference(pair):
    ids = prompt_ids(N)
    method = da.SpecPrefill(50, lookahead=4, kernel=5, chunk=8)
    state = new_state(pair, ids, 4)
    ours = compress_prompt(state, method)[0].tolist()
    tokens = state.lookahead(4)
    assert ours == specprefill_positions(pair.draft, ids, tokens, 50, 5, 8)


def test_specprefill_feeds_kept_tokens_at_their_original_positions(qwen_pair):
    ids = prompt_ids(N)
    method = da.SpecPrefill(48, lookahead=3, kernel=5, chunk=8)
    state = new_state(qwen_pair, ids, 3)
    positions = compress_prompt(state, method)
    result = da.generate(qwen_pair, ids, method, max_new_tokens=3)
    cache = DynamicCache()
    logits = forward(qwen_pair.target, ids.gather(1, positions), cache, positions)
    first = int(logits.argmax(-1))
    assert result.tokens[0] == first and result.record.kept_tokens == 48


def test_chunk_select_keeps_whole_chunks_in_rank_order_and_cuts_to_budget():
    scores = torch.tensor([[0.0, 0, 5, 5, 1, 1, 9]])  # chunk means 0, 5, 1, 9 (last chunk of one)
    assert chunk_select(scores, 3, 2).tolist() == [[2, 3, 6]]
    assert chunk_select(scores, 4, 2).tolist() == [[2, 3, 4, 6]]
    assert chunk_select(scores, 7, 2).tolist() == [list(range(7))]
