"""draftapprox's presses inside NVIDIA kvpress: the pairs they keep are exactly our SpecKV's and Ada-SpecKV's
selection (tiny float32 models of every architecture), kvpress's own pipeline answers from them, and on the real
pair it answers the built-in example. kvpress pins transformers < 5.3, so these run in the environment
`draftapprox eval setup-peer kvpress` builds; `test_kvpress_environment.py` runs them there from the suite."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

kvpress = pytest.importorskip("kvpress")

from transformers import DynamicCache  # noqa: E402

import draftapprox as da  # noqa: E402
from draftapprox.cache import compress_cache  # noqa: E402
from draftapprox.forward import forward  # noqa: E402
from draftapprox.generation import new_state, prefill  # noqa: E402
from draftapprox.integrations.kvpress import AdaSpecKVPress, SpecKVPress  # noqa: E402
from draftapprox.prompt_state import greedy_from  # noqa: E402
from tests.conftest import prompt_ids, tiny_model, tiny_tokenizer  # noqa: E402

N, RATIO, WINDOW, LOOKAHEAD = 80, 0.75, 4, 6
KEPT = int(N * (1 - RATIO))  # kvpress's count: 20 of 80


def models(arch: str = "qwen2", head_dim: int = 16):
    return (tiny_model(arch, layers=4, seed=0, head_dim=head_dim),
            tiny_model(arch, layers=3, heads=4, kv_heads=4, seed=1, head_dim=head_dim))


def ours(arch: str, method: da.Method, ids: torch.Tensor) -> tuple[list[torch.Tensor], da.Pair]:
    """Our selection for the same ids and draft (the draft's tokens are its greedy lookahead in both), with the
    last position added: our generate feeds it again, kvpress keeps its pair."""
    target, draft = models(arch)
    pair = da.pair_from_models(target, tiny_tokenizer(), draft)
    state = new_state(pair, ids, LOOKAHEAD)
    prefill(state, method.rows)
    keep = method.select(state).keep
    for mask in keep:
        mask[..., -1] = True
    return keep, state


def pressed(arch: str, press_class, ids: torch.Tensor):
    target, draft = models(arch)  # a caller's plain transformers models
    press = press_class(draft=draft, compression_ratio=RATIO, lookahead=LOOKAHEAD, window=WINDOW)
    cache = DynamicCache()
    with torch.inference_mode(), press(target):
        target.model(input_ids=ids, past_key_values=cache)
    return target, cache


def test_speckvpress_keeps_exactly_speckvs_pairs(arch):
    ids = prompt_ids(N, seed=3)
    keep, state = ours(arch, da.SpecKV(budget=KEPT - 1, window=WINDOW, lookahead=LOOKAHEAD), ids)
    _, cache = pressed(arch, SpecKVPress, ids)
    for layer, full, mask in zip(cache.layers, state.cache.layers, keep, strict=True):
        assert layer.keys.shape[2] == KEPT  # kvpress's compression_ratio share, in every head
        for head in range(mask.shape[1]):
            positions = torch.nonzero(mask[0, head]).flatten()
            assert torch.equal(layer.keys[0, head], full.keys[0, head, positions])
            assert torch.equal(layer.values[0, head], full.values[0, head, positions])


def test_with_a_tail_the_context_keeps_speckvs_pairs_on_context_and_tail(arch):
    """Given the ids the pipeline feeds after compression, the press runs our SpecKV on context + tail (the draft
    looks ahead from there) and keeps its choice of context pairs, exactly kvpress's count of them."""
    ids, tail = prompt_ids(N, seed=3), prompt_ids(3, seed=4)
    budget = KEPT + 3 - 1  # the window covers the tail's pairs but its last
    keep, state = ours(arch, da.SpecKV(budget=budget, window=WINDOW, lookahead=LOOKAHEAD), torch.cat([ids, tail], 1))
    target, draft = models(arch)
    press = SpecKVPress(draft=draft, compression_ratio=RATIO, lookahead=LOOKAHEAD, window=WINDOW,
                        tail=tail[0].tolist())
    cache = DynamicCache()
    with torch.inference_mode(), press(target):
        target.model(input_ids=ids, past_key_values=cache)
    for layer, full, mask in zip(cache.layers, state.cache.layers, keep, strict=True):
        assert layer.keys.shape[2] == KEPT
        for head in range(mask.shape[1]):
            positions = torch.nonzero(mask[0, head, :N]).flatten()
            assert torch.equal(layer.keys[0, head], full.keys[0, head, positions])


def test_pipeline_tail_is_what_the_pipeline_feeds_after_the_context():
    from kvpress import KVPressTextGenerationPipeline

    from draftapprox.integrations.kvpress import pipeline_tail

    target, _ = models()
    tokenizer = tiny_tokenizer(chat=True)
    pipe = KVPressTextGenerationPipeline(model=target, tokenizer=tokenizer)
    options, _, _ = pipe._sanitize_parameters(answer_prefix="w7 w8")
    fed = pipe.preprocess("w1 w2 w3", **options)["questions_ids"][0][0].tolist()
    assert pipeline_tail(pipe, answer_prefix="w7 w8") == fed and fed[-2:] == tokenizer.convert_tokens_to_ids(
        ["w7", "w8"])


def test_adaspeckvpress_masks_exactly_what_adaspeckv_drops(arch):
    ids = prompt_ids(N, seed=3)
    keep, _ = ours(arch, da.AdaSpecKV(budget=KEPT - 1, scorer=da.SpecKV(window=WINDOW, lookahead=LOOKAHEAD)), ids)
    target, cache = pressed(arch, AdaSpecKVPress, ids)
    uneven = False
    for layer, attention, mask in zip(cache.layers, [x.self_attn for x in target.model.layers], keep, strict=True):
        assert layer.keys.shape[2] == N  # dropped pairs stay, masked out of attention (kvpress's AdaKV)
        kept = torch.ones_like(mask)
        kept[attention.masked_key_indices] = False
        assert torch.equal(kept, mask)
        assert int(kept.sum()) == mask.shape[1] * KEPT  # kvpress's total: heads share G x kept
        uneven |= len(set(kept[0].sum(-1).tolist())) > 1
    assert uneven, "every head kept as many pairs: the test would not tell head-wise from uniform"


@pytest.mark.parametrize("routed", [True, False], ids=["routed", "plain"])
@pytest.mark.parametrize("press_class", [SpecKVPress, AdaSpecKVPress])
def test_kvpress_pipeline_answers_from_the_pairs_kept(press_class, routed):
    """The pipeline's answer is the greedy answer from our cache holding exactly those pairs (kvpress's masking
    included, also through a model draftapprox loaded and routed through its own attention wrapper). Heads of 64:
    kvpress masks a pair with a key no query of the question can attend to, which need not exist when the
    question's queries outnumber the head's dimensions."""
    from kvpress import KVPressTextGenerationPipeline

    target, draft = models(head_dim=64)
    tokenizer = tiny_tokenizer()  # no chat template: the tiny models' padding token (the template's) embeds as 0,
    # and no key masks a pair from a zero query
    if routed:  # through our attention wrapper, as draftapprox's loader leaves a model; else transformers' own
        da.pair_from_models(target, tokenizer, draft)
    pipe = KVPressTextGenerationPipeline(model=target, tokenizer=tokenizer)
    context = " ".join(f"w{int(i)}" for i in prompt_ids(N, seed=5)[0])
    question = " ".join(f"w{int(i)}" for i in prompt_ids(4, seed=6)[0])
    press = press_class(draft=draft, compression_ratio=RATIO, lookahead=LOOKAHEAD, window=WINDOW)
    answer = pipe(context, question=question, press=press, max_new_tokens=8)["answer"]

    options, _, _ = pipe._sanitize_parameters(question=question, max_new_tokens=8)
    inputs = pipe.preprocess(context, **options)
    ids, question_ids = inputs["context_ids"], inputs["questions_ids"][0]
    method = da.SpecKV(budget=KEPT - 1, window=WINDOW, lookahead=LOOKAHEAD)
    if press_class is AdaSpecKVPress:
        method = da.AdaSpecKV(budget=KEPT - 1, scorer=method)
    n = ids.shape[1]
    target2, draft2 = models(head_dim=64)
    state = new_state(da.pair_from_models(target2, tokenizer, draft2), ids, LOOKAHEAD)
    prefill(state, method.rows)
    keep = method.select(state).keep
    for mask in keep:
        mask[..., -1] = True
    cache = compress_cache(state.cache, keep)
    logits = forward(target2, question_ids, cache, n, compressed=True)
    tokens = greedy_from(target2, logits, cache, n + question_ids.shape[1], 8, frozenset({tokenizer.eos_token_id}),
                         compressed=True)
    assert answer == tokenizer.decode(tokens[0], skip_special_tokens=True)


def test_refusals_name_the_problem():
    target, draft = models()
    with pytest.raises(da.ConfigError, match="needs a draft"):
        SpecKVPress(compression_ratio=0.5)
    with pytest.raises(da.ConfigError, match="compression_ratio"):
        SpecKVPress(draft=draft, compression_ratio=1.0)
    with pytest.raises(da.ConfigError, match="window"):
        SpecKVPress(draft=draft, window=0)
    press = SpecKVPress(draft=draft, compression_ratio=0.95, window=WINDOW)
    with pytest.raises(da.ConfigError, match="fewer than the window"), press(target):
        target.model(input_ids=prompt_ids(N), past_key_values=DynamicCache())
    press = SpecKVPress(draft=draft, compression_ratio=RATIO, window=WINDOW)
    with pytest.raises(da.InputError, match="one context at a time"), press(target):
        target.model(input_ids=torch.cat([prompt_ids(N), prompt_ids(N, seed=2)]), past_key_values=DynamicCache())
    with pytest.raises(da.InputError, match="input_ids"), press(target):
        target.model(inputs_embeds=torch.zeros(1, N, 64), past_key_values=DynamicCache())
    assert "forward" not in vars(target.model)  # the press's wrapper is gone, even after an error
    with pytest.raises(da.ConfigError, match="another model"), SpecKVPress(draft=target)(target):
        pass
    with pytest.raises(da.InputError, match="use_cache=False"), press(target):
        target.model(input_ids=prompt_ids(N), use_cache=False)
    with pytest.raises(da.ConfigError, match="not layer by layer"):
        kvpress.ComposedPress([press, kvpress.SnapKVPress(0.5)]).forward_hook(None, None, {}, None)
    eager, _ = models()
    eager.set_attn_implementation("eager")
    with pytest.raises(da.ConfigError, match="eager"), AdaSpecKVPress(draft=draft, compression_ratio=RATIO,
                                                                       window=WINDOW)(eager):
        eager.model(input_ids=prompt_ids(N), past_key_values=DynamicCache())


def test_a_zero_ratio_keeps_everything():
    target, draft = models()
    ids = prompt_ids(N)
    plain, cache = DynamicCache(), DynamicCache()
    target.model(input_ids=ids, past_key_values=plain)
    with SpecKVPress(draft=draft, compression_ratio=0.0)(target):
        target.model(input_ids=ids, past_key_values=cache)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(cache.layers, plain.layers, strict=True))


