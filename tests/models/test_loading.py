import pytest
import torch

from draftapprox.errors import ModelError
from draftapprox.models.loading import check_tokenizers, load_model, load_pair

from ..conftest import save_tiny, tiny_model, tiny_tokenizer


def test_tokenizer_check_names_the_first_difference():
    check_tokenizers(tiny_tokenizer(), tiny_tokenizer())
    with pytest.raises(ModelError, match="unk_token_id is 0 in the draft, 1 in the target"):
        check_tokenizers(tiny_tokenizer(), tiny_tokenizer(shift=1))
    vocab = {**tiny_tokenizer().get_vocab(), "w5": 6, "w6": 5}
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<s>",
                                    unk_token="w0")
    with pytest.raises(ModelError, match="token 'w5' is id 5 in the draft, 6 in the target"):
        check_tokenizers(tiny_tokenizer(), other)


def save(tmp_path, name, arch="llama", tokenizer=None, **kwargs):
    return save_tiny(tmp_path / name, tiny_model(arch, **kwargs), tokenizer or tiny_tokenizer())


def test_load_from_local_directories_and_pair_check(tmp_path):
    target, draft = save(tmp_path, "t"), save(tmp_path, "d", layers=2)
    pair = load_pair(draft, target, threads=1)
    assert pair.target.config._attn_implementation == "draftapprox_sdpa"
    assert pair.draft.config.num_hidden_layers == 2
    other = save(tmp_path, "o", tokenizer=tiny_tokenizer(shift=3))
    with pytest.raises(ModelError, match="tokenizers differ"):
        load_pair(other, target)


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "absent.gguf")
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "absent"))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF but not really" * 10)
    with pytest.raises(ModelError, match="cannot load"):
        load_model(corrupt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelError, match="dtype"):
        load_model(tmp_path / "empty", dtype="float8")


@pytest.mark.parametrize(("device", "message"), [
    ("gpu", "unknown device 'gpu'"),
    ("meta", "runs on cpu, cuda or mps"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                           reason="a GPU is here")),
    pytest.param("cuda:99", "CUDA devices here", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="no GPU here")),
])
def test_a_device_that_cannot_be_used_is_refused_before_loading(tmp_path, device, message):
    with pytest.raises(ModelError, match=message):
        load_model(tmp_path / "absent", device=device)  # refused before the missing model is noticed


def test_dtypes_auto_int8_and_a_cheaper_draft(tmp_path, monkeypatch):
    from draftapprox.generation import generate
    from draftapprox.methods import make
    from draftapprox.models import loading

    target, draft = save(tmp_path, "t"), save(tmp_path, "d", layers=2)
    speedup = loading.bf16_gemm_speedup()  # the real probe: the ratio of two rates measured here
    assert speedup > 0 and loading.native_cpu_bf16() == ((loading.kernels.has("avx512_bf16")
                                                         or loading.kernels.has("amx_bf16")) and speedup > 1.1)
    monkeypatch.setattr(loading.kernels, "has", lambda feature: False)  # no native bfloat16: emulated
    monkeypatch.setattr(loading.kernels, "vectorised", lambda: True)
    # emulated bfloat16 is slower than float32: weights in bfloat16, products in float32 where the kernel is
    # built with wide vectors, else plain float32
    assert loading.auto_dtype("cpu") == "bfloat16-weights"
    monkeypatch.setattr(loading.kernels, "vectorised", lambda: False)
    assert loading.auto_dtype("cpu") == "float32"
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(loading.kernels, "has", lambda feature, flag=flag: feature == flag)
        monkeypatch.setattr(loading, "bf16_gemm_speedup", lambda: 1.9)
        assert loading.auto_dtype("cpu") == "bfloat16"
        # the flag without the speed (AVX-512 BF16 but no AMX, measured slower than float32 on a Xeon): as if
        # emulated (float32 here, where the kernel was made unavailable above)
        monkeypatch.setattr(loading, "bf16_gemm_speedup", lambda: 0.6)
        assert loading.auto_dtype("cpu") == "float32"
    monkeypatch.setattr(loading.kernels, "has", lambda feature: False)
    assert loading.precision(load_model(target, dtype="auto")[0]) == "float32"

    pair = load_pair(draft, target, dtype="float32", draft_dtype="int8")
    assert loading.precision(pair.target) == "float32" and loading.precision(pair.draft) == "int8"
    result = generate(pair, torch.randint(0, 500, (1, 120)), make("specpc", 0.5, start_layer=0, window=16,
                                                                   kernel=9), max_new_tokens=3)
    assert len(result.tokens) >= 1
    monkeypatch.setattr(loading, "check_device", torch.device)  # as if a GPU were here
    with pytest.raises(ModelError, match="CPU only"):
        load_model(target, dtype="int8", device="cuda")
    with pytest.raises(ModelError, match="dtype must be one of auto, float32"):
        load_model(target, dtype="float8")
