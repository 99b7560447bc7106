"""Weights in bfloat16, products in float32: the kernel and the widened GEMM against float32 on rounded weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import draftapprox as da
from draftapprox import kernels
from draftapprox.models import fuse as fuse_module
from draftapprox.models.compact import KERNEL_ROWS, PACKED_ROWS, CompactLinear, compact, is_compact, packable
from draftapprox.models.fuse import fuse
from draftapprox.models.loading import pair_from_models, precision

from ..conftest import prompt_ids, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("isa")  # every level's kernel, and its choices


def _rounded(linear: torch.nn.Linear) -> torch.nn.Linear:
    out = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    out.weight.data = linear.weight.data.bfloat16().float()
    if linear.bias is not None:
        out.bias.data = linear.bias.data.clone()
    return out


def test_the_kernel_builds_here(isa):
    module = kernels.load()
    assert module is not None  # gcc and ninja are on every machine we run on, CI included
    assert module.isa() == kernels.built() == isa
    assert kernels.vectorised() == (isa != "portable")


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 33, KERNEL_ROWS, KERNEL_ROWS + 1, 300])
@pytest.mark.parametrize(("inputs", "outputs", "bias"), [(64, 96, True), (203, 517, False), (16, 1, True)])
def test_compact_linear_equals_float32_on_the_rounded_weights(rows, inputs, outputs, bias):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(inputs, outputs, bias=bias)
    x = torch.randn(2, rows, inputs)[:, :, :]  # (batch, rows, features): rows = 2 * rows in all
    ours = CompactLinear(linear)
    assert ours.weight.dtype == torch.bfloat16
    torch.testing.assert_close(ours(x), _rounded(linear)(x), atol=1e-5, rtol=1e-5)


def test_compact_model_decodes_like_model_generate_on_the_rounded_weights():
    model = tiny_model("qwen2")
    reference = tiny_model("qwen2")
    for module in reference.modules():
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, _rounded(child))
    pair = pair_from_models(compact(model), tiny_tokenizer())
    assert is_compact(pair.target) and precision(pair.target) == "bfloat16-weights"
    assert pair.target.get_input_embeddings().weight.dtype == torch.float32  # a lookup: left as it is
    ids = prompt_ids(90)
    ours = da.generate(pair, ids, da.FullKV(), max_new_tokens=10, ignore_eos=True).tokens
    with torch.inference_mode():
        ref = reference.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, 90:].tolist()
    assert ours == ref
    kv = da.generate(pair, ids, da.SnapKV(32, window=8), max_new_tokens=4)
    assert kv.record.kv_bytes_kept < kv.record.kv_bytes_full


@pytest.mark.parametrize("rows", [1, 5, KERNEL_ROWS + 1])
def test_compact_linear_on_bfloat16_rows_is_the_bfloat16_linear(rows):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(203, 517).to(torch.bfloat16)
    x = torch.randn(rows, 203, dtype=torch.bfloat16)
    ours = CompactLinear(linear, torch.bfloat16)
    assert ours.weight.data_ptr() == linear.weight.data_ptr() and ours(x).dtype == torch.bfloat16
    # float32 sums of the same bfloat16 products, rounded once: within bfloat16's rounding of the library's
    reference = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    torch.testing.assert_close(ours(x).float(), reference, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("rows", [1, 5])
def test_bfloat16_rows_are_the_float32_sums_rounded_once(rows):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, 203, dtype=torch.bfloat16), torch.randn(517, 203, dtype=torch.bfloat16)
    bias = torch.randn(517, dtype=torch.bfloat16)
    wide = kernels.load().linear_bf16(x.float(), w, bias.float())
    assert torch.equal(kernels.load().linear_bf16(x, w, bias), wide.to(torch.bfloat16))


def test_a_bfloat16_model_keeps_its_precision_and_decodes_through_the_kernel():
    model = tiny_model("qwen2").to(torch.bfloat16)
    reference = tiny_model("qwen2").to(torch.bfloat16)
    pair = pair_from_models(compact(model, widen=False), tiny_tokenizer())
    assert is_compact(pair.target) and precision(pair.target) == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in pair.target.parameters())
    ids = prompt_ids(90)
    with torch.inference_mode():
        ours = pair.target(ids[:, -1:]).logits.float()  # one row: the kernel
        ref = reference(ids[:, -1:]).logits.float()
    torch.testing.assert_close(ours, ref, atol=0.1, rtol=0.05)
    result = da.generate(pair, ids, da.FullKV(), max_new_tokens=6, ignore_eos=True)
    assert len(result.tokens) == 6
    with pytest.raises(ValueError, match="takes a bfloat16 model"):
        compact(tiny_model("qwen2"), widen=False)


def needs_onednn() -> None:
    if not packable():
        pytest.skip("oneDNN cannot pack bfloat16 weights here (no oneDNN, or no AVX-512/AVX-NE-CONVERT at this level)")


@pytest.mark.parametrize("rows", [1, PACKED_ROWS, PACKED_ROWS + 1, 300])
def test_a_packed_linear_equals_the_bfloat16_linear_and_keeps_its_weight(rows):
    needs_onednn()
    torch.manual_seed(rows)
    linear = torch.nn.Linear(203, 517).to(torch.bfloat16)
    ours = CompactLinear(linear, torch.bfloat16)
    ours.pack()
    x = torch.randn(2, rows, 203, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert ours.packed_for(x) == (2 * rows > PACKED_ROWS)
        out = ours(x)
    assert out.shape == (2, rows, 517) and out.dtype == torch.bfloat16
    assert ours.weight.data_ptr() == linear.weight.data_ptr()  # the plain weight stays, for the kernel
    reference = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=1e-2)
    assert not ours.packed_for(x.requires_grad_())  # oneDNN's packed product has no gradient


def test_a_packed_model_prefills_and_decodes_like_the_plain_bfloat16_model():
    needs_onednn()
    reference = tiny_model("qwen2").to(torch.bfloat16)
    model = fuse(compact(tiny_model("qwen2").to(torch.bfloat16), widen=False, pack=True))
    linears = [m for m in model.modules() if isinstance(m, CompactLinear)]
    head = model.get_output_embeddings()
    assert all((m.packed is None) == (m is head) for m in linears)
    assert "packed" in repr(model.model.layers[0].mlp.gate_proj)
    ids = prompt_ids(300)
    with torch.inference_mode():  # 300 rows: the MLP in blocks of packed products
        assert fuse_module._blocked(model.model.layers[0].mlp, torch.zeros(1, 300, 64, dtype=torch.bfloat16))
        torch.testing.assert_close(model(ids).logits.float(), reference(ids).logits.float(), atol=0.1, rtol=0.05)
    pair = pair_from_models(model, tiny_tokenizer())
    assert len(da.generate(pair, ids[:, :90], da.FullKV(), max_new_tokens=6, ignore_eos=True).tokens) == 6
    with pytest.raises(ValueError, match="pack=True"):
        compact(tiny_model("qwen2"), pack=True)


def test_compact_refuses_a_gpu_model():
    model = tiny_model("llama")
    model.to("meta")
    with pytest.raises(ValueError, match="CPU precision"):
        compact(model)
