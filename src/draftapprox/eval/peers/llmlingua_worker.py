"""Runs inside llmlingua's own virtual environment (llmlingua 0.2.2 drives legacy tuple KV caches, which
transformers 5 no longer accepts): it must not import draftapprox. Compresses each request's context with
LongLLMLingua, using the given small model (our draft), and appends the compressed context as one JSON line per
request, skipping keys already done.

Request: {"key", "context", "question", "rate"}; `rate` is the fraction of tokens to keep, as our keep ratios.
The context is split into ~100-word pieces so LongLLMLingua's coarse (per-piece) ranking has pieces to rank.
Budgets are counted in the target's tokens (see `_offline_token_counter`). The coarse scores of a context are
computed once for all its rates (`remember_coarse_scores`).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the answer log, without draftapprox
from answer_log import Results, read
from common import arguments
from common import patch as read_transformers5_configs


def pieces(text: str, words: int = 100) -> list[str]:
    tokens = text.split(" ")
    return [" ".join(tokens[i:i + words]) for i in range(0, len(tokens), words)]


def _offline_token_counter(model: str) -> None:
    """llmlingua counts budgets with OpenAI's cl100k tokenizer, which tiktoken downloads at start; offline we give
    it the small model's own tokenizer (here the draft's, which is the target's), so budgets are target tokens."""
    import tiktoken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)

    class Counter:
        def encode(self, text: str, **_) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        def decode(self, ids: list[int]) -> str:
            return tokenizer.decode(ids)

    tiktoken.encoding_for_model = lambda _name: Counter()


def remember_coarse_scores(compressor) -> None:
    """LongLLMLingua's coarse ranking scores every piece by its perplexity given the question: the same at every
    rate. Requests come rate after rate for one context, so keep those scores (a deterministic function of its
    arguments) instead of recomputing them; the compressed prompts are unchanged. Forgotten when the question
    changes."""
    scores, score = {}, compressor.get_condition_ppl

    def remembered(text, question, condition_in_question="none", granularity="sentence"):
        if scores.get("question") != question:
            scores.clear()
            scores["question"] = question
        key = (text, condition_in_question, granularity)
        if key not in scores:
            scores[key] = score(text, question, condition_in_question, granularity)
        return scores[key]

    compressor.get_condition_ppl = remembered


def compress(compressor, req: dict) -> dict:
    """LongLLMLingua with its paper's question-aware settings."""
    return compressor.compress_prompt(
        pieces(req["context"]), question=req["question"], rate=req["rate"],
        rank_method="longllmlingua", condition_in_question="after_condition", reorder_context="sort",
        dynamic_context_compression_ratio=0.3, condition_compare=True, context_budget="+100")


def main() -> None:
    args = arguments()
    read_transformers5_configs()
    _offline_token_counter(args.model)
    from llmlingua import PromptCompressor

    answers = Results(args.answers)
    todo = [r for r in read(args.requests) if r["key"] not in answers.done]
    if not todo:
        return
    compressor = PromptCompressor(model_name=args.model, device_map="cpu")
    remember_coarse_scores(compressor)
    for i, req in enumerate(todo):
        start = time.perf_counter()
        out = compress(compressor, req)
        row = {"key": req["key"], "compressed": out["compressed_prompt"], "origin_tokens": out["origin_tokens"],
               "compressed_tokens": out["compressed_tokens"], "seconds": round(time.perf_counter() - start, 3)}
        answers.append(row)
        print(f"[{i + 1}/{len(todo)}] {req['key']} {row['seconds']:.1f}s", flush=True)


if __name__ == "__main__":
    main()
