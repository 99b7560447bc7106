"""An LLMLingua-compatible `PromptCompressor` whose compression is a draftapprox prompt method (SpecPC by default).

Code written for llmlingua 0.2.2 (`PromptCompressor(model_name).compress_prompt(context, instruction=...,
question=..., rate=...)`, LangChain's `LLMLinguaCompressor`, LlamaIndex's `LongLLMLinguaPostprocessor`) runs
unchanged: the same constructor and `compress_prompt` signature, defaults and result keys, but for two defaults:
`model_name` names the draft (the offline Qwen2.5-Coder 0.5B), which scores the prompt with its attention (no
target is needed to compress), and `device_map` is "cpu" ("cuda..." loads on the GPU; other maps run on the CPU).

What llmlingua's perplexity ranker needed (its iteration size, its context-level budget knobs, its rank method) is
accepted and listed in the result's `draftapprox` record as not applied: the draft replaces that ranker. What
would change the output and is not implemented here (LLMLingua-2, sentence-level filtering, context segments,
`structured_compress_prompt`, `recover`) is refused by name.

Token counts are the draft tokenizer's, where llmlingua counts `origin_tokens`/`compressed_tokens` with GPT-3.5's
tiktoken encoding (this module needs neither llmlingua nor tiktoken).
"""

from __future__ import annotations

import inspect
import re
import time

from .. import parts
from ..errors import ConfigError
from ..methods import Method, SpecPC, TargetPC
from ..models import offline
from ..models.loading import Pair, load_pair

# llmlingua's own ranker (and LLMLingua-2's knobs, which its v1 `compress_prompt` ignores too): the draft's
# attention replaces it, so these are accepted and reported as not applied
RANKER_KNOBS = ("iterative_size", "use_context_level_filter", "use_token_level_filter", "keep_split",
                "high_priority_bonus", "context_budget", "token_budget_ratio", "condition_in_question",
                "dynamic_context_compression_ratio", "condition_compare", "add_instruction", "rank_method",
                "force_context_number", "token_to_word", "word_sep", "label_sep", "chunk_end_tokens",
                "strict_preserve_uncompressed", "return_word_label", "force_reserve_digit", "drop_consecutive",
                "target_context", "context_level_rate", "context_level_target_token")
# what llmlingua 0.2.2 does with them would change the output, and is not implemented: refused when set
REFUSED_KNOBS = {"use_sentence_level_filter": "sentence-level filtering", "keep_first_sentence": "sentence-level "
                 "filtering", "keep_last_sentence": "sentence-level filtering", "keep_sentence_number":
                 "sentence-level filtering", "context_segs": "context segments", "context_segs_rate":
                 "context segments", "context_segs_compress": "context segments"}
REORDERS = ("original", "sort", "two_stage")
# LangChain's LLMLinguaCompressor wraps each document in `<#refN#>` tags (and blank lines) and finds its metadata
# again from them after compression: they are kept whole, as are `force_tokens`
REFERENCE_TAG = r"\s*<#ref\d+#>\s*"
LOAD_OPTIONS = frozenset({"dtype", "threads", "attn_implementation", "cache"})  # what `model_config` may set


