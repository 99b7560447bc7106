"""Which KV pairs our methods and kvpress's presses keep, pair by pair, on the same prompt and target.

Answers alone cannot say *why* kvpress's SnapKV fails where ours succeeds. Each case here changes one thing between
the two sides, so its overlap isolates one reason: an implementation (same settings, same input: the selections
should match up to ties), a setting (kvpress's defaults against the paper's), an allocation (PyramidKV's layer
budgets, AdaKV's head budgets), or the input the press sees (kvpress's query-aware evaluation compresses up to the
end of the question; our prompt also holds the chat template's assistant turn and RULER's answer prefix).
Ours runs first for every prompt, then kvpress's worker, so the two never share the CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import ConfigError, InputError
from ...generation import new_state, prefill
from ...methods import AdaKV, KVMethod, PyramidKV, SnapKV, StreamingLLM
from ...methods.scorer import ScorerKV, select_with
from ...report_pages import publish, table
from .. import ruler
from ..answer_log import Results, answer_key
from ..harness import samples
from . import compressed_tokens, compression_ratio, drive, python

KVPRESS_SNAPKV = {"window": 64, "kernel": 5, "pool": "avg", "reduction": "mean"}  # SnapKVPress's defaults, our knobs


@dataclass(frozen=True)
class Case:
    press: str
    ours: Callable[[int], KVMethod]
    isolates: str
    question_input: bool = False  # kvpress sees only the prompt up to the end of the question


CASES = {
    "snapkv": Case("snapkv", lambda c: SnapKV(c, **KVPRESS_SNAPKV),
                   "implementation: both at kvpress's SnapKV settings (window 64, kernel 5, mean pooling and mean "
                   "over the window), same input"),
    "pyramidkv": Case("pyramidkv", lambda c: PyramidKV(c, **KVPRESS_SNAPKV),
                      "layer budgets: PyramidKV at kvpress's SnapKV settings, beta 20, same input"),
    "adakv": Case("adakv", lambda c: AdaKV(c, scorer=SnapKV(c, **KVPRESS_SNAPKV)),
                  "head budgets: AdaKV (alpha 0.2) over SnapKV at kvpress's settings, same input"),
    "adakv-nofloor": Case("adakv", lambda c: AdaKV(c, scorer=SnapKV(c, **KVPRESS_SNAPKV), alpha=0.0),
                          "head budgets, floors matched: kvpress's safeguard (alpha x 128 pairs) goes to the window, "
                          "which is kept anyway, so its floor outside the window is 0; ours here at alpha 0"),
    "streamingllm": Case("streamingllm", StreamingLLM, "implementation: 4 sinks + the most recent pairs"),
    "snapkv-settings": Case("snapkv", SnapKV,
                            "settings: ours at the paper's (window 32, kernel 7, max, max), kvpress at its defaults, "
                            "same input"),
    "snapkv-input": Case("snapkv", lambda c: SnapKV(c, **KVPRESS_SNAPKV),
                         "input: same settings; kvpress compresses up to the end of the question (its query-aware "
                         "evaluation), ours the whole prompt with the answer prefix", question_input=True),
}


def check_cases(cases: list[str]) -> None:
    if unknown := [c for c in cases if c not in CASES]:
        raise ConfigError(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")


def run(pair, model_dir: Path, cases: list[str], budgets: list[int], tasks: list[str], lengths: list[int],
        count: int, output: Path, *, seed: int = 42, dtype: str = "float32", threads: int | None = None,
        cache: str | Path | None = None, log=print) -> int:
    """One row per (sample, case, budget) not yet in `output`: how far the two sides' kept pairs agree."""
    check_cases(cases)
    if not python("kvpress", cache).exists():
        raise InputError("kvpress's environment is missing: run `draftapprox eval setup-peer kvpress` first")
    results = Results(output)
    pending: dict[str, tuple[ruler.Sample, dict]] = {}
    ours_scores: dict[str, list[torch.Tensor] | None] = {}
    for sample in samples(pair.tokenizer, tasks, lengths, count, seed):
        todo = [(c, b) for c in cases for b in budgets if answer_key(sample.id, c, b) not in results.done]
        if not todo:
            continue
        ids = ruler.encode(pair.tokenizer, sample.context + sample.question, sample.answer_prefix)
        methods = {(c, b): CASES[c].ours(b) for c, b in todo}
        state = new_state(pair, ids, 1)
        prefill(state, max(m.rows for m in methods.values()))
        head = compressed_tokens(pair.tokenizer, sample.context + sample.question)
        for (name, budget), method in methods.items():
            case, key = CASES[name], answer_key(sample.id, name, budget)
            theirs_ids = ids[0, :head] if case.question_input else ids[0]
            scorer = method.scorer if isinstance(method, AdaKV) else method
            if isinstance(scorer, ScorerKV):  # score once: for the selection and to tell ties at the cut
                scores = scorer.scores(state)
                keep = select_with(method, state, lambda _, s=scores: s, method.allocate).keep
                ours_scores[key] = [s[0].float() for s in scores.per_layer]
            else:
                keep, ours_scores[key] = method.select(state).keep, None
            pending[key] = (sample, {
                "key": key, "mode": "select", "case": name, "press": case.press,
                "input_ids": theirs_ids.tolist(), "ratio": compression_ratio(budget, len(theirs_ids)),
                "budget": budget, "prompt_tokens": ids.shape[1], "config": str(method),
                "ours": [[torch.nonzero(h).flatten().tolist() for h in layer[0]] for layer in keep]})

    def compare(sample: ruler.Sample, req: dict, row: dict) -> dict:
        return {"key": row["key"], "sample": sample.id, "task": sample.task, "length": sample.length,
                "case": req["case"], "budget": req["budget"], "ours_config": req["config"],
                "kvpress": f"{req['press']} compression_ratio={req['ratio']} (defaults otherwise)",
                "prompt_tokens": req["prompt_tokens"], "kvpress_tokens": len(req["input_ids"]),
                **agreement(req["ours"], row["kept"], ours_scores.pop(row["key"])), "dtype": dtype,
                "finished": time.time(), "env": {"kvpress": row["versions"]}}

    return drive("kvpress", pending, output, results, compare, ["--model", str(model_dir), "--dtype", dtype],
                 threads, cache, log)


