"""In-place gated MLPs: the same outputs as the model's own forward, on every architecture that has them."""

from __future__ import annotations

import copy

import pytest
import torch

from draftapprox.models.fuse import fusable, fuse

from ..conftest import ARCHS, prompt_ids, tiny_model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_forward_equals_the_models_own(arch):
    model = tiny_model(arch)
    fused = fuse(copy.deepcopy(model))
    patched = [m for m in fused.modules() if "forward" in vars(m)]
    assert patched and all(fusable(m) for m in patched)
    ids = prompt_ids(40)
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-5)


def test_only_plain_gated_mlps_are_touched():
    assert not fusable(torch.nn.Linear(4, 4))
    mlp = tiny_model("llama").model.layers[0].mlp
    assert fusable(mlp)
    mlp.act_fn = torch.nn.GELU()
    assert not fusable(mlp)
