"""The matrix over every method and architecture: budgets honoured, no-op equals FullKV, determinism, and
selections equal to the slow implementations of tests/reference.py."""

import pytest
import torch

import draftapprox as da
from draftapprox.cache import HeadwiseLayer, compress_cache, kept_pairs
from draftapprox.errors import ConfigError
from draftapprox.generation import compress_prompt, new_state, prefill
from draftapprox.methods import METHODS, KVMethod, PromptMethod, make, parse_setting

from ..conftest import prompt_ids
from ..reference import (
    adakv_keep,
    pyramidkv_keep,
    snapkv_keep,
    speckv_keep,
    specpc_positions,
    streamingllm_keep,
)

N = 160
KV_METHODS = ["streamingllm", "snapkv", "pyramidkv", "adakv", "speckv", "adaspeckv", "verispeckv", "laq"]
SMALL = {"window": 8, "kernel": 5}  # knobs that fit a 160-token prompt
PC_SMALL = {"window": 16, "kernel": 8, "start_layer": 1}


def small(name: str, budget):
    if name in ("streamingllm", "fullkv", "recencypc"):
        return make(name, budget)
    if name in ("specpc", "targetpc"):
        return make(name, budget, **PC_SMALL)
    if name == "randompc":
        return make(name, budget, window=16)
    if name == "specprefill":
        return make(name, budget, lookahead=4, kernel=5, chunk=8)
    if name == "speckvpc":
        return make(name, budget, prompt_budget=120, pc_kernel=9, pc_start_layer=1, window=8, kernel=5)
    return make(name, budget, **SMALL)


def test_every_method_is_registered_with_a_kind_and_summary():
    assert set(METHODS) == {"fullkv", "streamingllm", "snapkv", "pyramidkv", "adakv", "speckv", "adaspeckv",
                            "verispeckv", "laq", "specpc", "randompc", "recencypc", "targetpc", "specprefill",
                            "speckvpc"}
    for cls in METHODS.values():
        assert cls.kind in ("kv", "prompt", "cascade") and cls.summary


@pytest.mark.parametrize("name", KV_METHODS)
def test_kv_budgets_are_honoured_exactly(pair, name):
    method = small(name, 40)
    state = new_state(pair, prompt_ids(N), 6)
    prefill(state, method.rows)
    selection = method.select(state)
    layers, heads = len(selection.keep), pair.target.config.num_key_value_heads
    counts = torch.stack([m.sum(-1) for m in selection.keep])  # (layers, b, G)
    if name == "pyramidkv":
        assert int(counts.sum()) == 40 * layers * heads  # the mean over layers is exactly the budget
        per_layer = counts[:, 0, 0].tolist()
        assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > per_layer[-1]
    elif name.startswith("ada") or getattr(method, "allocation", None) == "adaptive":  # AdaKV's allocation
        assert counts.sum(-1).flatten().tolist() == [40 * heads] * layers  # total per layer
    else:
        assert counts.flatten().tolist() == [40] * (layers * heads)  # per head, per layer
    if selection.refeed:
        assert not any(bool(m[..., N - 1].any()) for m in selection.keep)
    cache = compress_cache(state.cache, selection.keep)
    assert kept_pairs(cache) == int(counts.sum())
    if name.startswith("ada") and any(isinstance(layer, HeadwiseLayer) for layer in cache.layers):
        ragged = [layer for layer in cache.layers if isinstance(layer, HeadwiseLayer)]
        assert any(int(layer.head_lengths.max()) > 40 for layer in ragged)


@pytest.mark.parametrize("name", [*KV_METHODS, "fullkv"])
def test_kv_method_with_budget_covering_prompt_equals_fullkv(pair, name):
    ids = prompt_ids(60)
    full = da.generate(pair, ids, da.FullKV(), max_new_tokens=8).tokens
    assert da.generate(pair, ids, small(name, 60), max_new_tokens=8).tokens == full
    assert da.generate(pair, ids, small(name, 1.0), max_new_tokens=8).tokens == full


@pytest.mark.parametrize("name", ["specpc", "targetpc", "randompc", "recencypc"])
def test_prompt_method_with_budget_covering_prompt_keeps_prompt(pair, name):
    state = new_state(pair, prompt_ids(60), 4)
    assert compress_prompt(state, small(name, 100))[0].tolist() == list(range(60))


@pytest.mark.parametrize("name", ["specpc", "targetpc", "randompc", "recencypc"])
def test_prompt_budgets_are_honoured_exactly(pair, name):
    state = new_state(pair, prompt_ids(N), 4)
    positions = compress_prompt(state, small(name, 50))
    assert positions.shape == (1, 50)
    assert positions[0].tolist() == sorted(set(positions[0].tolist()))
    assert positions[0, -1] == N - 1  # the prompt's last token (the question) always survives


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"fullkv"}))
def test_every_method_generates_and_is_deterministic(qwen_pair, name):
    ids = prompt_ids(N)
    first = da.generate(qwen_pair, ids, small(name, 48), max_new_tokens=6)
    torch.manual_seed(12345)  # a method that drew from the global generator would now draw other numbers
    again = da.generate(qwen_pair, ids, small(name, 48), max_new_tokens=6)
    assert first.tokens == again.tokens and 1 <= len(first.tokens) <= 6
    record = first.record
    assert record.prompt_tokens == N and record.kv_bytes_full > record.kv_bytes_kept
    if isinstance(small(name, 48), KVMethod):
        assert record.kv_bytes_kept / record.kv_bytes_full == pytest.approx(48 / N)
    elif isinstance(small(name, 48), PromptMethod):
        assert record.kept_tokens == 48


