import pytest
import torch

import draftapprox as da
from draftapprox.errors import ConfigError, InputError
from draftapprox.generation import encode

from .conftest import prompt_ids


def test_fullkv_equals_model_generate_token_for_token(pair):
    ids = prompt_ids(120)
    ours = da.generate(pair, ids, da.FullKV(), max_new_tokens=12)
    with torch.no_grad():
        ref = pair.target.generate(ids, max_new_tokens=12, do_sample=False)[0, 120:].tolist()
    if ref and ref[-1] in pair.eos_ids:
        ref = ref[: ref.index(ref[-1]) + 1]
    assert ours.tokens == ref


def test_record_reports_bytes_and_phases(qwen_pair):
    result = da.generate(qwen_pair, prompt_ids(100), da.SpecKV(25, window=8, kernel=5), max_new_tokens=4)
    record = result.record.to_dict()
    assert record["kv_bytes_kept"] / record["kv_bytes_full"] == pytest.approx(0.25)
    assert {"draft", "target_prefill", "target_lookahead", "scoring", "compression", "decode"} <= set(record["timings"])


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(qwen_pair):
    ids = prompt_ids(50)
    sampling = da.Sampling(temperature=1.5, top_p=0.95, seed=7)
    a = da.generate(qwen_pair, ids, max_new_tokens=10, sampling=sampling).tokens
    b = da.generate(qwen_pair, ids, max_new_tokens=10, sampling=sampling).tokens
    greedy = da.generate(qwen_pair, ids, max_new_tokens=10).tokens
    assert a == b and a != greedy


def test_stop_string_cuts_text(qwen_pair):
    ids = prompt_ids(40)
    full = da.generate(qwen_pair, ids, max_new_tokens=6)
    words = full.text.split()
    stopped = da.generate(qwen_pair, ids, max_new_tokens=6, stop=[words[2]])
    assert stopped.record.stop_reason == "stop" and words[2] not in stopped.text
    assert len(stopped.tokens) == 3


def test_text_prompts_and_chat_template(qwen_pair):
    with pytest.raises(InputError, match="empty"):
        encode(qwen_pair, "   ")
    with pytest.raises(InputError, match="chat template"):
        encode(qwen_pair, "w1 w2", chat=True)
    qwen_pair.tokenizer.chat_template = "{% for m in messages %}w7 {{ m['content'] }} w8{% endfor %} w9"
    assert encode(qwen_pair, "w1 w2", chat=True)[0].tolist() == [7, 1, 2, 8, 9]


def test_prompt_longer_than_context_is_rejected(qwen_pair):
    with pytest.raises(InputError, match="context"):
        encode(qwen_pair, " ".join(["w5"] * 2100), max_new_tokens=8)


def test_methods_needing_a_draft_refuse_a_target_only_pair(qwen_pair):
    target_only = da.Pair(qwen_pair.target, qwen_pair.tokenizer)
    with pytest.raises(ConfigError, match="draft"):
        da.generate(target_only, prompt_ids(50), da.SpecKV(20, window=8), max_new_tokens=2)


def test_keep_positions_continues_from_original_length(qwen_pair):
    ids = prompt_ids(100)
    def run(method):
        return da.generate(qwen_pair, ids, method, max_new_tokens=5).tokens

    # RoPE is relative: a contiguous tail gives the same answer at shifted positions, gaps do not.
    assert run(da.RecencyPC(40)) == run(da.RecencyPC(40, keep_positions=True))
    assert run(da.RandomPC(40, window=8)) != run(da.RandomPC(40, window=8, keep_positions=True))


def test_compress_returns_positions_into_the_prompt(qwen_pair):
    text = " ".join(f"w{i % 400}" for i in range(150))
    out = da.compress(qwen_pair, text, da.SpecPC(30, window=8, kernel=4, start_layer=1))
    words = text.split()
    assert len(out.positions) == 30 == len(out.token_ids)
    assert [f"w{t}" for t in out.token_ids] == [words[p] for p in out.positions]
    with pytest.raises(ConfigError, match="not a prompt-compression"):
        da.compress(qwen_pair, text, da.SnapKV(64))


def test_work_is_shared_across_budgets_on_one_prompt_state(qwen_pair):
    ids = prompt_ids(160)
    state = da.new_state(qwen_pair, ids, 4)
    da.generate(qwen_pair, ids, da.SpecKV(40, window=8, kernel=5), max_new_tokens=4, state=state)
    seconds = dict(state.timings.seconds)
    # a cascade whose prompt stage keeps everything runs on the same prefill and the same draft tokens
    da.generate(qwen_pair, ids, da.SpecKVPC(48, prompt_budget=200, window=8, kernel=5, pc_kernel=9,
                                            pc_start_layer=1), max_new_tokens=4, state=state)
    assert state.timings.seconds["target_prefill"] == seconds["target_prefill"]
    assert state.timings.seconds["draft"] == seconds["draft"]
    # prompt scores do not depend on the budget: a second budget scores nothing again
    for budget in (0.25, 0.5):
        da.generate(qwen_pair, ids, da.SpecPC(budget, window=16, kernel=8, start_layer=1), max_new_tokens=2,
                    state=state)
        if budget == 0.25:
            seconds = dict(state.timings.seconds)
    assert state.timings.seconds["draft"] == seconds["draft"]


