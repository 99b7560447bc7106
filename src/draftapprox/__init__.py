"""draftapprox: draft-based approximate inference (SpecKV, SpecPC, SpecKV-PC) for long-context LLMs."""

from .errors import ConfigError, DraftApproxError, FetchError, InputError, ModelError
from .generation import (
    Compression,
    DecodeBatch,
    Prepared,
    Record,
    Result,
    Sampling,
    compress,
    generate,
    generate_batched,
    new_state,
    prepare,
)
from .integrations.transformers import last_record, patch, patched, unpatch
from .methods import (
    LAQ,
    METHODS,
    AdaKV,
    AdaSpecKV,
    FullKV,
    PyramidKV,
    RandomPC,
    RecencyPC,
    SnapKV,
    SpecKV,
    SpecKVPC,
    SpecPC,
    SpecPrefill,
    StreamingLLM,
    TargetPC,
    VeriSpecKV,
    make,
)
from .models.loading import Pair, check_tokenizers, load_model, load_pair, pair_from_models

__version__ = "0.1.0"

__all__ = [
    "LAQ", "METHODS", "AdaKV", "AdaSpecKV", "Compression", "ConfigError", "DecodeBatch", "DraftApproxError",
    "FetchError", "FullKV", "InputError", "ModelError", "Pair", "Prepared", "PyramidKV", "RandomPC", "RecencyPC",
    "Record", "Result", "Sampling", "SnapKV", "SpecKV", "SpecKVPC", "SpecPC", "SpecPrefill", "StreamingLLM",
    "TargetPC", "VeriSpecKV", "check_tokenizers", "compress", "generate", "generate_batched", "last_record",
    "load_model", "load_pair", "make", "new_state", "pair_from_models", "patch", "patched", "prepare", "unpatch",
]
