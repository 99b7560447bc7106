"""The authors' API (`draftapprox.reference_api`): their configs, with their defaults, become our methods, and the
patched `generate` returns what theirs returns; on tiny models token for token against `draftapprox.generate`,
(the reference README's SpecPC snippet on the real pair: examples/reference_patch_model.py)."""

from __future__ import annotations

import pytest
import torch

import draftapprox as da
from draftapprox.reference_api import (
    DraftApproxLLMConfig,
    SpecKVConfig,
    SpecKVPCConfig,
    SpecPCConfig,
    patch_model,
)
from tests.conftest import prompt_ids, tiny_model, tiny_tokenizer

CONFIGS = {
    "speckv": SpecKVConfig(max_capacity_prompt=16, window_size=4, kernel_size=3),
    "specpc": SpecPCConfig(max_capacity_prompt=30, window_size=4, kernel_size=5, starting_layer_index=1),
    "speckvpc": SpecKVPCConfig(specpc_config=SpecPCConfig(max_capacity_prompt=40, window_size=4, kernel_size=5,
                                                          starting_layer_index=1, lookahead_tokens=None),
                               speckv_config=SpecKVConfig(max_capacity_prompt=16, window_size=4, kernel_size=3)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_reference_api_generates_what_draftapprox_does(name):
    target, draft = tiny_model("qwen2", layers=4, seed=0), tiny_model("qwen2", layers=3, heads=4, kv_heads=4, seed=1)
    config = CONFIGS[name]
    ids = prompt_ids(60, seed=3)
    expected = da.generate(da.pair_from_models(target, tiny_tokenizer(), draft), ids, config.method(),
                           max_new_tokens=8, ignore_eos=True)
    model = patch_model(target, draft, config)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         temperature=None, top_p=None, top_k=None, eos_token_id=-1, return_dict_in_generate=True)
    assert out.output_ids[0].tolist() == expected.tokens
    if name == "speckv":  # the whole prompt, as the reference's SpecKV returns it
        assert out.input_size == 60 and out.input_ids.tolist() == ids.tolist()
    else:  # the compressed prompt, as the reference's prompt methods return it
        assert out.input_size == expected.kept_ids.shape[1] < 60
        assert out.input_ids.tolist() == expected.kept_ids.tolist()
    da.unpatch(model)


def test_the_reference_defaults_and_its_config_dictionary():
    kv = SpecKVConfig()  # the reference's defaults (its kernel must be made odd, there as here)
    assert (kv.max_capacity_prompt, kv.window_size, kv.kernel_size, kv.lookahead_tokens) == (1024, 64, 64, None)
    with pytest.raises(da.ConfigError, match="odd"):
        kv.method()
    assert SpecKVConfig(kernel_size=7).method() == da.SpecKV(budget=1024, window=64, kernel=7, lookahead=None,
                                                             sparse_prefill=True)
    pc = SpecPCConfig()
    assert (pc.neighbor_tokens, pc.starting_layer_index, pc.lookahead_tokens) == (64, 0, 1)
    assert DraftApproxLLMConfig.from_dict({"sparse_type": "speckv", "max_capacity_prompt": 256,
                                           "window_size": 32, "kernel_size": 7}).method().budget == 256


@pytest.mark.parametrize(("config", "field"), [
    (SpecKVConfig(max_capacity_prompt=None), "max_capacity_prompt"),
    (SpecPCConfig(lookahead_tokens=None), "lookahead_tokens"),
    (SpecKVPCConfig(specpc_config=SpecPCConfig(kernel_size=32, neighbor_tokens=64)), "neighbor_tokens"),
    (SpecKVPCConfig(speckv_config=SpecKVConfig(reduction_type="mean")), "speckv_config.reduction_type"),
])
def test_what_cannot_be_honoured_is_refused_by_name(config, field):
    with pytest.raises(da.ConfigError, match=field):
        patch_model(tiny_model("qwen2"), tiny_model("qwen2", seed=1), config)

# The reference README's SpecPC snippet with one import changed is examples/reference_patch_model.py, run by
# tests/test_examples.py on the real pair.