def test_speckv_selection_equals_slow_reference(pair):
    ids = prompt_ids(N)
    method = da.SpecKV(40, window=8, kernel=5, lookahead=5)
    state = new_state(pair, ids, 5)
    prefill(state, method.rows)
    keep = method.select(state).keep
    with torch.no_grad():
        draft_tokens = pair.draft.generate(ids, max_new_tokens=5, do_sample=False)[:, N:]
    assert torch.equal(state.lookahead(5), draft_tokens)
    slow = speckv_keep(pair.target, ids, draft_tokens, 40, 8, 5)
    for layer, heads in enumerate(slow):
        for g, expected in enumerate(heads):
            assert set(keep[layer][0, g].nonzero().flatten().tolist()) == expected


def test_snapkv_selection_equals_slow_reference(pair):
    ids = prompt_ids(N)
    method = da.SnapKV(40, window=8, kernel=5)
    state = new_state(pair, ids, 4)
    prefill(state, method.rows)
    keep = method.select(state).keep
    for layer, heads in enumerate(snapkv_keep(pair.target, ids, 40, 8, 5)):
        for g, expected in enumerate(heads):
            assert set(keep[layer][0, g].nonzero().flatten().tolist()) == expected


def test_specpc_selection_equals_slow_reference(pair):
    ids = prompt_ids(N)
    method = da.SpecPC(48, window=16, kernel=8, start_layer=1)
    ours = compress_prompt(new_state(pair, ids, 4), method)[0].tolist()
    assert ours == specpc_positions(pair.draft, ids, 48, 16, 8, 8, 1)


def _kept_sets(keep: list[torch.Tensor]) -> list[list[set[int]]]:
    return [[set(layer[0, g].nonzero().flatten().tolist()) for g in range(layer.shape[1])] for layer in keep]


def _selection(pair, method) -> list[list[set[int]]]:
    state = new_state(pair, prompt_ids(N), 4)
    prefill(state, method.rows)
    return _kept_sets(method.select(state).keep)


def test_streamingllm_selection_equals_slow_reference(pair):
    for layer in _selection(pair, da.StreamingLLM(40, sinks=4)):
        assert all(head == streamingllm_keep(N, 40, 4) for head in layer)


def test_pyramidkv_selection_equals_slow_reference(pair):
    assert _selection(pair, da.PyramidKV(40, window=8, kernel=5, beta=4)) == pyramidkv_keep(
        pair.target, prompt_ids(N), 40, 8, 5, 4)


def test_adakv_selection_equals_slow_reference(pair):
    assert _selection(pair, make("adakv", 40, window=8, kernel=5, alpha=0.5)) == adakv_keep(
        pair.target, prompt_ids(N), 40, 8, 5, 0.5)


def test_targetpc_selection_is_specpcs_on_the_targets_attention(pair):
    ids = prompt_ids(N)
    ours = compress_prompt(new_state(pair, ids, 4), da.TargetPC(48, window=16, kernel=8, start_layer=1))[0].tolist()
    assert ours == specpc_positions(pair.target, ids, 48, 16, 8, 8, 1)


def test_specpc_with_a_written_lookahead_equals_slow_reference(pair):
    ids = prompt_ids(N)
    ours = compress_prompt(new_state(pair, ids, 4), da.SpecPC(48, window=16, kernel=8, start_layer=1,
                                                              lookahead=4))[0].tolist()
    with torch.no_grad():
        tokens = pair.draft.generate(ids, max_new_tokens=4, do_sample=False)[:, N:]
    assert ours == specpc_positions(pair.draft, ids, 48, 16, 8, 8, 1, lookahead_tokens=tokens)


def test_speckvpc_cascade_equals_slow_reference(pair, monkeypatch):
    """SpecPC cuts the prompt with the draft's written answer, then SpecKV scores the kept prompt's cache with
    that same answer: the kept ids and the kept pairs both equal the slow references."""
    import draftapprox.generation as generation

    seen = []
    real = generation.compress_cache
    monkeypatch.setattr(generation, "compress_cache", lambda full, keep: seen.append(keep) or real(full, keep))
    ids = prompt_ids(N)
    method = da.SpecKVPC(40, prompt_budget=120, pc_window=16, pc_kernel=9, pc_start_layer=1, window=8, kernel=5,
                         lookahead=5)
    prepared = generation.prepare(pair, ids, method, max_new_tokens=5)
    with torch.no_grad():
        tokens = pair.draft.generate(ids, max_new_tokens=5, do_sample=False)[:, N:]
    positions = specpc_positions(pair.draft, ids, 120, 16, 9, 9, 1, lookahead_tokens=tokens)
    assert prepared.kept_ids[0].tolist() == ids[0, positions].tolist()
    assert _kept_sets(seen[-1]) == speckv_keep(pair.target, prepared.kept_ids, tokens, 40, 8, 5)


