"""Speculative decoding: the same greedy tokens as decoding alone for every method, alone and in batches; the
target's sampling distribution kept; the draft's chain reused; `auto`'s choice following acceptance and cost."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import pytest
import torch

import draftapprox as da
from draftapprox import speculative as speculation
from draftapprox.cache import new_cache
from draftapprox.errors import ConfigError
from draftapprox.forward import forward
from draftapprox.generation import DecodeBatch, Picker, Sampling, generate_batched, prepare
from draftapprox.methods import make
from draftapprox.models.loading import pair_from_models
from tests.conftest import close_draft, prompt_ids, tiny_model, tiny_tokenizer

# every method, at knobs that fit a 4-layer target and 200-token prompts
METHODS = {"fullkv": {}, "streamingllm": {}, "snapkv": {}, "pyramidkv": {}, "adakv": {}, "speckv": {},
           "adaspeckv": {}, "verispeckv": {}, "laq": {}, "specpc": {"start_layer": 1}, "randompc": {},
           "recencypc": {}, "targetpc": {"start_layer": 1}, "specprefill": {}, "speckvpc": {"pc_start_layer": 1}}


def method(name: str):
    return make(name, None if name == "fullkv" else 64, **METHODS[name])


@pytest.fixture(scope="module")
def close_pair():
    """A qwen2 target and a draft that agrees with it most of the time."""
    target = tiny_model("qwen2", layers=4, seed=0)
    return pair_from_models(target, tiny_tokenizer(), close_draft(target))


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("proposals", [1, 3, "auto"])
def test_greedy_tokens_are_those_of_decoding_without_the_draft(close_pair, name, proposals):
    ids = prompt_ids(200, seed=3)
    plain = da.generate(close_pair, ids, method(name), max_new_tokens=24, ignore_eos=True)
    fast = da.generate(close_pair, ids, method(name), max_new_tokens=24, ignore_eos=True, speculative=proposals)
    assert fast.tokens == plain.tokens
    record = fast.record
    assert record.speculative == proposals and record.kv_bytes_draft > 0
    assert 0 <= record.accepted_tokens <= record.proposed_tokens
    if proposals != "auto":  # the draft proposed at every step with room left
        assert record.proposed_tokens > 0


def test_the_check_takes_and_rejects_proposals_on_full_and_compressed_caches(close_pair):
    ids = prompt_ids(200, seed=3)
    for name in ("fullkv", "adakv", "pyramidkv"):  # a dense cache, a per-head one, per-layer lengths
        record = da.generate(close_pair, ids, method(name), max_new_tokens=32, ignore_eos=True, speculative=3).record
        assert 0 < record.accepted_tokens < record.proposed_tokens, (name, record)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_other_architectures_keep_their_greedy_tokens(arch):
    target = tiny_model(arch, layers=4, seed=0)
    pair = pair_from_models(target, tiny_tokenizer(), close_draft(target))
    ids = prompt_ids(150, seed=4)
    for name in ("fullkv", "speckv", "adaspeckv"):
        plain = da.generate(pair, ids, method(name), max_new_tokens=16, ignore_eos=True)
        assert da.generate(pair, ids, method(name), max_new_tokens=16, ignore_eos=True,
                           speculative=2).tokens == plain.tokens


def test_stops_inside_an_accepted_run_end_the_answer_where_decoding_alone_ends_it(close_pair):
    ids = prompt_ids(120, seed=5)
    plain = da.generate(close_pair, ids, max_new_tokens=30, ignore_eos=True)
    for new in (1, 2, 7, 13):  # the length limit falls inside the proposals of a step
        fast = da.generate(close_pair, ids, max_new_tokens=new, ignore_eos=True, speculative=4)
        assert fast.tokens == plain.tokens[:new] and fast.record.stop_reason == "length"
    stop = close_pair.tokenizer.decode(plain.tokens[5:7])
    cut = da.generate(close_pair, ids, max_new_tokens=30, ignore_eos=True, stop=[stop])
    fast = da.generate(close_pair, ids, max_new_tokens=30, ignore_eos=True, stop=[stop], speculative=4)
    assert (fast.text, fast.record.stop_reason) == (cut.text, cut.record.stop_reason) == (fast.text, "stop")


def test_a_batch_of_mixed_settings_gives_each_request_its_tokens_alone(close_pair):
    settings = [("fullkv", 3, 200), ("adakv", 2, 150), ("speckv", 0, 120), ("fullkv", 5, 90), ("streamingllm", 1, 300),
                ("specpc", "auto", 180)]
    alone, prepared = [], []
    for i, (name, proposals, n) in enumerate(settings):
        ids, new = prompt_ids(n, seed=10 + i), 20 + 4 * i
        alone.append(da.generate(close_pair, ids, method(name), max_new_tokens=new, ignore_eos=True).tokens)
        prepared.append(prepare(close_pair, ids, method(name), max_new_tokens=new, ignore_eos=True,
                                speculative=proposals))
    together = dict(generate_batched(close_pair, prepared))
    assert [together[i].tokens for i in range(len(settings))] == alone
    assert max(r.record.decode_batch for r in together.values()) > 1
    assert sum(r.record.accepted_tokens for r in together.values()) > 0


def test_joins_and_departures_during_speculation_keep_every_answer(close_pair):
    """Rejected positions leave holes in a batch's tails; joins, departures and re-stacking must carry the valid
    positions only."""
    ids = [prompt_ids(60 + 30 * i, seed=20 + i) for i in range(4)]
    alone = [da.generate(close_pair, x, max_new_tokens=40, ignore_eos=True).tokens for x in ids]
    batch = DecodeBatch(close_pair)
    got: dict[int, list[int]] = {k: [] for k in range(4)}
    for step in range(80):
        if step in (0, 1, 4, 9):
            k = (0, 1, 4, 9).index(step)
            batch.join(prepare(close_pair, ids[k], max_new_tokens=40, ignore_eos=True, speculative=4), key=k)
        if step == 6:
            assert batch.leave(1)
        for s in batch.step():
            got[s.key].extend(s.tokens)
        if not batch:
            break
    assert got[1] == alone[1][:len(got[1])]
    assert [got[k] for k in (0, 2, 3)] == [alone[k] for k in (0, 2, 3)]


def test_a_rejected_proposal_in_a_batch_is_forgotten_and_holes_are_compacted(close_pair, monkeypatch):
    compactions = []
    original = DecodeBatch._compact

    def spy(self):
        before = self._cache
        original(self)
        compactions.append(self._cache is not before)

    monkeypatch.setattr(DecodeBatch, "_compact", spy)
    monkeypatch.setattr(speculation, "MAX_AUTO", 2)  # re-stack as soon as a third of a tail would be holes
    prepared = [prepare(close_pair, prompt_ids(80, seed=30 + i), max_new_tokens=48, ignore_eos=True, speculative=6)
                for i in range(2)]
    alone = [da.generate(close_pair, prompt_ids(80, seed=30 + i), max_new_tokens=48, ignore_eos=True).tokens
             for i in range(2)]
    together = dict(generate_batched(close_pair, prepared))
    assert [together[i].tokens for i in range(2)] == alone
    assert any(compactions)


def test_the_drafter_proposes_its_lookahead_without_a_forward(close_pair):
    ids = prompt_ids(150, seed=6)
    p = prepare(close_pair, ids, method("speckv"), max_new_tokens=30, ignore_eos=True, speculative=4)
    drafter = p.drafter
    chain = list(drafter.chain)
    assert len(chain) > 4  # the SpecKV lookahead (the method's default length)
    assert drafter.propose([chain[0]], 3) == chain[1:4] and drafter.forwards == 0
    # a token off the chain: the cache goes back to what agrees and the draft writes on from the target's token
    other = (chain[1] + 1) % 500
    proposals = drafter.propose([chain[0], other], 2)
    fresh = prepare(close_pair, ids, max_new_tokens=30, ignore_eos=True, speculative=4).drafter
    assert proposals == fresh.propose([chain[0], other], 2) and drafter.forwards == 2


def test_speculation_refuses_what_it_cannot_run(close_pair):
    ids = prompt_ids(40)
    target_only = pair_from_models(tiny_model("qwen2", layers=2), tiny_tokenizer())
    with pytest.raises(ConfigError, match="draft model"):
        da.generate(target_only, ids, max_new_tokens=4, speculative=2)
    for bad in (-1, "two", 1.5, True):
        with pytest.raises(ConfigError, match="speculative"):
            da.generate(close_pair, ids, max_new_tokens=4, speculative=bad)
    with pytest.raises(ConfigError, match="static"):
        da.generate(close_pair, ids, max_new_tokens=4, speculative=2, static=True)


def test_the_rejection_rule_keeps_the_target_distribution():
    """Proposing token 2 (whatever its probability) and applying `accepts`, then a pick without it when
    rejected, must give exactly the target's sampling distribution, top-p included."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    for sampling in (Sampling(1.0, 1.0, seed=0), Sampling(0.7, 0.9, seed=1)):
        picker = Picker(sampling)
        p = picker.probs(logits)[0]
        draws = 20000
        counts = Counter()
        for _ in range(draws):
            token = 2 if picker.accepts(logits, 2) else int(picker(logits, exclude=2)[0, 0])
            counts[token] += 1
        observed = torch.tensor([counts[i] for i in range(6)], dtype=torch.float64)
        expected = p.double() * draws
        support = expected > 0
        assert observed[~support].sum() == 0
        chi2 = float(((observed[support] - expected[support]) ** 2 / expected[support]).sum())
        assert chi2 < 20.5, (chi2, observed, expected)  # p = 0.001 at 5 degrees of freedom


