"""The reference implementation's API (furiosa-ai/draft-based-approx-llm): `patch_model(model, draft_model, config)`
with its `SpecKVConfig`, `SpecPCConfig` and `SpecKVPCConfig`, whose fields and defaults are the reference's own, and
a patched `generate` that returns what the reference's returns (`.sequences`, `.input_size`, `.output_ids`). The
reference README's snippets run with `from draftapprox.reference_api import ...` in place of
`from draft_approx_llm import ...`; underneath, our methods run inside the model's own `generate` (`patch`), so
sampling works too, which the reference leaves to do.

A field set to what our methods cannot do is refused by name rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from ..errors import ConfigError, InputError
from ..methods import SpecKV, SpecKVPC, SpecPC
from .transformers import last_kept_ids, patch


@dataclass
class DraftApproxLLMConfig:
    """The reference's shared fields, with its defaults."""

    max_capacity_prompt: int | None = 1024
    window_size: int = 64
    pool_type: str = "max"
    kernel_size: int = 64
    reduction_type: str = "max"
    lookahead_tokens: int | None = 1

    @staticmethod
    def from_dict(config: dict) -> DraftApproxLLMConfig:
        """A config from the reference's `sparse_config` block (its `sparse_type` names the method)."""
        rest = dict(config)
        kind = rest.pop("sparse_type", None)
        classes = {"speckv": SpecKVConfig, "specpc": SpecPCConfig, "speckvpc": SpecKVPCConfig}
        if kind not in classes:
            raise ConfigError(f"sparse_type must be one of {', '.join(classes)}, got {kind!r}")
        return classes[kind](**rest)

    def method(self):
        raise NotImplementedError


def _capacity(config: DraftApproxLLMConfig, name: str) -> int:
    if config.max_capacity_prompt is None:
        raise ConfigError(f"{name}: max_capacity_prompt=None (sparse prefill without compressing the cache) is not "
                          "supported here; give the number of KV pairs to keep")
    return config.max_capacity_prompt


@dataclass
class SpecKVConfig(DraftApproxLLMConfig):
    lookahead_tokens: int | None = None  # None: the draft writes max_new_tokens
    prefill_window_size: int = 2048
    prefill_vertical_size: int = 2048

    @property
    def sparse_type(self) -> str:
        return "speckv"

    def method(self) -> SpecKV:
        # the reference prefills with its vertical-slash sparse attention where the prompt is longer than both
        # prefill sizes together; so does ours
        return SpecKV(budget=_capacity(self, "SpecKVConfig"), window=self.window_size, kernel=self.kernel_size,
                      pool=self.pool_type, reduction=self.reduction_type, lookahead=self.lookahead_tokens,
                      sparse_prefill=True, prefill_window=self.prefill_window_size,
                      prefill_vertical=self.prefill_vertical_size)


@dataclass
class SpecPCConfig(DraftApproxLLMConfig):
    lookahead_tokens: int | None = 1
    neighbor_tokens: int | None = None  # None: kernel_size
    starting_layer_index: int = 0
    weighted_query: bool = True

    def __post_init__(self) -> None:
        if self.neighbor_tokens is None:
            self.neighbor_tokens = self.kernel_size

    @property
    def sparse_type(self) -> str:
        return "specpc"

    def method(self) -> SpecPC:
        if self.lookahead_tokens is None:
            raise ConfigError("SpecPCConfig: lookahead_tokens=None is not supported here; give a number of draft "
                              "tokens (the reference's default is 1)")
        pool = "mean" if self.pool_type == "avg" else self.pool_type
        return SpecPC(budget=_capacity(self, "SpecPCConfig"), window=self.window_size, lookahead=self.lookahead_tokens,
                      pool=pool, kernel=self.kernel_size, neighbors=self.neighbor_tokens,
                      reduction=self.reduction_type, start_layer=self.starting_layer_index,
                      weighted=self.weighted_query)