@pytest.mark.parametrize("name", ["speckv", "verispeckv"])
def test_a_request_of_its_own_keeps_only_its_compressed_cache_while_it_decodes(qwen_pair, name):
    """The uncompressed prefill, its queries and the draft's cache are dropped once the request's cache is built
    (a server decodes with the prepared request in hand); a caller's shared state keeps them for other methods."""
    from draftapprox.generation import new_state, prepare

    ids = prompt_ids(120)
    method = da.make(name, 40, window=8, kernel=5)
    prepared = prepare(qwen_pair, ids, method, max_new_tokens=4)
    assert prepared.state.cache is None and prepared.state.queries is None and prepared.state.draft_cache is None
    shared = new_state(qwen_pair, ids, 4)
    again = prepare(qwen_pair, ids, method, max_new_tokens=4, state=shared)
    assert shared.cache is not None and shared.cache.layers[0].keys.shape[2] == 120
    assert shared.draft_cache is not None
    assert again.record.kv_bytes_kept == prepared.record.kv_bytes_kept


def test_targetpc_reads_the_shared_prefill_and_selects_as_on_its_own(qwen_pair):
    """Without lookahead TargetPC's rows are the target's own prefill's, so a shared prefill that captured them
    serves it with no second forward, and the selection is the one it makes alone."""
    from draftapprox.generation import compress_prompt, prefill

    ids = prompt_ids(160)
    method = da.TargetPC(0.25, window=16, kernel=9, start_layer=1)
    alone = compress_prompt(da.new_state(qwen_pair, ids, 4), method)
    state = da.new_state(qwen_pair, ids, 4)
    prefill(state, method.rows)
    seconds = dict(state.timings.seconds)
    assert torch.equal(compress_prompt(state, method), alone)
    assert "target_scoring" not in state.timings.seconds and state.timings.seconds["target_prefill"] == seconds[
        "target_prefill"]


def test_a_stop_string_counts_only_after_some_text():
    from draftapprox.generation import _cut

    assert _cut("\n\n 123\n456", ["\n"]) == 6
    assert _cut("  \n", ["\n"]) is None
    assert _cut("abc", ["\n"]) is None


@pytest.mark.parametrize("static", [False, True])
def test_batched_decoding_gives_each_request_the_tokens_it_gets_alone(pair, static):
    """Every cache layout (contiguous, per-layer and per-head lengths, refeed, shorter prompts, original position
    ids) in one batch, requests of different lengths leaving it as they finish; float64 so that the batched
    matmuls cannot flip a greedy choice by rounding. `static`: fixed-shape steps, made anew at each departure."""
    pair.target.double()
    pair.draft.double()
    ids = prompt_ids(96)
    methods = [da.FullKV(), da.SnapKV(40, window=8), da.PyramidKV(40, window=8),
               da.AdaKV(40, scorer=da.SnapKV(40, window=8)), da.StreamingLLM(40), da.SpecKV(40, window=8, lookahead=4),
               da.SpecPC(0.25, window=8, kernel=5, start_layer=1), da.SpecPrefill(0.25)]
    state = da.new_state(pair, ids, 10)
    prepared = [da.prepare(pair, ids, m, max_new_tokens=3 + i, state=state) for i, m in enumerate(methods)]
    together = dict(da.generate_batched(pair, prepared, max_batch=4, static=static))
    assert sorted(together) == list(range(len(methods)))
    for i, method in enumerate(methods):
        alone = da.generate(pair, ids, method, max_new_tokens=3 + i)
        assert together[i].tokens == alone.tokens, method.name
        assert together[i].record.stop_reason == alone.record.stop_reason
    assert max(r.record.decode_batch for r in together.values()) == 4


def test_batch_size_must_be_positive(qwen_pair):
    with pytest.raises(ConfigError, match="max_batch"):
        list(da.generate_batched(qwen_pair, [], max_batch=0))


@pytest.mark.parametrize("static", [False, True])
def test_sequences_joining_and_leaving_a_running_batch_get_the_tokens_they_get_alone(pair, static):
    """A server's batch: members join between steps (re-stacking the rows already running, decoded tokens
    included) and leave early (a cancelled client); every other member's tokens stay those it gets alone."""
    pair.target.double()
    pair.draft.double()
    ids = [prompt_ids(60 + 12 * i, seed=i) for i in range(4)]
    methods = [da.FullKV(), da.AdaKV(24, scorer=da.SnapKV(24, window=4)), da.SpecKV(24, window=4, lookahead=3),
               da.SpecPC(0.5, window=4, kernel=3, start_layer=1)]
    alone = [da.generate(pair, i, m, max_new_tokens=9).tokens for i, m in zip(ids, methods, strict=True)]
    batch = da.DecodeBatch(pair, static=static)
    got: dict[int, list[int]] = {k: [] for k in range(4)}
    results = {}
    step = 0
    while step < 7 or len(batch):
        if step in (0, 2, 5, 6):  # joins while others are part-way through
            k = (0, 2, 5, 6).index(step)
            batch.join(da.prepare(pair, ids[k], methods[k], max_new_tokens=9), key=k)
        if step == 7:
            assert batch.leave(1) and not batch.leave(1)
        for s in batch.step():
            got[s.key].extend(s.tokens)
            if s.result is not None:
                results[s.key] = s.result
        step += 1
    for k in (0, 2, 3):
        assert got[k] == alone[k][:len(got[k])] and results[k].tokens == alone[k], methods[k].name
    assert got[1] == alone[1][:len(got[1])] and 1 not in results
    assert len(batch) == 0