def test_sampled_answers_follow_the_target_distribution_on_a_model():
    """The second token's distribution when the draft proposes it and the target checks it, against its exact
    distribution (the first token's probabilities times the second's given each). The draft proposes the
    target's most likely token, which has about half the mass: a rule that takes it too often shows at once."""
    target = tiny_model("qwen2", layers=4, seed=0)
    close_pair = pair_from_models(target, tiny_tokenizer(), close_draft(target, noise=0.0))
    ids = prompt_ids(30, seed=7)
    sampling = Sampling(temperature=0.3, top_p=0.95)
    picker = Picker(sampling)
    first = picker.probs(forward(close_pair.target, ids, new_cache(), 0))[0]
    exact = torch.zeros_like(first, dtype=torch.float64)
    for t1 in first.nonzero()[:, 0].tolist():
        logits = forward(close_pair.target, torch.cat([ids, torch.tensor([[t1]])], dim=1), new_cache(), 0)
        exact += float(first[t1]) * picker.probs(logits)[0].double()
    runs, counts = 800, Counter()
    for seed in range(runs):
        out = da.generate(close_pair, ids, max_new_tokens=2, ignore_eos=True, speculative=1,
                          sampling=dataclasses.replace(sampling, seed=seed))
        counts[out.tokens[1]] += 1
    expected = exact * runs
    big = (expected >= 5).nonzero()[:, 0].tolist()
    observed = [counts[t] for t in big] + [runs - sum(counts[t] for t in big)]
    expect = [float(expected[t]) for t in big] + [runs - float(expected[big].sum())]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expect, strict=True) if e > 0)
    tail = float(torch.special.gammaincc(torch.tensor(len(big) / 2), torch.tensor(chi2 / 2)))  # chi2's p-value
    assert tail > 1e-3, (chi2, len(big))


