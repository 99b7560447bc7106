"""In-place gated MLPs: the same outputs as the model's own forward, on every architecture that has them, for a few
rows (the plain path) and for a chunk of many (the gate and up projections written into per-thread buffers); and
bfloat16 models taking the compiled rotary embedding and SiLU-and-product."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from draftapprox import kernels
from draftapprox.models import scratch
from draftapprox.models.compact import KERNEL_ROWS, compact
from draftapprox.models.fuse import fusable, fuse

from ..conftest import ARCHS, prompt_ids, tiny_model


@pytest.mark.parametrize("rows", [40, 3 * KERNEL_ROWS])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_forward_equals_the_models_own(arch, rows):
    model = tiny_model(arch)
    fused = fuse(copy.deepcopy(model))
    patched = [m for m in fused.modules() if "forward" in vars(m)]
    mlps = [m for m in patched if fusable(m)]
    norms = [m for m in patched if type(m).__name__.endswith("RMSNorm")]
    assert mlps and norms and len(mlps) + len(norms) == len(patched)
    ids = prompt_ids(rows)
    with torch.inference_mode():
        # float32 sums of the norm in another order: rounding-level differences only
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_compact_model_writes_its_projections_into_buffers_that_it_reuses():
    model = tiny_model("qwen2")
    reference = compact(copy.deepcopy(model))  # compact, not fused: every product a fresh tensor
    fused = fuse(compact(copy.deepcopy(model)))
    ids = prompt_ids(3 * KERNEL_ROWS)
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)
        first = scratch.buffer("mlp.gate", (1,), torch.float32).data_ptr()
        fused(prompt_ids(2 * KERNEL_ROWS, seed=2))  # fewer rows: the same storage, not a new one
        assert scratch.buffer("mlp.gate", (1,), torch.float32).data_ptr() == first


def test_a_hooked_projection_runs_as_a_module_call():
    model = fuse(tiny_model("llama"))
    calls = []
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *args: calls.append(1))
    with torch.inference_mode():
        model(prompt_ids(3 * KERNEL_ROWS))
    assert calls == [1]


def test_only_plain_gated_mlps_are_touched():
    assert not fusable(torch.nn.Linear(4, 4))
    mlp = tiny_model("llama").model.layers[0].mlp
    assert fusable(mlp)
    mlp.act_fn = torch.nn.GELU()
    assert not fusable(mlp)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_bfloat16_model_rotates_and_gates_in_compiled_passes(arch, isa, monkeypatch):
    if not kernels.vectorised():
        pytest.skip(f"at {isa} the bfloat16 passes are PyTorch's (the portable build's 4-wide vectors are slower)")
    model = tiny_model(arch, head_dim=32).to(torch.bfloat16)
    modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original = getattr(modeling.apply_rotary_pos_emb, "draftapprox_original", modeling.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", original)  # the reference: transformers' own
    ids = prompt_ids(3 * KERNEL_ROWS)
    with torch.inference_mode():
        expected = model(ids).logits
    fused = fuse(copy.deepcopy(model))
    assert modeling.apply_rotary_pos_emb.draftapprox_original is original
    called = []
    real_call = kernels.call
    monkeypatch.setattr(kernels, "call", lambda name, *args: called.append(name) or real_call(name, *args))
    with torch.inference_mode():
        ours = fused(ids).logits
    layers = len(model.model.layers)
    assert called.count("rope") == layers and called.count("silu_mul_") == layers
    # the kernels give the reference's bits (tests/kernels); only the compiled norm's sums differ in order
    torch.testing.assert_close(ours.float(), expected.float(), atol=2e-2, rtol=2e-2)
    with torch.inference_mode():  # float32 keeps transformers' own rotary embedding
        called.clear()
        fused.float()(ids)
    assert "rope" not in called and "silu_mul_" not in called
