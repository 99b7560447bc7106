"""The limits a forward is held to: parameter counts from the model itself, bounds from measured rates."""

from __future__ import annotations

import pytest
import torch

from draftapprox.bench import limits
from draftapprox.models.compact import CompactLinear, compact

from ..conftest import tiny_model


def test_matmul_params_leave_out_the_input_embedding_and_the_head_only_for_prefill():
    model = tiny_model("qwen2")
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    assert limits.matmul_params(model) == (total - embedding - head, total - embedding)


def test_bounds_follow_the_rates_and_the_cache():
    model = tiny_model("llama")
    cfg = model.config
    prefill, decode = limits.matmul_params(model)
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    at = limits.bounds(model, gemm=1e9, gemv=1e9, n=100)
    assert at["prefill"] == pytest.approx(2 * prefill * 100 / 1e9)
    streamed = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    assert streamed == decode  # the norms are parameters a step reads too
    assert at["decode"] == pytest.approx((decode + kv_per_token * 100) * 4 / 1e9)
    assert limits.bounds(model, gemm=2e9, gemv=1e9, n=100)["prefill"] == pytest.approx(at["prefill"] / 2)
    compacted = limits.bounds(compact(model), gemm=1e9, gemv=1e9, n=100)["decode"]
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, CompactLinear))
    assert compacted == pytest.approx(at["decode"] - 2 * linear / 1e9)  # two bytes fewer per linear weight


def test_a_tied_output_head_is_read_every_step_and_counts_once():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding
    rest = sum(p.numel() * 4 for p in model.parameters() if p is not embedding)
    assert limits.streamed_bytes(model) == rest + embedding.numel() * 4
    # kept in bfloat16 with its few-row products through the kernel, the head is its own parameter on the same
    # storage: still one head's bytes
    small = compact(model.to(torch.bfloat16), widen=False)
    assert small.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    assert limits.streamed_bytes(small) == (rest + embedding.numel() * 4) // 2


def test_rates_are_measured_on_this_machine():
    """The GEMM rate against a product timed here of the same kind: a wrong unit or a wrong count of operations
    (off by 2, or by 1000) shows; the factor of 3 either way is what a shared machine's noise needs."""
    import time

    model = tiny_model("qwen2")
    rates = limits.rates(model)
    hidden, intermediate = model.config.hidden_size, model.config.intermediate_size
    a, w = torch.randn(2048, hidden), torch.randn(intermediate, hidden)  # the shape the rate is measured at
    torch.nn.functional.linear(a, w)
    best = float("inf")
    for _ in range(7):
        began = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - began)
    here = 2 * 2048 * hidden * intermediate / best
    assert here / 3 < rates["gemm_flops"] < here * 3, (rates["gemm_flops"], here)
    weights = torch.randn(4096, 4096)  # 64 MB: from memory, not from a cache
    x = torch.randn(1, 4096)
    began = time.perf_counter()
    for _ in range(5):
        x @ weights.T
    streamed = 5 * weights.numel() * 4 / (time.perf_counter() - began)
    assert streamed / 5 < rates["gemv_bytes"] < streamed * 5, (rates["gemv_bytes"], streamed)


def test_an_int8_model_has_no_limits_and_says_so():
    from draftapprox.errors import ConfigError

    model = torch.ao.quantization.quantize_dynamic(tiny_model("llama"), {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ConfigError, match="int8"):
        limits.bounds(model, 1e11, 1e10, 128)