@pytest.mark.real
@pytest.mark.parametrize("press_class", [SpecKVPress, AdaSpecKVPress])
def test_kvpress_pipeline_on_the_real_pair_answers_the_example(real_pair, press_class):
    from kvpress import KVPressTextGenerationPipeline

    from draftapprox.examples import ANSWER, long_prompt

    # query-aware, as kvpress's own evaluation runs it: the question inside the compressed context (after the
    # context alone, the draft has nothing to look ahead for and the planted fact is cut)
    context = long_prompt(words=650, depth=0.35)
    pipe = KVPressTextGenerationPipeline(model=real_pair.target, tokenizer=real_pair.tokenizer)
    press = press_class(draft=real_pair.draft, compression_ratio=0.75, lookahead=12)
    cache = DynamicCache()
    answer = pipe(context, press=press, max_new_tokens=12, cache=cache)["answer"]
    assert ANSWER.lower() in answer.lower(), answer
    options, _, _ = pipe._sanitize_parameters()
    n = pipe.preprocess(context, **options)["context_ids"].shape[1]
    kept = int(n * 0.25)
    for layer, attention in zip(cache.layers, [x.self_attn for x in real_pair.target.model.layers], strict=True):
        if press_class is SpecKVPress:
            assert layer.keys.shape[2] == kept
        else:
            heads = layer.keys.shape[1]
            assert layer.keys.shape[2] == n and len(attention.masked_key_indices[0]) == heads * (n - kept)


@pytest.mark.real
def test_the_kvpress_example_runs_as_written():
    from draftapprox.examples import ANSWER
    from tests.test_examples import run

    printed = run("kvpress_press.py")
    assert f"SpecKVPress: '{ANSWER}" in printed, printed


@pytest.mark.real
def test_the_integration_guides_kvpress_example_runs(real_pair):
    from draftapprox.examples import ANSWER, long_prompt

    guide = Path(__file__).resolve().parents[2] / "docs" / "guides" / "integrations.md"
    block = next(b for b in re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S)
                 if "integrations.kvpress" in b)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the page's first block loads `pair` and imports `long_prompt`
        exec(compile(block, str(guide), "exec"), {"pair": real_pair, "long_prompt": long_prompt})
    assert ANSWER in printed.getvalue(), printed.getvalue()
