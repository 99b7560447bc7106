"""How much a cheaper draft changes SpecPC's selection (`draftapprox bench overlap`).

The same RULER prompts go through SpecPC with the draft in a reference precision and in cheaper ones; the
overlap of a prompt is |kept by both| / |kept by the reference| (both keep the same number of tokens). A cheaper
draft is worth making the default only where the overlap stays high and the
accuracy table holds.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..eval import ruler
from ..generation import compress_prompt, new_state
from ..methods import make
from ..models.loading import Pair, load_model, precision
from ..report_pages import publish, table


def measure(draft: str | None, dtypes: list[str], against: str, tasks: list[str], length: int, samples: int,
            ratio: float, seed: int = 42, cache_dir: str | None = None, progress: bool = True,
            knobs: dict[str, str] | None = None) -> list[dict]:
    """One row per (dtype, task, sample): the overlap with the reference dtype's selection and the draft's
    seconds (scoring included)."""
    from ..eval.harness import progress_bar

    models = {d: load_model(draft or "qwen2.5-coder-0.5b-instruct", dtype=d, cache=cache_dir)
              for d in dict.fromkeys([against, *dtypes])}
    tokenizer = models[against][1]
    method = make("specpc", ratio, **(knobs or {}))
    rows = []
    bar = progress_bar(progress)
    with bar:
        tid = bar.add_task("SpecPC selections", total=len(tasks) * samples * len(models))
        for index in range(samples):
            for task in tasks:
                sample = ruler.generate_sample(tokenizer, task, length, index, seed)
                ids = ruler.encode(tokenizer, sample.context + sample.question, sample.answer_prefix)
                kept, seconds = {}, {}
                for name, (model, _) in models.items():
                    start = time.perf_counter()
                    kept[name] = set(compress_prompt(new_state(Pair(model, tokenizer, model), ids, 1), method)[0]
                                     .tolist())
                    seconds[name] = time.perf_counter() - start
                    bar.advance(tid)
                reference = kept[against]
                rows += [{"dtype": precision(models[name][0]), "against": precision(models[against][0]),
                          "task": task, "index": index, "length": length, "ratio": ratio,
                          "overlap": len(kept[name] & reference) / len(reference), "seconds": seconds[name],
                          "reference_seconds": seconds[against]} for name in dtypes]
    return rows


def write(rows: list[dict], path: Path, command: str | None = None) -> Path:
    """A table per dtype: mean and minimum overlap over the prompts, and the draft's speed-up."""
    body = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        mine = [r for r in rows if r["dtype"] == dtype]
        overlaps = [r["overlap"] for r in mine]
        speedup = statistics.median(r["reference_seconds"] / r["seconds"] for r in mine)
        body.append([f"{dtype} vs {mine[0]['against']}", str(len(mine)), f"{100 * statistics.mean(overlaps):.1f}%",
                     f"{100 * min(overlaps):.1f}%", f"{speedup:.2f}x"])
    r0 = rows[0]
    intro = [f"SpecPC at keep ratio {r0['ratio']}, {r0['length']}-token RULER prompts "
             f"({len({r['task'] for r in rows})} tasks).", ""]
    return publish(path, intro, command, table(["draft precision", "prompts", "mean overlap", "min overlap",
                                                "draft speed-up (median)"], body))
