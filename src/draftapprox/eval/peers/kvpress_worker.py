"""Runs inside kvpress's own virtual environment (kvpress 0.5.x pins transformers<5.3). It imports draftapprox
only for draftapprox's own presses (`speckv`, `adaspeckv`, with `--draft`), which `setup-peer kvpress` installs
there. Reads requests (JSONL), answers each with kvpress's pipeline, and appends one JSON line per answer as soon
as it is done, skipping keys already answered, so a killed run resumes where it stopped.

Request: {"key", "context", "question", "answer_prefix", "max_new_tokens", "press", "ratio", "knobs",
"query_aware"}.
Query-agnostic (kvpress's pipeline as users call it): the context is compressed before the question is seen.
Query-aware (kvpress's own evaluation with `query_aware`): the question is appended to the context, both compressed.
Requests that differ only in their press share one prefill (`answer_shared`), with the pipeline's answers.

Timing request (`draftapprox bench kvpress`): {"key", "mode": "time", "input_ids", "press", "ratio", "knobs",
"repeats"}: one prefill of `input_ids` under the press, per repeat, timing only the press's `compress` calls (its
scoring and pruning, every layer); the answer holds each repeat's seconds, after one warm-up.

Selection request (`draftapprox eval kvpress-selection`): {"key", "mode": "select", "input_ids", "press", "ratio"}:
one prefill of `input_ids` under the press; the answer holds, per layer and KV head, the positions whose pairs the
press kept (read back from what it really did: the rows of the keys it returned, or what AdaKV masks).
"""

import functools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the answer log, without draftapprox
from answer_log import Results, read
from common import arguments

DRAFT_PRESSES = ("speckv", "adaspeckv")  # draftapprox's presses: they need the draft model


def make_press(name: str, ratio: float, knobs: dict, draft: Callable[[], object] | None = None,
               lookahead: int = 64):
    """A press by name; `knobs` are its own dataclass fields (for AdaKV, those of the SnapKV it wraps).
    draftapprox's presses take the draft model from `draft()` and write `lookahead` tokens with it (the grid's
    SpecKV drafts the request's max_new_tokens)."""
    import kvpress

    if name in DRAFT_PRESSES:
        if draft is None:  # timing and selection requests run a press's per-layer compress, which these have not
            raise SystemExit(f"{name}: only kvpress's pipeline runs draftapprox's presses here, with --draft")
        from draftapprox.integrations.kvpress import AdaSpecKVPress, SpecKVPress

        press = SpecKVPress if name == "speckv" else AdaSpecKVPress
        return press(draft=draft(), compression_ratio=ratio, lookahead=lookahead, **knobs)
    presses = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio, **knobs),
        "pyramidkv": lambda: kvpress.PyramidKVPress(compression_ratio=ratio, **knobs),
        "adakv": lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, **knobs)),
        "streamingllm": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio, **knobs),
        "expectedattention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio, **knobs),
        # query-agnostic by design (it scores pairs by how well they let the model rebuild the context), at 2-3
        # times a prefill's cost
        "kvzip": lambda: kvpress.KVzipPress(compression_ratio=ratio, **knobs),
    }
    return presses[name]()


