"""Our selections against the authors' reference implementation (furiosa-ai/draft-based-approx-llm), on the same
prompts with the same models and settings, each side in its own environment. Ours runs first for every request,
then the reference's worker, so the two never share the CPU.

- SpecPC: the kept prompt positions, and the seconds each side takes to select them.
- SpecKV: the kept KV positions of every (layer, KV head). The target scores with *our* draft's tokens on both sides,
  so a difference is the target-side selection's; whether the reference's own draft call (`generate`, greedy)
  writes the same tokens is reported beside it. On CPU only below `prefill_window + prefill_vertical` tokens:
  above that the reference's prefill needs MInference's CUDA kernel.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ...errors import InputError
from ...generation import compress_prompt, new_state, prefill
from ...methods import SpecKV, SpecPC
from ...methods.scorer import select_with
from ...report_pages import publish, table
from .. import ruler
from ..answer_log import Results, answer_key
from ..harness import samples
from . import drive, python, source_commit, venv


def _source(cache: str | Path | None) -> Path:
    src = venv("reference", cache) / "src"
    if not python("reference", cache).exists() or not src.is_dir():
        raise InputError("the reference environment is missing: run `draftapprox eval setup-peer reference` first")
    return src


def _todo(tokenizer, tasks: list[str], lengths: list[int], count: int, seed: int, method: str, settings: list,
          results: Results):
    """(sample, its token ids, setting, key) for each comparison not yet in `results`."""
    for sample in samples(tokenizer, tasks, lengths, count, seed):
        ids = ruler.encode(tokenizer, sample.context + sample.question, sample.answer_prefix)
        for setting in settings:
            key = answer_key(sample.id, f"reference:{method}", setting)
            if key not in results.done:
                yield sample, ids, setting, key


def run_specpc(pair, draft_dir: Path, ratios: list[float], tasks: list[str], lengths: list[int], count: int,
               output: Path, *, seed: int = 42, dtype: str = "float32", threads: int | None = None,
               cache: str | Path | None = None, log=print, knobs: dict | None = None) -> int:
    """SpecPC with the paper's defaults (or `knobs`); one row per (sample, ratio): both selections' differences and
    times. `pair`: the draft as both models."""
    src, commit = _source(cache), source_commit("reference", cache)
    results = Results(output)
    pending: dict[str, tuple[ruler.Sample, dict]] = {}
    warm = False
    for sample, ids, ratio, key in _todo(pair.tokenizer, tasks, lengths, count, seed, "specpc", ratios, results):
        method = SpecPC(ratio, **(knobs or {}))
        for _ in range(1 if warm else 2):  # the process's first call pays one-off setup: run it twice
            start = time.perf_counter()
            ours = compress_prompt(new_state(pair, ids, 1), method)[0].tolist()
            seconds = time.perf_counter() - start
        warm = True
        pending[key] = (sample, {"key": key, "method": "specpc", "input_ids": ids[0].tolist(),
                                 "budget": method.tokens(ids.shape[1]), "window": method.window,
                                 "kernel": method.kernel, "start_layer": method.start_layer,
                                 "lookahead": method.lookahead, "ratio": ratio, "ours": ours,
                                 "ours_seconds": seconds})

    def compare(sample: ruler.Sample, req: dict, row: dict) -> dict:
        ours, theirs = set(req["ours"]), set(row["kept"])
        return {"key": row["key"], "method": "specpc", "sample": sample.id, "task": sample.task,
                "length": sample.length, "ratio": req["ratio"], "prompt_tokens": len(req["input_ids"]),
                "kept": len(theirs), "identical": ours == theirs, "overlap": len(ours & theirs) / max(len(theirs), 1),
                "only_ours": sorted(ours - theirs), "only_reference": sorted(theirs - ours),
                "ours_seconds": req["ours_seconds"], "reference_seconds": row["seconds"], "dtype": dtype,
                "finished": time.time(), "env": {"reference": {**row["versions"], "commit": commit}}}

    return drive("reference", pending, output, results, compare,
                 ["--model", str(draft_dir), "--source", str(src), "--dtype", dtype], threads, cache, log)


def run_speckv(pair, target_dir: Path, draft_dir: Path, budgets: list[int], tasks: list[str], lengths: list[int],
               count: int, output: Path, *, seed: int = 42, dtype: str = "float32", threads: int | None = None,
               cache: str | Path | None = None, log=print, knobs: dict | None = None) -> int:
    """SpecKV with the paper's defaults (or `knobs`), lookahead = the task's answer length; one row per (sample,
    budget): per (layer, KV head) the overlap of the kept positions."""
    src, commit = _source(cache), source_commit("reference", cache)
    results = Results(output)
    pending: dict[str, tuple[ruler.Sample, dict]] = {}
    candidates: dict[str, list[torch.Tensor]] = {}  # our scores (G, n-w-1) per layer, to tell ties from the rest
    for sample, ids, budget, key in _todo(pair.tokenizer, tasks, lengths, count, seed, "speckv", budgets, results):
        method = SpecKV(budget, **(knobs or {}))
        length = sample.max_new_tokens if method.lookahead is None else method.lookahead
        if ids.shape[1] + length > method.prefill_window + method.prefill_vertical:
            raise InputError(f"{sample.id}: {ids.shape[1]} prompt + {length} draft tokens is past the reference's "
                             "dense prefill, which needs MInference's CUDA kernel: use shorter --lengths on CPU")
        state = new_state(pair, ids, sample.max_new_tokens)
        prefill(state, method.rows)
        scores = method.scores(state)
        keep = select_with(method, state, lambda _, s=scores: s, method.allocate).keep
        lookahead = state.lookahead(length)
        candidates[key] = [layer[0].float() for layer in scores.per_layer]
        pending[key] = (sample, {
            "key": key, "method": "speckv", "input_ids": ids[0].tolist(), "budget": budget,
            "lookahead_ids": lookahead[0].tolist(), "window": method.window, "kernel": method.kernel,
            "pool": "mean" if method.pool == "avg" else method.pool, "reduction": method.reduction,
            "ours": [[torch.nonzero(head).flatten().tolist() for head in layer[0]] for layer in keep]})

    def compare(sample: ruler.Sample, req: dict, row: dict) -> dict:
        n, w, slots = len(req["input_ids"]), req["window"], req["budget"] - req["window"]
        window = set(range(n - w - 1, n - 1))  # the reference's top-k excludes the window it always keeps
        overlaps, ties, others = [], 0, 0
        for layer, (ours_layer, theirs_layer) in enumerate(zip(req["ours"], row["kept"], strict=True)):
            for head, (ours, theirs) in enumerate(zip(ours_layer, theirs_layer, strict=True)):
                overlaps.append(len(set(ours) & (set(theirs) | window)) / (len(theirs) + len(window)))
                x = candidates[row["key"]][layer][head]
                threshold = x.topk(slots).values[-1]  # the score of the last slot: where ties are broken
                differ = torch.tensor(sorted((set(ours) - window) ^ set(theirs)), dtype=torch.long)
                tied = int(torch.isclose(x[differ], threshold, rtol=1e-5, atol=0).sum()) if len(differ) else 0
                ties, others = ties + tied, others + len(differ) - tied
        return {"key": row["key"], "method": "speckv", "sample": sample.id, "task": sample.task,
                "length": sample.length, "budget": req["budget"], "prompt_tokens": n,
                "lookahead_tokens": len(req["lookahead_ids"]),
                "lookahead_identical": row["lookahead_ids"] == req["lookahead_ids"],
                "identical": all(o == 1 for o in overlaps), "overlap": statistics.mean(overlaps),
                "min_overlap": min(overlaps), "heads_identical": sum(o == 1 for o in overlaps),
                "heads": len(overlaps), "differing_ties": ties, "differing_other": others,
                "reference_seconds": row["seconds"], "dtype": dtype,
                "finished": time.time(), "env": {"reference": {**row["versions"], "commit": commit}}}

    return drive("reference", pending, output, results, compare,
                 ["--model", str(draft_dir), "--target", str(target_dir), "--source", str(src), "--dtype", dtype],
                 threads, cache, log)


def report(rows: list[dict], path: Path, command: str | None = None) -> Path:
    """A table per method: per keep ratio (SpecPC) or budget (SpecKV), how often and how far the selections agree."""
    specpc = [r for r in rows if r.get("method", "specpc") == "specpc"]
    speckv = [r for r in rows if r.get("method") == "speckv"]
    body = _specpc_table(specpc) if specpc else []
    if speckv:
        body += ([""] if specpc else []) + _speckv_table(speckv)
    return publish(path, [], command, body)


def _setting(rows: list[dict], what: str) -> list[str]:
    lengths = ", ".join(map(str, sorted({r["length"] for r in rows})))
    return [f"{what} on {len({r['sample'] for r in rows})} RULER prompts of {lengths} tokens, {rows[0]['dtype']}, "
            "reference: " + ", ".join(f"{k} {v}" for k, v in rows[0]["env"]["reference"].items()) + ".", ""]


def _specpc_table(rows: list[dict]) -> list[str]:
    body = []
    for ratio in sorted({r["ratio"] for r in rows}):
        mine = [r for r in rows if r["ratio"] == ratio]
        body.append([str(ratio), str(len(mine)), str(sum(r["identical"] for r in mine)),
                     f"{100 * statistics.mean(r['overlap'] for r in mine):.2f}%",
                     f"{statistics.median(r['ours_seconds'] for r in mine):.2f}",
                     f"{statistics.median(r['reference_seconds'] for r in mine):.2f}"])
    lines = _setting(rows, "SpecPC (paper defaults), the draft's selection")
    lines += table(["keep ratio", "prompts", "identical selections", "mean overlap", "ours, s (median)",
                    "reference, s (median)"], body)
    differing = [r for r in rows if not r["identical"]]
    if differing:
        lines += ["", "Prompts whose SpecPC selections differ (positions kept by one side only):", ""]
        lines += table(["prompt", "ratio", "only ours", "only reference"],
                       [[r["sample"], str(r["ratio"]), _span(r["only_ours"]), _span(r["only_reference"])]
                        for r in differing])
    return lines


def _speckv_table(rows: list[dict]) -> list[str]:
    body = []
    for budget in sorted({r["budget"] for r in rows}):
        mine = [r for r in rows if r["budget"] == budget]
        body.append([str(budget), str(len(mine)), str(sum(r["lookahead_identical"] for r in mine)),
                     str(sum(r["identical"] for r in mine)),
                     f"{sum(r['heads_identical'] for r in mine)} / {sum(r['heads'] for r in mine)}",
                     f"{100 * statistics.mean(r['overlap'] for r in mine):.2f}%",
                     f"{100 * min(r['min_overlap'] for r in mine):.1f}%",
                     f"{sum(r['differing_ties'] for r in mine)} / "
                     f"{sum(r['differing_ties'] + r['differing_other'] for r in mine)}"])
    lines = _setting(rows, "SpecKV (paper defaults, lookahead = the task's answer length), the target's KV selection")
    lines += table(["budget", "prompts", "same draft tokens", "identical selections", "identical (layer, KV head)",
                    "mean overlap", "worst (layer, KV head)", "differing positions tied at the cut"], body)
    lines += ["", "A position differs when one side keeps it and the other does not. It is *tied at the cut* when "
              "our score for it equals (to 1e-5, relative) the score of the last slot: there the two sides break a "
              "tie differently (`torch.topk` against our stable order), and either choice is the method."]
    return lines


def _span(positions: list[int]) -> str:
    if not positions:
        return "-"
    shown = ", ".join(map(str, positions[:8]))
    return f"{len(positions)} ({shown}{', ...' if len(positions) > 8 else ''})"