def test_auto_proposes_when_the_draft_is_cheap_and_right_and_stops_when_not():
    costs = speculation.Costs(draft_ratio=0.33)
    costs.saw_step(1, 1, 0.065)
    costs.saw_step(1, 5, 0.075)
    costs.saw_draft(1, 0.024)
    assert speculation.choose_width(costs, 1, [(0.9, 0, 64, None)]) >= 3
    assert speculation.choose_width(costs, 1, [(0.3, 0, 64, None)]) == 0  # a draft-wrong prompt
    assert speculation.choose_width(costs, 1, [(0.9, 0, 2, None)]) == 2  # no more than the answer's room
    # proposals the chain already holds cost no draft forward: more of them pay
    assert speculation.choose_width(costs, 1, [(0.6, 8, 64, None)]) > speculation.choose_width(
        costs, 1, [(0.6, 0, 64, None)])
    expensive = speculation.Costs(draft_ratio=1.0)
    expensive.saw_step(1, 1, 0.065)
    expensive.saw_draft(1, 0.065)
    assert speculation.choose_width(expensive, 1, [(0.8, 0, 64, None)]) == 0
    # a batch whose step is cheap per token: one sequence's proposals cost every sequence time
    batch = speculation.Costs(draft_ratio=0.33)
    batch.saw_step(8, 1, 0.09)
    batch.saw_draft(1, 0.024)
    assert speculation.choose_width(batch, 8, [(0.8, 0, 64, None)] * 8) == 0