def main() -> None:
    args = arguments(("--dtype", {"default": "bfloat16"}), ("--draft", {"default": None}))

    import kvpress  # noqa: F401  (registers the pipeline)
    from transformers import pipeline
    from transformers.utils import logging

    logging.disable_progress_bar()  # one line per tensor loaded, on stderr, otherwise

    answers = Results(args.answers)
    todo = [r for r in read(args.requests) if r["key"] not in answers.done]
    if not todo:
        return
    if all(r.get("mode") == "time" for r in todo):
        return time_presses(args, todo, answers)
    if all(r.get("mode") == "select" for r in todo):
        return select(args, todo, answers)
    pipe = pipeline("kv-press-text-generation", model=args.model, device="cpu",
                    model_kwargs={"dtype": getattr(torch, args.dtype), "attn_implementation": "sdpa"})
    groups: dict[tuple, list[dict]] = {}
    draft = functools.cache(lambda: _load(args.draft, args.dtype))  # once, when a request first needs it
    alone = ("kvzip", *DRAFT_PRESSES)  # they run their own prefills: the pipeline, one request at a time
    for req in todo:
        shared = (req["context"], req["question"], req["answer_prefix"], req["query_aware"], req["max_new_tokens"])
        groups.setdefault(shared if req["press"] not in alone else (req["key"],), []).append(req)
    done = 0
    for group in groups.values():
        rows = [answer_pipeline(pipe, group[0], draft)] if group[0]["press"] in alone else answer_shared(pipe, group)
        for row in rows:
            answers.append(row)
            done += 1
            print(f"[{done}/{len(todo)}] {row['key']} {row['seconds']:.1f}s", flush=True)


def _inputs(req: dict) -> tuple[str, str]:
    """The context kvpress compresses and the question it appends after compression."""
    if req["query_aware"]:
        return req["context"] + req["question"], ""
    return req["context"], req["question"]


def answer_pipeline(pipe, req: dict, draft: Callable[[], object]) -> dict:
    """kvpress's pipeline exactly as users call it."""
    context, question = _inputs(req)
    knobs = dict(req.get("knobs", {}))
    if knobs.get("tail") == "pipeline":  # what the pipeline feeds after compression (draftapprox's presses)
        from draftapprox.integrations.kvpress import pipeline_tail

        knobs["tail"] = pipeline_tail(pipe, question, req["answer_prefix"])
    press = make_press(req["press"], req["ratio"], knobs, draft, req["max_new_tokens"])
    start = time.perf_counter()
    out = pipe(context, question=question, answer_prefix=req["answer_prefix"], press=press,
               max_new_tokens=req["max_new_tokens"])
    return _row(req, out["answer"], time.perf_counter() - start)


def answer_shared(pipe, group: list[dict]) -> Iterator[dict]:
    """The pipeline's answers for requests that differ only in their press, with one prefill for all of them.

    The pipeline compresses inside its prefill, after each layer's attention, and the compression does not change
    that forward pass (every layer attends to the whole context). So each press can compress the same full keys
    and values of a single prefill; each then decodes from its own cache with the pipeline's own `generate_answer`,
    AdaKV's masked pairs restored on the layers first. Checked answer for answer against `answer_pipeline`.
    """
    from kvpress.presses.base_press import BasePress, is_prefilling
    from kvpress.utils import extract_keys_and_values
    from transformers import DynamicCache

    first = group[0]
    context, question = _inputs(first)
    options, _, _ = pipe._sanitize_parameters(question=question, answer_prefix=first["answer_prefix"],
                                              max_new_tokens=first["max_new_tokens"])
    inputs = pipe.preprocess(context, **options)
    presses = [make_press(r["press"], r["ratio"], r.get("knobs", {})) for r in group]
    kept: list[dict[int, tuple]] = [{} for _ in presses]

    class FanOut(BasePress):
        def post_init_from_model(self, model):
            for press in presses:
                press.post_init_from_model(model)

        def forward_hook(self, module, input, kwargs, output):
            if not is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1]):
                return output
            keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
            for press, layers in zip(presses, kept, strict=True):
                module.masked_key_indices = None
                k, v = press.compress(module, kwargs["hidden_states"], keys, values, output[1], kwargs)
                layers[module.layer_idx] = (k, v, module.masked_key_indices)
            module.masked_key_indices = None
            return output

    start = time.perf_counter()
    with torch.inference_mode(), FanOut()(pipe.model):
        pipe.model.model(input_ids=inputs["context_ids"], past_key_values=DynamicCache())
    prefill = (time.perf_counter() - start) / len(group)
    attention = [layer.self_attn for layer in pipe.model.model.layers]
    for req, layers in zip(group, kept, strict=True):
        start = time.perf_counter()
        cache = DynamicCache()
        for i in sorted(layers):
            keys, values, masked = layers[i]
            cache.update(keys, values, i)
            attention[i].masked_key_indices = masked
        with torch.inference_mode():
            answer = pipe.generate_answer(question_ids=inputs["questions_ids"][0], cache=cache,
                                          context_length=inputs["context_ids"].shape[1],
                                          max_new_tokens=req["max_new_tokens"])
        for module in attention:
            module.masked_key_indices = None
        yield _row(req, answer, prefill + time.perf_counter() - start)