def test_speckv_draft_lookahead_is_shared_between_methods(qwen_pair):
    ids = prompt_ids(N)
    state = new_state(qwen_pair, ids, 6)
    da.generate(qwen_pair, ids, small("speckv", 40), max_new_tokens=6, state=state)
    draft_seconds = state.timings.seconds["draft"]
    da.generate(qwen_pair, ids, small("adaspeckv", 40), max_new_tokens=6, state=state)
    assert state.timings.seconds["draft"] == draft_seconds  # no second draft run
    assert state.cache.layers[0].keys.shape[2] == N  # the shared prefill cache is left uncompressed


@pytest.mark.parametrize(("name", "knobs", "message"), [
    ("snapkv", {"kernel": 4}, "odd"),
    ("snapkv", {"window": 64}, "larger than the budget"),
    ("speckv", {"pool": "median"}, "pool"),
    ("specpc", {"reduction": "sum"}, "reduction"),
    ("pyramidkv", {"beta": 0.5}, "beta"),
    ("adakv", {"alpha": 2.0}, "alpha"),
    ("streamingllm", {"sinks": 40}, "sinks"),
    ("snapkv", {"colour": "red"}, "unknown knob"),
])
def test_invalid_knobs_are_rejected(name, knobs, message):
    with pytest.raises(ConfigError, match=message):
        make(name, 32, **knobs)


def test_a_setting_is_read_the_same_everywhere():
    assert parse_setting(" window = 8 ") == ("window", "8")
    assert parse_setting("stop=a=b") == ("stop", "a=b")  # the value may hold '='
    for bad in ("window", "window=", "=8", " = "):
        with pytest.raises(ConfigError, match="is not KEY=VALUE"):
            parse_setting(bad)


@pytest.mark.parametrize("budget", [0, -5, 0.0, 1.5, True, "many"])
def test_invalid_budgets_are_rejected(budget):
    with pytest.raises(ConfigError):
        da.SnapKV(budget)


def test_a_ratio_below_the_window_keeps_the_window_and_says_so(qwen_pair):
    """A ratio is "this share of whatever comes": on a prompt too short for it, the method keeps its window (or
    the whole prompt) instead of refusing, and the record says which; a token count below the window is still
    refused when the method is built."""
    out = da.generate(qwen_pair, prompt_ids(N), da.SnapKV(0.1, window=32), max_new_tokens=2)
    assert out.record.budget_tokens == 32 and "kept the window" in out.record.budget_note
    assert out.record.kv_bytes_kept == out.record.kv_bytes_full * 32 // N
    short = da.generate(qwen_pair, prompt_ids(20), da.SnapKV(0.1, window=32), max_new_tokens=2)
    assert "passed through uncut" in short.record.budget_note
    assert short.record.kv_bytes_kept == short.record.kv_bytes_full
    assert da.generate(qwen_pair, prompt_ids(N), da.SnapKV(0.5, window=32), max_new_tokens=2).record.budget_note is None
    with pytest.raises(ConfigError, match="larger than the budget"):
        da.SnapKV(16, window=32)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_documents_each_of_its_knobs_itself(name):
    """A reader of one method's class finds every knob there (meaning and default), not in a base class."""
    import dataclasses

    cls = METHODS[name]
    own = cls.__dict__.get("__doc__") or ""
    assert "Knobs:" in own, f"{cls.__name__} has no Knobs section of its own"
    knobs = own.split("Knobs:", 1)[1]
    for field in dataclasses.fields(cls):
        assert f"`{field.name}`" in knobs, f"{cls.__name__} does not document `{field.name}`"


def test_every_method_answers_the_same_in_another_process(qwen_pair):
    """Another process (other hash seed, fresh global generators, models built anew) writes the same tokens for
    every method: nothing hangs on process state (set order, `id`s, an unseeded draw)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = {name: da.generate(qwen_pair, prompt_ids(N), small(name, 48), max_new_tokens=6).tokens
            for name in sorted(METHODS)}
    code = ("import json, draftapprox as da\n"
            "from tests.conftest import prompt_ids, tiny_model, tiny_tokenizer\n"
            "from tests.methods.test_methods import N, small\n"
            "from draftapprox.methods import METHODS\n"
            "from draftapprox.models.loading import pair_from_models\n"
            "pair = pair_from_models(tiny_model('qwen2', layers=4, seed=0), tiny_tokenizer(),\n"
            "                        tiny_model('qwen2', layers=3, heads=4, kv_heads=4, seed=1))\n"
            "print(json.dumps({n: da.generate(pair, prompt_ids(N), small(n, 48), max_new_tokens=6).tokens\n"
            "                  for n in sorted(METHODS)}))\n")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONHASHSEED": "97"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == here
