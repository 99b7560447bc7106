"""Our SnapKV's scoring and compression against kvpress's SnapKVPress on the same input (`draftapprox bench
kvpress`): the same prompt, target, precision, window, kernel and budget, measured in one run, ours first and then
kvpress's worker in its own environment, so the two never share the CPU.

What each side's seconds cover: ours, the `scoring` and `compression` phases after the shared prefill (the window's
queries were captured during that prefill, a copy of rows it computed anyway); kvpress, its `compress` calls inside
the prefill, every layer, which recompute the window's queries from the hidden states, score and prune.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..eval import ruler
from ..eval.answer_log import Results
from ..eval.peers import compression_ratio, drive
from ..generation import apply_kv, new_state, prefill
from ..methods import SnapKV
from ..models.loading import Pair
from ..report_pages import publish, table

TASK = "niah_single_2"  # any prompt serves: the work depends on the length only


def measure(pair: Pair, model_dir: Path, lengths: list[int], budget: int, repeats: int, output: Path, *,
            dtype: str, seed: int = 42, threads: int | None = None, cache: str | Path | None = None,
            log=print) -> int:
    """One row per length not yet in `output`: each side's seconds per repeat (after one warm-up)."""
    method = SnapKV(budget)
    knobs = {"window_size": method.window, "kernel_size": method.kernel}
    results = Results(output)
    pending: dict[str, tuple[ruler.Sample, dict]] = {}
    for length in lengths:
        key = f"snapkv@{budget}/{length}"
        if key in results.done:
            continue
        sample = ruler.generate_sample(pair.tokenizer, TASK, length, 0, seed)
        ids = ruler.encode(pair.tokenizer, sample.context + sample.question, sample.answer_prefix)
        state = new_state(pair, ids, 1)
        prefill(state, method.rows)
        ours = []
        for _ in range(1 + repeats):
            before = dict(state.timings.seconds)
            apply_kv(state, method)
            ours.append(sum(state.timings.seconds.get(p, 0.0) - before.get(p, 0.0) for p in ("scoring",
                                                                                          "compression")))
        n = ids.shape[1]
        pending[key] = (sample, {"key": key, "mode": "time", "input_ids": ids[0].tolist(), "press": "snapkv",
                                 "ratio": compression_ratio(budget, n), "knobs": knobs, "repeats": repeats,
                                 "ours": ours[1:], "budget": budget})

    def row(sample: ruler.Sample, req: dict, answer: dict) -> dict:
        return {"key": answer["key"], "length": sample.length, "prompt_tokens": len(req["input_ids"]),
                "budget": req["budget"], "kvpress_kept": answer["kept"], "knobs": req["knobs"], "dtype": dtype,
                "ours_seconds": req["ours"], "kvpress_seconds": answer["seconds"], "finished": time.time(),
                "env": {"kvpress": answer["versions"]}}

    return drive("kvpress", pending, output, results, row, ["--model", str(model_dir), "--dtype", dtype], threads,
                 cache, log)


def write(rows: list[dict], path: Path, command: str | None = None) -> Path:
    """Per length: each side's median seconds and ours as a fraction of kvpress's."""
    body = []
    for r in sorted(rows, key=lambda r: r["prompt_tokens"]):
        ours, theirs = statistics.median(r["ours_seconds"]), statistics.median(r["kvpress_seconds"])
        body.append([str(r["prompt_tokens"]), str(r["budget"]), f"{1000 * ours:.1f}", f"{1000 * theirs:.1f}",
                     f"{ours / theirs:.2f}x"])
    r0 = rows[0]
    intro = [f"SnapKV scoring + compression on the target, {r0['dtype']}, window {r0['knobs']['window_size']}, "
             f"kernel {r0['knobs']['kernel_size']}, median of {len(r0['ours_seconds'])} runs after a warm-up; "
             "kvpress side: " + ", ".join(f"{k} {v}" for k, v in r0["env"]["kvpress"].items()) + ".", ""]
    return publish(path, intro, command,
                   table(["prompt tokens", "budget", "ours, ms", "kvpress SnapKVPress, ms", "ours / kvpress"], body))
