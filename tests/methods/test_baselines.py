"""The paper's extra baselines: LAQ (the target as its own drafter) and SpecPrefill (chunks, original positions)."""

import torch
from transformers import DynamicCache

import draftapprox as da
from draftapprox.forward import forward
from draftapprox.generation import compress_prompt, new_state, prefill
from draftapprox.models.loading import Pair
from draftapprox.scoring import chunk_select

from ..conftest import prompt_ids
from ..reference import masked_greedy, snapkv_keep, speckv_keep, specprefill_positions

N = 160


def test_laq_selection_equals_slow_reference(pair):
    """From the spec: the target decodes its own answer from a SnapKV-compressed cache (an eager forward whose new
    tokens see only the kept prompt keys of each head), and that answer is SpecKV's lookahead on the full cache."""
    ids = prompt_ids(N)
    laq = da.LAQ(40, window=8, kernel=5, lookahead=5)
    state = new_state(pair, ids, 5)
    prefill(state, laq.rows)
    keep = laq.select(state).keep
    own = masked_greedy(pair.target, ids, snapkv_keep(pair.target, ids, 40, 8, 5), 5)
    slow = speckv_keep(pair.target, ids, own, 40, 8, 5)
    assert [[set(layer[0, g].nonzero().flatten().tolist()) for g in range(layer.shape[1])] for layer in keep] == slow
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