@dataclass
class SpecKVPCConfig(DraftApproxLLMConfig):
    specpc_config: SpecPCConfig = field(default_factory=SpecPCConfig)
    speckv_config: SpecKVConfig = field(default_factory=SpecKVConfig)

    def __post_init__(self) -> None:
        if isinstance(self.specpc_config, dict):
            self.specpc_config = SpecPCConfig(**self.specpc_config)
        if isinstance(self.speckv_config, dict):
            self.speckv_config = SpecKVConfig(**self.speckv_config)

    @property
    def sparse_type(self) -> str:
        return "speckvpc"

    def method(self) -> SpecKVPC:
        pc, kv = self.specpc_config, self.speckv_config
        fixed = [("specpc_config.neighbor_tokens", pc.neighbor_tokens, pc.kernel_size),
                 ("specpc_config.weighted_query", pc.weighted_query, True),
                 ("specpc_config.pool_type", pc.pool_type, "max"),
                 ("specpc_config.reduction_type", pc.reduction_type, "max"),
                 ("speckv_config.pool_type", kv.pool_type, "max"),
                 ("speckv_config.reduction_type", kv.reduction_type, "max")]
        for name, value, only in fixed:
            if value != only:
                raise ConfigError(f"SpecKVPCConfig: {name}={value!r} is not supported here (the cascade runs "
                                  f"with {only!r})")
        return SpecKVPC(budget=_capacity(kv, "speckv_config"), prompt_budget=_capacity(pc, "specpc_config"),
                        pc_window=pc.window_size, pc_kernel=pc.kernel_size, pc_start_layer=pc.starting_layer_index,
                        lookahead=pc.lookahead_tokens, window=kv.window_size, kernel=kv.kernel_size)


@dataclass
class DraftApproxLLMModelOutput:
    """What the reference's patched `generate` returns: `sequences` (the prompt it generated from, compressed for
    the prompt methods, then the new tokens) and `input_size`, that prompt's length."""

    sequences: torch.Tensor
    input_size: int

    @property
    def input_ids(self) -> torch.Tensor:
        return self.sequences[:, :self.input_size]

    @property
    def output_ids(self) -> torch.Tensor:
        return self.sequences[:, self.input_size:]


def patch_model(model: PreTrainedModel, draft_model: PreTrainedModel, config: DraftApproxLLMConfig
                ) -> PreTrainedModel:
    """The reference's `patch_model`: `model.generate(input_ids, max_new_tokens=..., ...)` then applies `config`'s
    method with `draft_model` and returns a `DraftApproxLLMModelOutput`."""
    if not isinstance(config, SpecKVConfig | SpecPCConfig | SpecKVPCConfig):
        raise ConfigError(f"config must be a SpecKVConfig, SpecPCConfig or SpecKVPCConfig, got "
                          f"{type(config).__name__}")
    patch(model, draft_model, config.method())
    inner = model.generate

    def generate(input_ids: torch.Tensor | None = None, *args, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None, return_dict_in_generate: bool = False,
                 **kwargs) -> DraftApproxLLMModelOutput:
        if args:
            raise InputError("the patched generate takes input_ids, then keywords only")
        input_ids = input_ids if input_ids is not None else kwargs.pop("inputs", None)
        out = inner(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                    return_dict_in_generate=True, **kwargs)  # the reference answers the same whatever was asked
        n = input_ids.shape[1]
        kept = last_kept_ids(model)
        prompt = input_ids if kept is None or isinstance(config, SpecKVConfig) else kept.to(input_ids.device)
        return DraftApproxLLMModelOutput(torch.cat([prompt, out.sequences[:, n:]], dim=1), prompt.shape[1])

    model.generate = generate
    return model


__all__ = ["DraftApproxLLMConfig", "DraftApproxLLMModelOutput", "SpecKVConfig", "SpecKVPCConfig", "SpecPCConfig",
           "patch_model"]
