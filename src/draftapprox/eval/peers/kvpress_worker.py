"""Runs inside kvpress's own virtual environment (kvpress 0.5.x pins transformers<5.3): it must not import
draftapprox. Reads requests (JSONL), answers each with kvpress's pipeline, and appends one JSON line per answer as
soon as it is done, skipping keys already answered, so a killed run resumes where it stopped.

Request: {"key", "context", "question", "answer_prefix", "max_new_tokens", "press", "ratio", "knobs",
"query_aware"}.
Query-agnostic (kvpress's pipeline as users call it): the context is compressed before the question is seen.
Query-aware (kvpress's own evaluation with `query_aware`): the question is appended to the context, both compressed.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the answer log, without draftapprox
from answer_log import Results, read
from common import arguments


def make_press(name: str, ratio: float, knobs: dict):
    """A press by name; `knobs` are its own dataclass fields (for AdaKV, those of the SnapKV it wraps)."""
    import kvpress

    presses = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio, **knobs),
        "pyramidkv": lambda: kvpress.PyramidKVPress(compression_ratio=ratio, **knobs),
        "adakv": lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, **knobs)),
        "streamingllm": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio, **knobs),
        "expectedattention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio, **knobs),
    }
    return presses[name]()


def main() -> None:
    args = arguments(("--dtype", {"default": "bfloat16"}))

    import kvpress  # noqa: F401  (registers the pipeline)
    from transformers import pipeline

    answers = Results(args.answers)
    todo = [r for r in read(args.requests) if r["key"] not in answers.done]
    if not todo:
        return
    pipe = pipeline("kv-press-text-generation", model=args.model, device="cpu",
                    model_kwargs={"dtype": getattr(torch, args.dtype), "attn_implementation": "sdpa"})
    for i, req in enumerate(todo):
        context, question = req["context"], req["question"]
        if req["query_aware"]:
            context, question = context + question, ""
        start = time.perf_counter()
        out = pipe(context, question=question, answer_prefix=req["answer_prefix"], press=make_press(req["press"],
                   req["ratio"], req.get("knobs", {})), max_new_tokens=req["max_new_tokens"])
        row = {"key": req["key"], "answer": out["answer"], "seconds": round(time.perf_counter() - start, 3),
               "versions": {"kvpress": _version("kvpress"), "transformers": _version("transformers"),
                            "torch": torch.__version__}}
        answers.append(row)
        print(f"[{i + 1}/{len(todo)}] {req['key']} {row['seconds']:.1f}s", flush=True)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
