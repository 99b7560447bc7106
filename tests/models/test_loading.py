import pytest

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