def agreement(ours: list[list[list[int]]], theirs: list[list[list[int]]],
              scores: list[torch.Tensor] | None) -> dict:
    """Per (layer, KV head): shared pairs, and whether each position kept by one side only is tied at our cut
    (its score within 1e-5, relative, of our last kept candidate's: either choice is then the method)."""
    shared = total = identical = tied = differing = 0
    kept_ours, kept_theirs = [], []
    for layer, (ours_layer, theirs_layer) in enumerate(zip(ours, theirs, strict=True)):
        kept_ours.append(sum(map(len, ours_layer)))
        kept_theirs.append(sum(map(len, theirs_layer)))
        for head, (a, b) in enumerate(zip(ours_layer, theirs_layer, strict=True)):
            a, b = set(a), set(b)
            shared, total, identical = shared + len(a & b), total + len(a), identical + (a == b)
            differ = sorted(a ^ b)
            differing += len(differ)
            if scores is None or len(a) != len(b) or not differ:
                continue
            x = scores[layer][head]
            mine = [p for p in a if p < len(x)]
            if not mine:  # we kept the window alone: no scored cut to be tied at
                continue
            cut = x[mine].min()
            candidates = torch.tensor([p for p in differ if p < len(x)], dtype=torch.long)
            tied += int(torch.isclose(x[candidates], cut, rtol=1e-5, atol=0).sum())
    heads = sum(map(len, ours))
    return {"heads": heads, "heads_identical": identical, "overlap": shared / max(total, 1),
            "differing": differing, "differing_tied": tied, "kept_ours": kept_ours, "kept_kvpress": kept_theirs}


def report(rows: list[dict], path: Path, command: str | None = None) -> Path:
    """One table: per case and budget, how far the selections agree, with what each case isolates."""
    body = []
    for name in [c for c in CASES if any(r["case"] == c for r in rows)]:
        for budget in sorted({r["budget"] for r in rows if r["case"] == name}):
            mine = [r for r in rows if r["case"] == name and r["budget"] == budget]
            heads = sum(r["heads"] for r in mine)
            body.append([name, str(budget), str(len(mine)), f"{100 * statistics.mean(r['overlap'] for r in mine):.2f}%",
                         f"{sum(r['heads_identical'] for r in mine)} / {heads}",
                         f"{sum(r['differing_tied'] for r in mine)} / {sum(r['differing'] for r in mine)}",
                         _per_head(mine, "kept_ours"), _per_head(mine, "kept_kvpress"),
                         CASES[name].isolates])
    lengths = ", ".join(map(str, sorted({r["length"] for r in rows})))
    lines = [f"Kept KV pairs of our methods against kvpress's presses on {len({r['sample'] for r in rows})} RULER "
             f"prompts of {lengths} tokens, the target in {rows[0]['dtype']}; kvpress " +
             ", ".join(f"{k} {v}" for k, v in rows[0]["env"]["kvpress"].items()) + ".", ""]
    lines += table(["case", "budget", "prompts", "overlap", "identical (layer, KV head)",
                    "differing positions tied at our cut", "pairs per head, first / last layer: ours",
                    "kvpress", "what differs between the sides"], body)
    lines += ["", "*Overlap*: the share of our kept pairs that kvpress keeps too. A position differs when one side "
              "keeps it and the other does not; it is *tied at our cut* when our score for it is within 1e-5 "
              "(relative) of our last kept candidate's, where the two sides may break a tie either way."]
    return publish(path, [], command, lines)


def _per_head(rows: list[dict], side: str) -> str:
    """Mean pairs a KV head keeps in the first and the last layer (PyramidKV's shape shows here)."""
    per_layer_heads = rows[0]["heads"] / len(rows[0][side])
    first, last = (statistics.mean(r[side][i] for r in rows) / per_layer_heads for i in (0, -1))
    return f"{first:.0f} / {last:.0f}"
