"""Every method, by its command-line name (the lowercase class name)."""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from .adakv import AdaKV
from .adaspeckv import AdaSpecKV
from .base import KVMethod, KVSelection, Method, PromptMethod
from .fullkv import FullKV
from .laq import LAQ
from .pyramidkv import PyramidKV
from .randompc import RandomPC
from .recencypc import RecencyPC
from .scorer import ScorerKV
from .snapkv import SnapKV
from .speckv import SpecKV
from .speckvpc import SpecKVPC
from .specpc import SpecPC
from .specprefill import SpecPrefill
from .streamingllm import StreamingLLM
from .targetpc import TargetPC
from .verispeckv import VeriSpecKV

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (FullKV, StreamingLLM, SnapKV, PyramidKV, AdaKV, SpecKV, AdaSpecKV, VeriSpecKV, LAQ,
                SpecPC, RandomPC, RecencyPC, TargetPC, SpecPrefill, SpecKVPC)
}

__all__ = ["LAQ", "METHODS", "AdaKV", "AdaSpecKV", "FullKV", "KVMethod", "KVSelection", "Method", "PromptMethod",
           "PyramidKV", "RandomPC", "RecencyPC", "ScorerKV", "SnapKV", "SpecKV", "SpecKVPC", "SpecPC", "SpecPrefill",
           "StreamingLLM", "TargetPC", "VeriSpecKV", "knob_fields", "make", "parse_budget", "parse_setting"]


def parse_budget(text: str) -> int | float:
    """'256' is 256 tokens; '0.25' (anything with a dot) is a ratio of the prompt."""
    try:
        return float(text) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        raise ConfigError(f"budget must be a token count (256) or a ratio (0.25), got {text!r}") from None


def parse_setting(item: str) -> tuple[str, str]:
    """' window = 8' -> ("window", "8"). The one reader of a knob setting, so that `--set` and `speckv(...)` accept
    the same things; an empty value is refused, as no knob reads it."""
    key, eq, value = item.partition("=")
    if not eq or not key.strip() or not value.strip():
        raise ConfigError(f"{item.strip()!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def knob_fields(cls: type[Method]) -> list[dataclasses.Field]:
    """Knobs settable on a method; a wrapper (AdaKV) also exposes its scorer's knobs."""
    fields = cls.knobs()
    scorer = next((f for f in dataclasses.fields(cls) if f.name == "scorer"), None)
    if scorer is not None:
        own = {f.name for f in fields}
        fields += [f for f in scorer.default_factory().knobs() if f.name not in own]
    return fields


def _convert(field: dataclasses.Field, raw: object) -> object:
    if not isinstance(raw, str):
        return raw
    kind = str(field.type)  # annotations are strings here (postponed evaluation)
    if raw.lower() in ("none", "null") and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if kind.startswith("int | float"):
            return parse_budget(raw)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except (ValueError, ConfigError):
        raise ConfigError(f"knob {field.name}: cannot read {raw!r} as {kind}") from None
    return raw


def make(name: str, budget: int | float | None = None, **knobs: object) -> Method:
    """Build a method by name; knob values may be strings (from the command line) and are converted."""
    cls = METHODS.get(name.lower())
    if cls is None:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    own = {f.name: f for f in cls.knobs()}
    scorer_knobs = {}
    kwargs: dict[str, object] = {}
    if budget is not None:
        kwargs["budget"] = budget
    fields = {f.name: f for f in knob_fields(cls)}
    for key, raw in knobs.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ConfigError(f"{name}: unknown knob {key!r} (knobs: {known})")
        value = _convert(fields[key], raw)
        (kwargs if key in own else scorer_knobs)[key] = value
    if scorer_knobs:
        scorer_cls = type(next(f for f in dataclasses.fields(cls) if f.name == "scorer").default_factory())
        kwargs["scorer"] = scorer_cls(**scorer_knobs)
    return cls(**kwargs)

