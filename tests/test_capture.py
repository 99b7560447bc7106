import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, DynamicCache

from draftapprox.capture import QueryCapture, check_captured, prepare
from draftapprox.errors import ModelError
from draftapprox.forward import forward
from draftapprox.scoring import window_probs

from .conftest import prompt_ids, tiny_model
from .reference import eager_attentions


def test_window_scores_equal_materialised_eager_attention(arch):
    """Captured post-RoPE queries + cached keys give exactly the rows of the eager attention matrix."""
    model = prepare(tiny_model(arch))
    ids = prompt_ids(40)
    capture, cache = QueryCapture(rows=8), DynamicCache()
    forward(model, ids, cache, 0, capture=capture)
    check_captured(model, capture)
    eager = eager_attentions(model, ids)
    g = model.config.num_key_value_heads
    for layer, queries in capture.queries.items():
        probs = window_probs(queries, torch.arange(32, 40), cache.layers[layer].keys, 40, capture.scaling[layer])
        assert probs.shape == (1, g, 4 // g, 8, 40)
        torch.testing.assert_close(probs.reshape(4, 8, 40), eager[layer][:, 32:40, :], atol=1e-5, rtol=1e-4)


def test_capture_concatenates_successive_forwards():
    model = prepare(tiny_model("llama"))
    ids = prompt_ids(20)
    capture, cache = QueryCapture(rows=5), DynamicCache()
    forward(model, ids[:, :18], cache, 0, capture=capture)
    forward(model, ids[:, 18:], cache, 18, capture=capture)
    one, whole = QueryCapture(rows=5), DynamicCache()
    forward(model, ids, whole, 0, capture=one)
    for layer in range(4):
        torch.testing.assert_close(capture.queries[layer], one.queries[layer], atol=1e-5, rtol=1e-4)


def test_prepared_model_is_unchanged_outside_a_scope(arch):
    model = tiny_model(arch)
    ids = prompt_ids(30)
    with torch.no_grad():
        before = model(ids).logits
        after = prepare(model)(ids).logits
    assert model.config._attn_implementation == "draftapprox_sdpa"
    torch.testing.assert_close(before, after)


def test_unsupported_architecture_fails_clearly():
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(ModelError, match="attention-function registry"):
        prepare(bloom)
