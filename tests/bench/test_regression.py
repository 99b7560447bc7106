"""Regression guard: seconds of benchmark checking *ratios* loosely, never absolute times.

A mid-sized random decoder at 2,048 tokens, where attention over the cache is a visible share of decoding, so a
compressed cache that stopped paying for itself (say, masked instead of dropped pairs) would show. One thread:
on a machine shared with other jobs, two OpenMP threads competing for the cores make small ops tens of times
slower and the ratios meaningless.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from draftapprox.generation import generate
from draftapprox.methods import make
from draftapprox.models.loading import pair_from_models

from ..conftest import prompt_ids, tiny_model, tiny_tokenizer


def _model(layers: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=32, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def _median(pair, ids, method, phase: str, per_token: bool = False) -> float:
    values = []
    for _ in range(3):
        record = generate(pair, ids, method, max_new_tokens=24, ignore_eos=True).record
        values.append(record.timings[phase] / ((record.new_tokens - 1) if per_token else 1))
    return statistics.median(values)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_compression_pays_in_ratios(one_thread):
    pair = pair_from_models(_model(4, 0), tiny_tokenizer(), tiny_model("qwen2", layers=2, seed=1, context=4096))
    ids = prompt_ids(2048)
    generate(pair, ids[:, :256], make("fullkv"), max_new_tokens=2)  # warm-up
    full_decode = _median(pair, ids, make("fullkv"), "decode", per_token=True)
    snap_decode = _median(pair, ids, make("snapkv", 128), "decode", per_token=True)
    assert snap_decode <= 1.0 * full_decode, (snap_decode, full_decode)
    full_prefill = _median(pair, ids, make("fullkv"), "target_prefill")
    specpc = make("specpc", 0.25, start_layer=0, window=16, kernel=9)
    pc_prefill = _median(pair, ids, specpc, "target_prefill")
    assert pc_prefill <= 0.6 * full_prefill, (pc_prefill, full_prefill)
