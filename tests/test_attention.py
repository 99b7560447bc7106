import pytest
import torch
import torch.nn.functional as F

from draftapprox import attention, kernels
from draftapprox.attention import single_query

pytestmark = pytest.mark.usefixtures("isa")  # the kernels and the choices of every level this CPU runs


@pytest.mark.parametrize("path", ["kernel", "matmul"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "n", "d"),
                         [(12, 2, 300, 64), (4, 4, 17, 64), (14, 2, 1, 64), (12, 2, 1000, 128), (6, 3, 40, 72)])
def test_single_query_equals_sdpa_on_a_view_of_a_larger_buffer(path, dtype, heads, kv_heads, n, d, monkeypatch):
    if path == "matmul":
        monkeypatch.setattr(attention, "_kernel_reads", lambda *tensors: False)
    elif not kernels.vectorised():
        pytest.skip("the portable build's kernels are not used (PyTorch's own loops are wider)")
    torch.manual_seed(0)
    buffer = torch.randn(2, kv_heads, n + 9, d, dtype=dtype)
    key, value = buffer[:, :, :n], torch.randn(2, kv_heads, n + 9, d, dtype=dtype)[:, :, :n]
    query = torch.randn(2, heads, 1, d, dtype=dtype)
    with torch.inference_mode():
        assert attention._kernel_reads(query, key, value) == (path == "kernel")
        ours = single_query(query, key, value, 0.125)
    ref = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), scale=0.125,
                                         enable_gqa=True).transpose(1, 2)
    assert ours.shape == (2, 1, heads, d) and ours.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(ours.float(), ref, **tol)


def _path(path: str, monkeypatch) -> None:
    """Send `causal` down one of its two paths: the compiled kernel (skipped where it is not built) or PyTorch's."""
    if path == "flash":
        monkeypatch.setattr(attention, "_prefill_kernel_reads", lambda *tensors: False)
    elif not kernels.vectorised():
        pytest.skip("the portable build's kernels are not used (PyTorch's own loops are wider)")
    else:
        monkeypatch.setattr(attention, "_prefill_kernel_pays", lambda *shape: True)  # whatever the probe said


@pytest.mark.parametrize("path", ["kernel", "flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "heads", "kv_heads", "n", "q", "d"),
                         [(1, 12, 2, 300, 100, 32), (1, 4, 4, 17, 17, 64), (1, 6, 2, 65, 2, 16),
                          (2, 14, 2, 129, 129, 64), (1, 7, 1, 200, 97, 128), (2, 3, 3, 64, 33, 80)])
def test_causal_equals_masked_sdpa(path, dtype, batch, heads, kv_heads, n, q, d, monkeypatch):
    _path(path, monkeypatch)
    torch.manual_seed(1)
    key = torch.randn(batch, kv_heads, n + 5, d, dtype=dtype)[:, :, :n]  # a view of a cache buffer with room
    value = torch.randn(batch, kv_heads, n + 5, d, dtype=dtype)[:, :, :n]
    query = torch.randn(batch, q, heads, d, dtype=dtype).transpose(1, 2)  # the layout attention modules pass
    mask = torch.ones(q, n, dtype=torch.bool).tril(n - q)  # the newest q positions: all before, causal among them
    ref = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask, scale=0.2,
                                         enable_gqa=True)
    with torch.inference_mode():
        assert attention._prefill_kernel_reads(query, key, value) == (path == "kernel")
        ours = attention.causal(query, key, value, 0.2)
    assert ours.shape == (batch, q, heads, d) and ours.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(ours.float(), ref.transpose(1, 2), **tol)


def test_causal_falls_back_where_the_kernel_does_not_reach(monkeypatch):
    """Head sizes not in whole vectors, gradients, mixed dtypes: PyTorch's path, with the same result."""
    monkeypatch.setattr(attention, "_prefill_kernel_pays", lambda *shape: True)
    key = torch.randn(1, 2, 40, 24)
    query = torch.randn(1, 4, 40, 24)
    assert not attention._prefill_kernel_reads(query, key, key)  # 24 columns
    with torch.inference_mode():
        key16, query16 = key[..., :16].contiguous(), query[..., :16].contiguous()
        assert not attention._prefill_kernel_reads(query16.bfloat16(), key16, key16)
    assert not attention._prefill_kernel_reads(query16, key16, key16)  # autograd on
    ref = F.scaled_dot_product_attention(query, key, key, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(attention.causal(query, key, key, 0.3), ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["kernel", "flash"])
def test_chunked_forward_equals_one_piece(path, monkeypatch):
    """Whole prompts and the chunks after the first take `causal`; the logits and the cache match an unchunked
    forward, and every layer of every chunk went down the chosen path."""
    from draftapprox.cache import new_cache
    from draftapprox.capture import prepare
    from draftapprox.forward import forward

    from .conftest import prompt_ids, tiny_model

    _path(path, monkeypatch)
    calls = []
    monkeypatch.setattr(attention, "_flash", lambda *a, **k: calls.append("flash") or torch.ops.aten.
                        _scaled_dot_product_flash_attention_for_cpu(*a, **k))
    monkeypatch.setattr(kernels, "call", lambda name, *a: calls.append(name) or getattr(kernels.load(), name)(*a))
    model, ids = prepare(tiny_model("qwen2")), prompt_ids(70)
    whole, pieces = new_cache(), new_cache()
    ref = forward(model, ids, whole, 0)
    calls.clear()
    ours = forward(model, ids, pieces, 0, chunk=32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pieces.layers[-1].keys, whole.layers[-1].keys)
    layers = len(model.model.layers)
    if path == "kernel":
        assert calls == ["prefill_attention"] * 3 * layers
    else:  # the first chunk one causal flash call a layer, the two after it two each
        assert calls == ["flash"] * 5 * layers


def test_the_prefill_probe_measures_once_and_remembers(monkeypatch, tmp_path):
    """The choice between the kernel and PyTorch is a measurement at the heads asked about, written beside the
    builds, and read back (not measured again) by the next process."""
    from draftapprox.kernels import probe

    if not kernels.vectorised():
        pytest.skip("the portable build's kernels are not used (PyTorch's own loops are wider)")
    monkeypatch.setenv("DRAFTAPPROX_CACHE", str(tmp_path))
    monkeypatch.setattr(attention, "PROBE_TOKENS", 256)
    monkeypatch.setattr(probe, "_decided", {})
    first = attention._prefill_kernel_pays(torch.float32, 4, 2, 32)
    [verdict] = probe.verdicts(kernels.build_key()).values()
    assert verdict["choice"] == ("kernel" if first else "pytorch") and set(verdict["seconds"]) == {"kernel", "pytorch"}
    assert all(0 < s < 10 for s in verdict["seconds"].values())
    monkeypatch.setattr(probe, "_decided", {})  # a new process: the file answers
    monkeypatch.setattr(probe, "best", lambda *a: pytest.fail("measured again"))
    assert attention._prefill_kernel_pays(torch.float32, 4, 2, 32) == first


def test_causal_on_other_devices_is_sdpa_with_the_newest_rows_causal():
    """Off the CPU `causal_tail` cannot call the CPU flash operator; its SDPA path gives the same attention (run
    here on CPU tensors, as a GPU would run it)."""
    torch.manual_seed(2)
    key, value = torch.randn(1, 2, 90, 32), torch.randn(1, 2, 90, 32)
    for q in (90, 17, 1):
        query = torch.randn(1, 6, q, 32)
        torch.testing.assert_close(attention._causal_sdpa(query, key, value, 0.2),
                                   attention.causal_tail(query, key, value, 0.2), atol=1e-5, rtol=1e-5)