class PromptCompressor:
    """llmlingua's `PromptCompressor`; `pair=` reuses a loaded pair (its draft scores), `method=` picks the prompt
    method (an instance or a name of `draftapprox methods`; default SpecPC with its reference settings)."""

    def __init__(self, model_name: str = offline.DRAFT.name, device_map: str = "cpu", model_config: dict | None = None,
                 open_api_config: dict | None = None, use_llmlingua2: bool = False,
                 llmlingua2_config: dict | None = None, *, pair: Pair | None = None,
                 method: Method | str | None = None):
        if use_llmlingua2:
            raise ConfigError("use_llmlingua2: LLMLingua-2's token classifier is not draftapprox's; a draft model's "
                              "attention ranks the tokens here (use_llmlingua2=False)")
        method = parts.prompt_method(method if method is not None else SpecPC())  # its budget: compress_prompt's
        self.method, self.model_name = method, model_name
        if pair is None:
            unknown = sorted(set(model_config or {}) - LOAD_OPTIONS)
            if unknown:
                raise ConfigError(f"model_config: {', '.join(unknown)} not understood (draftapprox loads with "
                                  f"{', '.join(sorted(LOAD_OPTIONS))})")
            device = "cuda" if str(device_map).startswith("cuda") else "cpu"
            # only TargetPC reads the target; every other prompt method needs the draft (or nothing) to compress
            pair = load_pair(model_name, with_target=isinstance(method, TargetPC), device=device,
                             **(model_config or {}))
        self.pair = pair
        self.tokenizer = pair.tokenizer

    def get_token_length(self, text: str, add_special_tokens: bool = True, use_oai_tokenizer: bool = False) -> int:
        """Tokens of `text`, by the draft's tokenizer (also for `use_oai_tokenizer`: no tiktoken here)."""
        return len(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def compress_prompt(
        self,
        context: list[str] | str,
        instruction: str = "",
        question: str = "",
        rate: float = 0.5,
        target_token: float = -1,
        iterative_size: int = 200,
        force_context_ids: list[int] | None = None,
        force_context_number: int | None = None,
        use_sentence_level_filter: bool = False,
        use_context_level_filter: bool = True,
        use_token_level_filter: bool = True,
        keep_split: bool = False,
        keep_first_sentence: int = 0,
        keep_last_sentence: int = 0,
        keep_sentence_number: int = 0,
        high_priority_bonus: int = 100,
        context_budget: str = "+100",
        token_budget_ratio: float = 1.4,
        condition_in_question: str = "none",
        reorder_context: str = "original",
        dynamic_context_compression_ratio: float = 0.0,
        condition_compare: bool = False,
        add_instruction: bool = False,
        rank_method: str = "llmlingua",
        concate_question: bool = True,
        context_segs: list[str] | None = None,
        context_segs_rate: list[float] | None = None,
        context_segs_compress: list[bool] | None = None,
        target_context: int = -1,
        context_level_rate: float = 1.0,
        context_level_target_token: int = -1,
        return_word_label: bool = False,
        word_sep: str = "\t\t|\t\t",
        label_sep: str = " ",
        token_to_word: str = "mean",
        force_tokens: list[str] | None = None,
        force_reserve_digit: bool = False,
        drop_consecutive: bool = False,
        chunk_end_tokens: list[str] | None = None,
        strict_preserve_uncompressed: bool = True,
    ) -> dict:
        """Compress `context` (a text or a list of texts) to about `rate` of the whole prompt, or to
        `target_token` context tokens, keeping `instruction` and `question` whole (llmlingua's arithmetic: the
        context's budget is the whole prompt's `rate` share less the instruction and, when `concate_question`,
        the question). The question is scored last, where the draft's window reads it."""
        began = time.perf_counter()
        given = _non_defaults(self.compress_prompt, locals())
        for knob in given:
            if knob in REFUSED_KNOBS:
                raise ConfigError(f"{knob}: {REFUSED_KNOBS[knob]} is not implemented by draftapprox's compressor")
        if not 0 < rate <= 1:
            raise ConfigError(f"rate must be in (0, 1], got {rate}")
        if reorder_context not in REORDERS:
            raise ConfigError(f"reorder_context must be one of {', '.join(REORDERS)}, got {reorder_context!r}")
        contexts = [context] if isinstance(context, str) else list(context or [" "])
        forced = set(force_context_ids or [])
        if any(not 0 <= i < len(contexts) for i in forced):
            raise ConfigError(f"force_context_ids must index the {len(contexts)} contexts, got {sorted(forced)}")
        lengths = [self.get_token_length(c, add_special_tokens=False) for c in contexts]
        instruction_tokens = self.get_token_length(instruction, add_special_tokens=False)
        question_tokens = self.get_token_length(question, add_special_tokens=False)
        if target_token == -1:
            target_token = ((instruction_tokens + question_tokens + sum(lengths)) * rate - instruction_tokens
                            - (question_tokens if concate_question else 0))
        pieces, owners = _pieces(instruction, contexts, question, forced, force_tokens or [])
        out = parts.compress(self.pair, pieces, self.method, keep=max(0, int(target_token)))
        kept_contexts = ["".join(t for t, o in zip(out.texts, owners, strict=True) if o == i)
                         for i in range(len(contexts))]
        share = [sum(k for k, o in zip(out.kept, owners, strict=True) if o == i) / max(1, n)
                 for i, n in enumerate(lengths)]
        order = _reorder(share, reorder_context)
        compressed_list = [kept_contexts[i] for i in order if kept_contexts[i].strip()]
        body = [instruction] if instruction else []
        if compressed_list:
            body.append("\n\n".join(compressed_list))
        if question and concate_question:
            body.append(question)
        compressed_prompt = "\n\n".join(body)
        origin = self.get_token_length("\n\n".join([instruction, *contexts, question]).strip(),
                                       add_special_tokens=False)
        compressed = self.get_token_length(compressed_prompt, add_special_tokens=False)
        ratio = 1 if compressed == 0 else origin / compressed
        saving = (origin - compressed) * 0.06 / 1000
        before, after = out.cuttable
        return {
            "compressed_prompt": compressed_prompt,
            "compressed_prompt_list": compressed_list,
            "origin_tokens": origin,
            "compressed_tokens": compressed,
            "ratio": f"{ratio:.1f}x",
            "rate": f"{100 / ratio:.1f}%",
            "saving": f", Saving ${saving:.1f} in GPT-4.",
            "draftapprox": {
                "method": self.method.describe(), "draft": self.model_name, "context_tokens": before,
                "kept_context_tokens": after, "context_budget_tokens": max(0, int(target_token)),
                "token_counts": "the draft's tokenizer",
                "not_applied": {k: v for k, v in given.items() if k in RANKER_KNOBS},
                "seconds": round(time.perf_counter() - began, 3),
            },
        }

    def structured_compress_prompt(self, *args, **kwargs):
        raise ConfigError("structured_compress_prompt (LLMLingua-2's tagged compression) is not implemented by "
                          "draftapprox's compressor: mark what must stay with instruction, question, "
                          "force_context_ids or force_tokens")

    def recover(self, *args, **kwargs):
        raise ConfigError("recover (mapping an answer back onto the uncompressed prompt) is not implemented by "
                          "draftapprox's compressor")


def _non_defaults(function, values: dict) -> dict:
    """The arguments of `function` given other than their defaults."""
    return {name: values[name] for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty and values.get(name) != p.default}


def _pieces(instruction: str, contexts: list[str], question: str, forced: set[int],
            force_tokens: list[str]) -> tuple[list[parts.Part], list[int | None]]:
    """The prompt as parts in order, instruction first and question last, protected but for the contexts (those of
    `forced` whole, and every occurrence of a `force_tokens` string or of a reference tag); with each part's
    context index (None: not a context's)."""
    pieces: list[parts.Part] = []
    owners: list[int | None] = []

    def add(text: str, protected: bool, owner: int | None) -> None:
        if text:
            pieces.append(parts.Part(text, protected))
            owners.append(owner)

    add(instruction + "\n\n" if instruction else "", True, None)
    forced_texts = [re.escape(t) for t in sorted(set(force_tokens), key=len, reverse=True) if t]
    pattern = re.compile("|".join([REFERENCE_TAG, *forced_texts]))
    for i, text in enumerate(contexts):
        if i:
            add("\n\n", True, None)  # llmlingua's join; nothing after the last, so the question follows
        if i in forced:
            add(text, True, i)
        else:
            cursor = 0
            for match in pattern.finditer(text):
                add(text[cursor:match.start()], False, i)
                add(match.group(), True, i)
                cursor = match.end()
            add(text[cursor:], False, i)
    add("\n\n" + question if question else "", True, None)
    return pieces, owners


def _reorder(share: list[float], how: str) -> list[int]:
    """Context order: as given, by the share of each the draft kept (most first), or llmlingua's two-stage (most
    important at both ends)."""
    if how == "original":
        return list(range(len(share)))
    ranked = sorted(range(len(share)), key=lambda i: -share[i])
    if how == "sort":
        return ranked
    return ranked[::2] + ranked[1::2][::-1]
