"""A patched model's own `generate` (`draftapprox.patch`): token for token what `draftapprox.generate` decodes, on
tiny models of every architecture and every method; sampling, streamers and refusals through the stock
`GenerationMixin.generate`; and `pipeline("text-generation")` on the real pair."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import GenerationConfig, TextIteratorStreamer

import draftapprox as da
from tests.conftest import prompt_ids, tiny_model, tiny_tokenizer

KNOBS = {"fullkv": {}, "streamingllm": {"budget": 16}, "snapkv": {"budget": 16, "window": 4},
         "pyramidkv": {"budget": 16, "window": 4}, "adakv": {"budget": 16, "window": 4},
         "speckv": {"budget": 16, "window": 4}, "adaspeckv": {"budget": 16, "window": 4},
         "verispeckv": {"budget": 16, "window": 4}, "laq": {"budget": 16, "window": 4},
         "specpc": {"budget": 0.5, "window": 4, "start_layer": 1}, "randompc": {"budget": 0.5},
         "recencypc": {"budget": 0.5}, "targetpc": {"budget": 0.5, "window": 4, "start_layer": 1},
         "specprefill": {"budget": 0.5}, "speckvpc": {"budget": 16, "window": 4}}


def models(arch: str = "qwen2"):
    return tiny_model(arch, layers=4, seed=0), tiny_model(arch, layers=3, heads=4, kv_heads=4, seed=1)


def method(name: str):
    knobs = dict(KNOBS[name])
    return da.make(name, knobs.pop("budget", None), **knobs)


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_a_patched_greedy_generate_is_draftapproxs_generate(arch, name):
    target, draft = models(arch)
    ids = prompt_ids(60, seed=3)
    expected = da.generate(da.pair_from_models(target, tiny_tokenizer(), draft), ids, method(name),
                           max_new_tokens=10, ignore_eos=True).tokens
    with da.patched(target, draft, method(name)):
        out = target.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=-1,  # EOS ignored, as there
                              return_dict_in_generate=True)
    assert out.sequences[0, :60].tolist() == ids[0].tolist()  # the caller's ids, then the new tokens
    assert out.sequences[0, 60:].tolist() == expected
    record = out["draftapprox"]
    assert record.method == name and record.prompt_tokens == 60 and record.kv_bytes_kept <= record.kv_bytes_full


def test_unpatch_restores_the_model_and_a_full_budget_changes_nothing():
    target, draft = models()
    ids = prompt_ids(40, seed=4)
    plain = tiny_model("qwen2", layers=4, seed=0).generate(ids, max_new_tokens=8, do_sample=False)
    with da.patched(target, draft, da.SnapKV(budget=1.0, window=4)):
        full = target.generate(ids, max_new_tokens=8, do_sample=False)
    assert "generate" not in vars(target) and "forward" not in vars(target)
    assert full.tolist() == plain.tolist()
    assert target.generate(ids, max_new_tokens=8, do_sample=False).tolist() == plain.tolist()


def test_sampling_processors_and_a_streamer_run_as_on_a_full_cache():
    target, draft = models()
    tokenizer = tiny_tokenizer()
    ids = prompt_ids(50, seed=5)
    da.patch(target, draft, method("speckv"), tokenizer)
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, max_new_tokens=12, min_new_tokens=12,
                              repetition_penalty=1.3, bad_words_ids=[[7]])
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(target.generate(ids, generation_config=config)[0, 50:].tolist())
    assert runs[0] == runs[1] and len(runs[0]) == 12 and 7 not in runs[0]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(target=target.generate, kwargs={"inputs": ids, "max_new_tokens": 8,
                                                              "min_new_tokens": 8, "do_sample": False,
                                                              "streamer": streamer})
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    greedy = target.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 50:]
    assert streamed.split() == tokenizer.decode(greedy).split()
    assert da.last_record(target).method == "speckv"
    da.unpatch(target)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_beams": 2}, "beam search"), ({"num_return_sequences": 2, "do_sample": True}, "several return"),
    ({"assistant_model": "x"}, "assistant"), ({"past_key_values": "x"}, "its own compressed cache"),
    ({"attention_mask": torch.tensor([[0] + [1] * 29])}, "unpadded"),
])
def test_what_a_compressed_cache_cannot_honour_is_refused(kwargs, message):
    target, draft = models()
    with da.patched(target, draft, method("speckv")), pytest.raises(da.InputError, match=message):
        target.generate(prompt_ids(30), max_new_tokens=4, **kwargs)
    with da.patched(target, draft, method("speckv")), pytest.raises(da.InputError, match="one prompt at a time"):
        target.generate(torch.cat([prompt_ids(30), prompt_ids(30, seed=2)]), max_new_tokens=4)
    with pytest.raises(da.ConfigError, match="needs a draft"):
        da.patch(target, None, "speckv")


@pytest.mark.real
def test_pipeline_on_a_patched_target_answers_the_example(real_pair):
    from transformers import pipeline

    from draftapprox.examples import ANSWER, long_prompt

    target, tokenizer, draft = real_pair.target, real_pair.tokenizer, real_pair.draft
    generator = pipeline("text-generation", model=target, tokenizer=tokenizer)
    messages = [{"role": "user", "content": long_prompt(words=650, depth=0.35)}]
    for chosen in (da.SpecKV(budget=0.25), da.SpecPC(budget=0.25)):
        with da.patched(target, draft, chosen, tokenizer):
            out = generator(messages, max_new_tokens=12, do_sample=False)
            record = da.last_record(target)
        answer = out[0]["generated_text"][-1]["content"]
        assert ANSWER.lower() in answer.lower(), (chosen.name, answer)
        assert record.method == chosen.name
