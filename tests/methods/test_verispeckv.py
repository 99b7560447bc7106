"""VeriSpecKV against the slow recomputation of tests/reference.py: which draft tokens the target accepts, the
tokens it writes instead, and the hedged selection built on them."""

import pytest
import torch

import draftapprox as da
from draftapprox.errors import ConfigError
from draftapprox.generation import new_state, prefill
from draftapprox.methods import make

from ..conftest import prompt_ids
from ..reference import hedged_keep, speckv_keep, union_keep, verified_lookahead

N, L = 160, 6
SPECKV = {"window": 8, "kernel": 5, "lookahead": L}
# the verification alone (uniform allocation, one answer), which the slow references of SpecKV's selection check
SMALL = {**SPECKV, "allocation": "uniform", "union": False}


def _kept(keep: list[torch.Tensor]) -> list[list[set[int]]]:
    return [[set(layer[0, g].nonzero().flatten().tolist()) for g in range(layer.shape[1])] for layer in keep]


def _target_greedy(pair, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        return pair.target.generate(ids, max_new_tokens=steps, do_sample=False)[:, ids.shape[1]:]


def _state_with_draft(pair, ids: torch.Tensor, draft_tokens: torch.Tensor | None, rows: int):
    """A prompt's shared state; `draft_tokens` stand for the draft's answer when given (what the target then
    checks), else the draft writes it."""
    state = new_state(pair, ids, L)
    if draft_tokens is not None:
        state.remember_lookahead(draft_tokens, L, [0.5] * draft_tokens.shape[1])
    prefill(state, rows)
    return state


@pytest.mark.parametrize("agree", [0, 3, L])
def test_the_lookahead_is_the_draft_up_to_its_first_rejected_token_then_the_targets(pair, agree):
    ids = prompt_ids(N)
    mine = _target_greedy(pair, ids, L)
    # the draft agrees with the target on its first `agree` tokens, then writes something else
    draft = mine.clone()
    draft[0, agree:] = (mine[0, agree:] + 1) % pair.target.config.vocab_size
    method = make("verispeckv", 40, redraft=0, correct=3, **SMALL)
    state = _state_with_draft(pair, ids, draft, method.rows)
    look = method.verified(state, L)
    tokens, accepted = verified_lookahead(pair.target, ids, draft, correct=3, eos=state.eos_ids)
    assert (look.accepted, look.drafted) == (accepted, L) == (agree, L)
    assert look.rows == tokens.shape[1] and torch.equal(tokens[:, :agree], draft[:, :agree])
    assert look.rows <= (L if agree == L else agree + 3)
    assert state.cache.layers[0].keys.shape[2] == N  # the shared cache is left as it was found
    assert _kept(method.select(state).keep) == speckv_keep(pair.target, ids, tokens, 40, 8, 5)


@pytest.mark.parametrize("agree", [2, L])
def test_union_scores_the_prompt_by_the_verified_lookahead_and_the_drafts_whole_answer(pair, agree):
    ids = prompt_ids(N)
    mine = _target_greedy(pair, ids, L)
    draft = mine.clone()
    draft[0, agree:] = (mine[0, agree:] + 1) % pair.target.config.vocab_size
    method = make("verispeckv", 40, redraft=0, correct=3, **{**SMALL, "union": True})
    state = _state_with_draft(pair, ids, draft, method.rows)
    tokens, _ = verified_lookahead(pair.target, ids, draft, correct=3, eos=state.eos_ids)
    keep = _kept(method.select(state).keep)
    assert keep == union_keep(pair.target, ids, [tokens, draft], 40, 8, 5)
    # nothing rejected: the draft's answer is the verified one, and union changes nothing
    assert (keep == speckv_keep(pair.target, ids, draft, 40, 8, 5)) == (agree == L)


@pytest.mark.parametrize(("redraft", "given"), [(1, False), (2, False), (1, True), (2, True)])
def test_the_draft_rewrites_its_answer_from_the_targets_token_and_the_target_checks_it_again(pair, redraft, given):
    """With the draft's own answer the rewrite continues the cache its lookahead left; with a given answer (no
    such cache: agreeing with the target on its first token only) the draft prefills prompt and accepted tokens."""
    ids = prompt_ids(N)
    method = make("verispeckv", 40, redraft=redraft, correct=2, **SMALL)
    draft = None
    if given:
        mine = _target_greedy(pair, ids, L)
        draft = mine.clone()
        draft[0, 1:] = (mine[0, 1:] + 1) % pair.target.config.vocab_size
    state = _state_with_draft(pair, ids, draft, method.rows)
    answer = state.lookahead(L)
    assert (state.draft_cache is None) == given
    look = method.verified(state, L)
    tokens, accepted = verified_lookahead(pair.target, ids, answer, correct=2, eos=state.eos_ids, draft=pair.draft,
                                          redraft=redraft)
    assert (look.accepted, look.rows) == (accepted, tokens.shape[1])
    assert accepted == 1 if given else True
    assert state.cache.layers[0].keys.shape[2] == N
    assert _kept(method.select(state).keep) == speckv_keep(pair.target, ids, tokens, 40, 8, 5)


@pytest.mark.parametrize(("share", "normalize"), [(0.5, "none"), (0.0, "mass"), (0.25, "rank"), (1.0, "none")])
def test_hedged_selection_equals_slow_reference(pair, share, normalize):
    ids = prompt_ids(N)
    method = make("verispeckv", 40, redraft=0, correct=2, share=share, normalize=normalize, **SMALL)
    state = _state_with_draft(pair, ids, None, method.rows)
    keep = _kept(method.select(state).keep)
    tokens, _ = verified_lookahead(pair.target, ids, state.lookahead(L), correct=2, eos=state.eos_ids)
    assert keep == hedged_keep(pair.target, ids, tokens, 40, 8, 5, share, normalize)


def test_without_verification_it_is_speckv(qwen_pair):
    ids = prompt_ids(N)
    state = _state_with_draft(qwen_pair, ids, None, 9)
    plain = make("verispeckv", 40, verify=False, redraft=0, correct=0, **SMALL).select(state).keep
    assert all(torch.equal(a, b) for a, b in zip(plain, da.SpecKV(40, **SPECKV).select(state).keep, strict=True))


def test_the_gates_lean_on_the_prompt_as_the_draft_is_doubted(qwen_pair):
    ids = prompt_ids(N)
    mine = _target_greedy(qwen_pair, ids, L)
    draft = mine.clone()
    draft[0, 2:] = (mine[0, 2:] + 1) % qwen_pair.target.config.vocab_size  # the target rejects 4 of 6 tokens
    state = _state_with_draft(qwen_pair, ids, draft, 9)
    look = make("verispeckv", 40, **SMALL).verified(state, L)
    assert look.agreement == pytest.approx(2 / 6)
    gated = make("verispeckv", 40, share=0.6, gate="agreement", **SMALL)
    assert gated.share_of(state, look, L) == pytest.approx(0.6 * 4 / 6)
    doubted = make("verispeckv", 40, share=0.6, gate="margin", **SMALL)
    assert doubted.share_of(state, look, L) == pytest.approx(0.6 * 0.5)  # margins of 0.5 were given


def test_the_drafts_margins_are_its_top_two_probabilities_apart(qwen_pair):
    ids = prompt_ids(N)
    state = new_state(qwen_pair, ids, L)
    tokens = state.lookahead(L)
    with torch.no_grad():
        out = qwen_pair.draft.generate(ids, max_new_tokens=tokens.shape[1], do_sample=False, output_scores=True,
                                       return_dict_in_generate=True)
    expected = [float(p[0] - p[1]) for p in (s[0].float().softmax(-1).topk(2).values for s in out.scores)]
    assert state.lookahead_margins(L).tolist() == pytest.approx(expected, abs=1e-4)


def test_one_verification_serves_every_budget_and_hedge(qwen_pair):
    ids = prompt_ids(N)
    state = new_state(qwen_pair, ids, L)
    da.generate(qwen_pair, ids, make("verispeckv", 40, **SMALL), max_new_tokens=L, state=state)
    spent = state.timings.seconds["target_lookahead"]
    for knobs in ({"share": 0.5}, {"normalize": "rank"}, {"allocation": "adaptive"}):
        out = da.generate(qwen_pair, ids, make("verispeckv", 48, **{**SMALL, **knobs}), max_new_tokens=L, state=state)
        assert out.record.kv_bytes_kept == out.record.kv_bytes_full * 48 // N
    assert state.timings.seconds["target_lookahead"] == spent


@pytest.mark.parametrize(("knobs", "message"), [
    ({"share": 1.5}, "share"),
    ({"gate": "coin"}, "gate"),
    ({"normalize": "softmax"}, "normalize"),
    ({"allocation": "pyramid"}, "allocation"),
    ({"verify": False}, "needs verify"),
    ({"verify": False, "correct": 0}, "redraft=1 needs verify"),
    ({"verify": False, "correct": 0, "redraft": 0, "gate": "agreement"}, "needs verify"),
    ({"verify": False, "correct": 0, "redraft": 0}, "union=True needs verify"),
    ({"redraft": -1}, "redraft"),
    ({"correct": -1}, "correct"),
])
def test_invalid_knobs_are_refused(knobs, message):
    with pytest.raises(ConfigError, match=message):
        make("verispeckv", 64, **knobs)