def test_auto_turns_off_on_a_draft_that_disagrees_and_probes_again(monkeypatch):
    target = tiny_model("qwen2", layers=4, seed=0)
    wrong = pair_from_models(target, tiny_tokenizer(), tiny_model("qwen2", layers=4, seed=9))
    p = prepare(wrong, prompt_ids(80, seed=8), max_new_tokens=60, ignore_eos=True, speculative="auto")
    batch = DecodeBatch(wrong)
    batch.join(p)
    widths = []
    original = DecodeBatch._proposals

    def spy(self):
        out = original(self)
        widths.append(len(out[0]))
        return out

    monkeypatch.setattr(DecodeBatch, "_proposals", spy)
    while batch:
        batch.step()
    assert widths.count(0) > len(widths) // 2  # mostly off
    assert any(w > 0 for w in widths[speculation.PROBE_EVERY:])  # yet it looks again


@pytest.mark.parametrize("layout", ["dense", "pyramid", "headwise", "batch"])
def test_a_check_of_several_tokens_gives_each_the_bits_of_a_one_token_step(layout, isa):
    """In bfloat16 a product or an attention over five rows rounds differently from one over one row, which can
    flip a near-tie; `rows_apart` computes each row as its one-token step would, so greedy speculation takes
    exactly the tokens decoding one at a time takes, on the engine's own bfloat16 path (packed weights too), at
    every kernel level this CPU runs."""
    from draftapprox import kernels
    from draftapprox.cache import batch_caches, compress_cache
    from draftapprox.models.compact import compact, packable
    from draftapprox.models.fuse import fuse

    if not kernels.vectorised():
        pytest.skip("the bfloat16 kernels need a wide-vector build")
    target = fuse(tiny_model("qwen2", layers=3, seed=0, head_dim=32).to(torch.bfloat16))
    pair = pair_from_models(compact(target, widen=False, pack=packable()), tiny_tokenizer())  # as loading packs
    ids, new = prompt_ids(120, seed=11), prompt_ids(6, seed=12)
    cache = new_cache()
    forward(pair.target, ids, cache, 0)
    if layout != "dense":
        generator = torch.Generator().manual_seed(3)
        keep = []
        for index, layer in enumerate(cache.layers):
            mask = torch.rand(layer.keys.shape[:3], generator=generator) < 0.4
            if layout == "pyramid":  # per-layer lengths, every head alike
                mask = torch.zeros(layer.keys.shape[:3], dtype=torch.bool)
                mask[..., -(30 + 20 * index):] = True
            keep.append(mask)
        cache = compress_cache(cache, keep)
    if layout == "batch":
        cache = batch_caches([cache, cache])
        ids_new, positions = new.expand(2, -1), torch.arange(120, 126).expand(2, -1)
    else:
        ids_new, positions = new, torch.arange(120, 126)[None]
    steps = copy.deepcopy(cache)
    sequential = torch.stack([forward(pair.target, ids_new[:, i:i + 1], steps, positions[:, i:i + 1], compressed=True)
                              for i in range(6)], dim=1)
    checked = forward(pair.target, ids_new, copy.deepcopy(cache), positions, compressed=True, every=True,
                      rows_apart=True)
    assert torch.equal(sequential, checked)


def test_auto_reads_a_batch_size_it_has_not_measured_from_the_nearest_one_it_has():
    """A batch of four that has not stepped yet must not look free next to a measured draft forward: its step is
    estimated from the measured batch of one, in seconds, and speculation that cannot pay is not chosen."""
    costs = speculation.Costs(draft_ratio=0.33)
    costs.saw_step(1, 1, 0.065)
    costs.saw_draft(1, 0.024)
    assert 0.06 < costs.step(4, 1) < 0.1 and costs.step(4, 3) > costs.step(4, 1)
    assert speculation.choose_width(costs, 4, [(0.6, 0, 64, None)] * 4) == 0


def test_a_twin_of_a_speculating_request_drafts_with_a_drafter_of_its_own(close_pair):
    from draftapprox.generation import generate_prepared, twin

    first = prepare(close_pair, prompt_ids(100, seed=40), max_new_tokens=20, ignore_eos=True, speculative=3)
    other = twin(first)
    assert other.drafter is not first.drafter and other.drafter.cache is not first.drafter.cache
    assert generate_prepared(close_pair, other).tokens == generate_prepared(close_pair, first).tokens