def _row(req: dict, answer: str, seconds: float) -> dict:
    return {"key": req["key"], "answer": answer, "seconds": round(seconds, 3), "versions": _versions()}


def _load(directory: str, dtype: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype),
                                                attn_implementation="sdpa").eval()


def time_presses(args, todo: list[dict], answers: Results) -> None:
    from transformers import DynamicCache

    model = _load(args.model, args.dtype)
    for req in todo:
        press = make_press(req["press"], req["ratio"], req.get("knobs", {}))
        spent, compress = [], press.compress

        def timed(*a, _compress=compress, _spent=spent, **k):
            start = time.perf_counter()
            out = _compress(*a, **k)
            _spent.append(time.perf_counter() - start)
            return out

        press.compress = timed
        ids = torch.tensor([req["input_ids"]])
        seconds = []
        for _ in range(1 + req["repeats"]):  # the first is a warm-up
            spent.clear()
            cache = DynamicCache()
            with torch.inference_mode(), press(model):
                model.model(ids, past_key_values=cache)  # the decoder only: no logits are needed to prefill
            seconds.append(sum(spent))
        answers.append({"key": req["key"], "seconds": seconds[1:], "kept": cache.get_seq_length(),
                        "versions": _versions()})
        print(f"{req['key']} {min(seconds[1:]):.3f}s", flush=True)


def select(args, todo: list[dict], answers: Results) -> None:
    from transformers import DynamicCache

    model = _load(args.model, args.dtype)
    for req in todo:
        press = make_press(req["press"], req["ratio"], req.get("knobs", {}))
        kept, compress = {}, press.compress

        def recording(module, hidden_states, keys, values, attentions, kwargs, _compress=compress, _kept=kept):
            module.masked_key_indices = None
            out_keys, out_values = _compress(module, hidden_states, keys, values, attentions, kwargs)
            if getattr(module, "masked_key_indices", None) is not None:  # AdaKV masks pairs instead of dropping
                mask = torch.ones(keys.shape[:3], dtype=torch.bool)
                mask[module.masked_key_indices] = False
                _kept[module.layer_idx] = [torch.nonzero(head).flatten().tolist() for head in mask[0]]
            else:
                _kept[module.layer_idx] = [_rows(k, o) for k, o in zip(keys[0], out_keys[0], strict=True)]
            return out_keys, out_values

        press.compress = recording
        start = time.perf_counter()
        with torch.inference_mode(), press(model):
            model.model(torch.tensor([req["input_ids"]]), past_key_values=DynamicCache())
        answers.append({"key": req["key"], "kept": [kept[i] for i in sorted(kept)],
                        "seconds": round(time.perf_counter() - start, 3),
                        "versions": _versions()})
        print(f"{req['key']} {time.perf_counter() - start:.1f}s", flush=True)


def _rows(keys: torch.Tensor, kept: torch.Tensor) -> list[int]:
    """Positions of the rows of `keys (n, d)` that `kept (k, d)` holds (a press gathers them unchanged)."""
    same = (kept[:, None, :] == keys[None, :, :]).all(-1)
    if not bool(same.any(-1).all()):
        raise RuntimeError("a kept key matches no prompt key: the press changed the keys it kept")
    return sorted(set(same.float().argmax(-1).tolist()))


def _versions() -> dict:
    from importlib.metadata import version

    return {"kvpress": version("kvpress"), "transformers": version("transformers"), "torch": torch.__version__}


if __name__ == "__main__":
    main()
