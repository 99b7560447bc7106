"""Loading models and pairing a draft with a target that shares its tokenizer."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .. import kernels
from ..capture import prepare
from ..errors import ModelError
from . import offline, rates, scratch
from .compact import compact, is_compact, packable
from .fuse import fuse

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPACT = "bfloat16-weights"  # weights in bfloat16, products in float32 (models/compact.py)
CHOICES = ("auto", *DTYPES, "int8", COMPACT)


def auto_dtype(device: str | torch.device) -> str:
    """The precision a device computes fastest without losing the methods' accuracy: bfloat16 where the hardware
    has it (CUDA from Ampere on; CPUs whose AVX-512 BF16 or AMX beats float32, see `native_cpu_bf16`),
    float16 on older GPUs. A CPU without native bfloat16 emulates it, slower than float32, so there the weights
    are held in bfloat16 and multiplied in float32 (`COMPACT`: float32's prefill, half the bytes a decode step
    reads), or float32 where that kernel is not built with wide vectors (`kernels.vectorised`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "cpu" and native_cpu_bf16():
        return "bfloat16"
    if device.type == "cpu" and kernels.vectorised():
        return COMPACT
    return "float32"


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX) faster than float32. oneDNN also
    "supports" bfloat16 on any AVX-512 CPU by emulation, which is what `torch.ops.mkldnn._is_mkldnn_bf16_supported`
    reports, and emulated bfloat16 runs far slower than float32 (docs/results/archive/profile.md). Even the flag is not
    enough: some CPUs with AVX-512 BF16 but no AMX multiply bfloat16 slower than float32, others much faster
    (docs/results/index.md, the machine matrix). So where the flag is there, a short GEMM of each decides
    (`bf16_gemm_speedup`)."""
    return (kernels.has("avx512_bf16") or kernels.has("amx_bf16")) and bf16_gemm_speedup() > 1.1


@functools.cache
def bf16_gemm_speedup() -> float:
    """bfloat16's GEMM rate over float32's on this CPU, for a prefill-shaped multiply (best of 3 each, about a
    quarter of a second once per process)."""
    with torch.inference_mode():
        measured = [rates.gemm_rate(1536, 4096, dtype, rows=512, repeats=3) for dtype in (torch.bfloat16,
                                                                                            torch.float32)]
    return measured[0] / measured[1]


def check_device(device: str | torch.device) -> torch.device:
    """The device to load on, or a one-line error saying what is wrong with it, before any weights load."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda or torch.version.hip
            why = "no GPU is visible" if built else "this torch is a CPU-only build"
            raise ModelError(f"device {str(device)!r}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {str(device)!r}: there are {torch.cuda.device_count()} CUDA devices here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {str(device)!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"device {str(device)!r}: draftapprox runs on cpu, cuda or mps")
    return dev


def _quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Dynamic int8 quantisation of every linear layer (weights int8, activations quantised per call; VNNI on
    x86). CPU only; the attention and everything the capture wrapper sees stay float32."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch flags the eager-mode quantisation API as deprecated, not removed
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


@dataclass
class Pair:
    """A target, an optional draft of the same tokenizer, and that tokenizer."""

    target: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    draft: PreTrainedModel | None = None

    @property
    def context_length(self) -> int:
        return int(getattr(self.target.config.get_text_config(), "max_position_embeddings", 0) or 0)

    @property
    def eos_ids(self) -> frozenset[int]:
        ids = set()
        for source in (getattr(self.tokenizer, "eos_token_id", None),
                       getattr(self.target.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return frozenset(ids)


def _resolve(source: str | Path | None, cache: str | Path | None) -> tuple[Path | str, str | None]:
    """(path or hub id, gguf file name) for a source; offline names are fetched into the cache on first use."""
    if source is None:
        source = offline.TARGET.name
    text = str(source)
    if text in offline.OFFLINE_MODELS:
        return offline.fetch(text, cache), None
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model directory (no config.json)")
        return path, None
    if path.exists() or text.startswith((".", "/", "~")):
        raise ModelError(f"model not found: {path}")
    return text, None  # a Hugging Face hub id


def load_model(source: str | Path | None = None, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
               threads: int | None = None, attn_implementation: str = "sdpa",
               cache: str | Path | None = None,
               log: Callable[[str], None] | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub id, a local directory, a `.gguf` file or an offline name.

    `dtype`: a torch dtype or one of `CHOICES`; "auto" picks by device (`auto_dtype`), "int8" loads float32 and
    quantises the linear layers dynamically (CPU only). The model is prepared for attention capture (see
    `capture.prepare`) and put in eval mode. transformers' per-tensor progress bar is silenced; `log` gets one
    line per model instead, once it is loaded.
    """
    began = time.perf_counter()
    device_type = check_device(device).type
    if threads is not None:
        if threads < 1:
            raise ModelError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if isinstance(dtype, str):
        if dtype not in CHOICES:
            raise ModelError(f"dtype must be one of {', '.join(CHOICES)}, got {dtype!r}")
        dtype = auto_dtype(device) if dtype == "auto" else dtype
    int8, compacted = dtype == "int8", dtype == COMPACT
    if (int8 or compacted) and device_type != "cpu":
        raise ModelError(f"dtype {dtype} runs on the CPU only, not on {device}")
    if isinstance(dtype, str):
        # bfloat16-weights loads in bfloat16 (never the float32 model's twice the bytes), then widens all but the
        # linear layers' weights (models/compact.py)
        dtype = DTYPES["float32" if int8 else "bfloat16" if compacted else dtype]
    location, gguf_file = _resolve(source, cache)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation=attn_implementation,
                                                     **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {source}: {first}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    count = sum(p.numel() for p in model.parameters())
    if device_type == "cpu":
        scratch.keep_heap()  # a forward's activations reused, not faulted in anew each layer (models/scratch.py)
    model = fuse(model.to(device).eval())
    if compacted:
        model = compact(model)
    elif dtype == torch.bfloat16 and device_type == "cpu" and kernels.vectorised():
        # bfloat16 still, decode steps through the kernel, prefill from packed weights (models/compact.py)
        model = compact(model, widen=False, pack=_pack())
    model = prepare(_quantize_int8(model) if int8 else model)
    if log is not None:
        log(f"loaded {source if source is not None else offline.TARGET.name}: {count / 1e9:.2f}B parameters, "
            f"{precision(model)} on {device}, {time.perf_counter() - began:.1f} s")
    return model, tokenizer


def _pack() -> bool:
    """Whether a bfloat16 CPU model also holds packed weights: where bfloat16 is native (a prefill is GEMM-bound,
    and the packed layout is what oneDNN's AMX and AVX-512 BF16 kernels read), unless
    `DRAFTAPPROX_PACKED_WEIGHTS=0` asks to save their memory."""
    return os.environ.get("DRAFTAPPROX_PACKED_WEIGHTS", "1") != "0" and packable() and native_cpu_bf16()


def precision(model: PreTrainedModel) -> str:
    """What a loaded model computes in: "int8" for dynamically quantised linear layers, else its dtype."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    if any(isinstance(m, DynamicInt8Linear) for m in model.modules()):
        return "int8"
    if is_compact(model) and model.dtype == torch.float32:
        return COMPACT
    return str(model.dtype).removeprefix("torch.")


def check_tokenizers(draft: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase) -> None:
    """Raise naming the first difference unless both tokenizers map every string to the same ids."""
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        a, b = getattr(draft, attr, None), getattr(target, attr, None)
        if a != b:
            raise ModelError(f"draft and target tokenizers differ: {attr} is {a} in the draft, {b} in the target")
    va, vb = draft.get_vocab(), target.get_vocab()
    if len(va) != len(vb):
        raise ModelError(f"draft and target tokenizers differ: vocabularies of {len(va)} and {len(vb)} entries")
    for token, index in sorted(va.items(), key=lambda item: item[1]):
        if vb.get(token) != index:
            raise ModelError(f"draft and target tokenizers differ: token {token!r} is id {index} in the draft, "
                             f"{vb.get(token)} in the target")
    probe = "Draft-based approximate inference: 12345 + ünïcode 日本語 \n\tdef f(x): return x**2"
    if draft.encode(probe) != target.encode(probe):
        raise ModelError("draft and target tokenizers differ: same vocabulary but different merges or normalisation")


def load_pair(draft: str | Path | None = None, target: str | Path | None = None, *, with_draft: bool = True,
              with_target: bool = True, draft_dtype: str | torch.dtype | None = None, **kwargs) -> Pair:
    """Load a draft/target pair (default: the offline Qwen2.5-Coder 0.5B/1.5B) and check they share a tokenizer.

    `draft_dtype` (default: the target's `dtype`) lets the draft run cheaper than the target, e.g. int8.
    `with_target=False` loads only the draft and its tokenizer, and the draft stands in the target's place: for a
    prompt method that never reads the target (`compress` with SpecPC), whose tokenizer is the draft's by the
    pair's contract."""
    if not with_target:
        if draft_dtype is not None:
            kwargs["dtype"] = draft_dtype
        model, tokenizer = load_model(draft if draft is not None else offline.DRAFT.name, **kwargs)
        return Pair(model, tokenizer, model)
    target_model, tokenizer = load_model(target if target is not None else offline.TARGET.name, **kwargs)
    if not with_draft:
        return Pair(target_model, tokenizer)
    if draft_dtype is not None:
        kwargs["dtype"] = draft_dtype
    draft_model, draft_tokenizer = load_model(draft if draft is not None else offline.DRAFT.name, **kwargs)
    check_tokenizers(draft_tokenizer, tokenizer)
    return Pair(target_model, tokenizer, draft_model)


def pair_from_models(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     draft: PreTrainedModel | None = None) -> Pair:
    """Wrap models the caller already holds (prepares them for capture)."""
    return Pair(prepare(target.eval()), tokenizer, prepare(draft.eval()) if draft is not None else None)
