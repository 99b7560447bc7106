"""Shared fixtures: tiny randomly initialised decoders of every supported architecture, built in the test."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from draftapprox import kernels
from draftapprox.models.loading import pair_from_models

VOCAB = 512
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_model(arch: str = "qwen2", layers: int = 4, heads: int = 4, kv_heads: int = 2, seed: int = 0,
               context: int = 2048, attn: str = "sdpa", head_dim: int = 16):
    """A small decoder with random weights; GQA when kv_heads < heads. Scaled-up init gives peaky attention."""
    config_cls, model_cls = ARCHS[arch]
    extra = {"sliding_window": None} if arch == "mistral" else {}
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                        max_position_embeddings=context, tie_word_embeddings=False, initializer_range=0.2,
                        eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2, pad_token_id=VOCAB - 2,
                        attn_implementation=attn, **extra)
    torch.manual_seed(seed)
    return model_cls(config).eval()


def close_draft(target, noise: float = 0.05, seed: int = 2):
    """A draft that mostly agrees with `target`: its copy with noise on the output head. Speculative decoding
    needs proposals the target accepts and some it rejects; two independent random models agree on nothing."""
    import copy

    draft = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = draft.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, generator=generator) * noise)
    return draft


def tiny_tokenizer(shift: int = 0, chat: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `VOCAB` entries; `shift` permutes ids to make an incompatible twin; `chat`
    gives it a minimal chat template (RULER prompts are rendered through one)."""
    vocab = {f"w{i}": (i + shift) % (VOCAB - 2) for i in range(VOCAB - 2)}
    vocab.update({"<s>": VOCAB - 2, "</s>": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<s>",
                                   unk_token="w0")
    if chat:
        fast.chat_template = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                              "{% if add_generation_prompt %}<s> {% endif %}")
    return fast


def prompt_ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB - 2, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=kernels.executable())
def isa(request, monkeypatch) -> str:
    """Every kernel level this CPU can run, as `DRAFTAPPROX_KERNEL_ISA` chooses it: the kernels and every choice
    the engine makes from the level (what `auto` picks, which paths take the kernels) are those of a CPU with
    that level. Skips where no level builds (no compiler); a level that fails where another builds is a bug."""
    monkeypatch.setenv(kernels.ENV, request.param)
    kernels.reset()
    if kernels.built() is None:
        pytest.skip("no level of the kernels builds here (no C++ compiler)")
    assert kernels.built() == request.param, f"the kernels for {request.param} failed to build (see the warning)"
    yield request.param
    kernels.reset()


@pytest.fixture
def kernel(isa):
    """The compiled kernels' module, once per level (`isa`)."""
    return kernels.load()


@pytest.fixture(autouse=True, scope="module")
def _give_memory_back():
    """After each module, hand freed memory back to the system: glibc keeps a freed model's pages (a real pair's
    8 GB stays resident after it is freed), so modules that each load one would add up to more than the machine
    has within one pytest process."""
    yield
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(scope="module")
def real_pair():
    """The real offline pair (0.5B draft, 1.5B target), loaded once per module that needs it and freed after it:
    a loaded pair holds several GB, so two must never outlive their modules side by side. A test that patches the
    target restores it."""
    import draftapprox as da

    return da.load_pair()


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def pair(arch):
    """Target and draft of one architecture (GQA target, non-GQA draft), sharing a tokenizer."""
    return pair_from_models(tiny_model(arch, layers=4, seed=0), tiny_tokenizer(),
                            tiny_model(arch, layers=3, heads=4, kv_heads=4, seed=1))


@pytest.fixture
def qwen_pair():
    return pair_from_models(tiny_model("qwen2", layers=4, seed=0), tiny_tokenizer(),
                            tiny_model("qwen2", layers=3, heads=4, kv_heads=4, seed=1))


def save_tiny(directory, model, tokenizer) -> str:
    """Save a tiny model and its tokenizer as a local model directory. (Use Llama-type models here: for a
    `qwen2` config, AutoTokenizer rebuilds the word-level test tokenizer as a byte-level Qwen2Tokenizer.)"""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def tiny_pair_folders(root) -> None:
    """`root/target` and `root/draft`: a tiny Llama pair saved as local model directories (a server's --target and
    --draft), sharing a word-level tokenizer with a chat template."""
    save_tiny(root / "target", tiny_model("llama", layers=4, seed=0), tiny_tokenizer(chat=True))
    save_tiny(root / "draft", tiny_model("llama", layers=3, heads=4, kv_heads=4, seed=1), tiny_tokenizer(chat=True))


STAND_IN = """
import argparse, json
parser = argparse.ArgumentParser()
parser.add_argument("--requests")
parser.add_argument("--answers")
args, _ = parser.parse_known_args()
done = set()
try:
    done = {json.loads(line)["key"] for line in open(args.answers)}
except FileNotFoundError:
    pass
with open(args.answers, "a") as f:
    for line in open(args.requests):
        r = json.loads(line)
        if r["key"] in done:
            continue
BODY
        f.write(json.dumps({"key": r["key"], **row}) + "\\n")
"""


def stand_in_peer(tmp_path: Path, monkeypatch, name: str, body: str, *modules) -> Path:
    """Replace peer `name`'s worker by this interpreter running `body`, which turns each request `r` into `row`,
    the worker's answer (its key is added), with the worker's resume rule; the peer's environment counts as present.
    `modules`: modules besides `eval.peers` that imported its `python`."""
    from draftapprox.eval import peers

    worker = tmp_path / f"stand_in_{name}.py"
    worker.write_text(STAND_IN.replace("BODY", textwrap.indent(textwrap.dedent(body).strip("\n"), " " * 8)))
    for module in (peers, *modules):
        monkeypatch.setattr(module, "python", lambda peer, cache=None: Path(sys.executable))
    monkeypatch.setitem(peers.PEERS, name, peers.Peer(name, (), str(worker)))
    return worker
