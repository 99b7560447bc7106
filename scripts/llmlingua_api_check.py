"""SpecPC through the LLMLingua-compatible API against SpecPC in process, on the RULER prompts of the accuracy grid.

For each prompt, in-process SpecPC at a keep ratio keeps `int(ratio * n)` tokens; the API's
`compress_prompt([prompt], rate=ratio)` (the rendered prompt as its one context, nothing protected) must keep the
same tokens: its compressed text must be the decoding of in-process SpecPC's kept ids. The target's answer is a
function of the kept tokens, so equal kept tokens on a prompt mean the API's row of the accuracy table equals
in-process SpecPC's there. Writes one JSON line per prompt as it goes (a rerun resumes) and a Markdown report:

    python scripts/llmlingua_api_check.py --samples 10 --out docs/results/llmlingua-api
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import draftapprox as da
from draftapprox.eval import harness, ruler
from draftapprox.generation import compress_prompt, new_state
from draftapprox.integrations.llmlingua import PromptCompressor


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model (one name covers several generations)."""
    info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    if "model name" not in info:
        return platform.processor() or "unknown CPU"
    return f"{info['model name']} (cpu family {info.get('cpu family')}, model {info.get('model')})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--out", type=Path, default=Path("docs/results/llmlingua-api"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / f"kept-{args.length}.jsonl"
    done = {json.loads(line)["sample"] for line in rows_path.read_text().splitlines()} if rows_path.exists() else set()
    pair = da.load_pair(with_target=False, dtype="bfloat16")
    method = da.SpecPC(budget=args.ratio)
    lingua = PromptCompressor(pair=pair, method=method)
    tasks = list(ruler.TASKS) if args.tasks == "all" else args.tasks.split(",")
    with rows_path.open("a") as sink:
        for sample in harness.samples(pair.tokenizer, tasks, [args.length], args.samples, 42):
            if sample.id in done:
                continue
            text = ruler.render(pair.tokenizer, sample.context + sample.question, sample.answer_prefix)
            ids = ruler.encode(pair.tokenizer, sample.context + sample.question, sample.answer_prefix)
            start = time.perf_counter()
            ours = ids[0, compress_prompt(new_state(pair, ids, 1), method)[0]].tolist()
            middle = time.perf_counter()
            out = lingua.compress_prompt([text], rate=args.ratio)
            row = {"sample": sample.id, "task": sample.task, "prompt_tokens": ids.shape[1], "in_process": len(ours),
                   "api": out["draftapprox"]["kept_context_tokens"],
                   "same_tokens": out["compressed_prompt_list"] == [pair.tokenizer.decode(ours)],
                   "seconds": {"in_process": round(middle - start, 3),
                               "api": round(time.perf_counter() - middle, 3)}}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(f"{sample.id}: {row['in_process']} / {row['api']} kept, same: {row['same_tokens']}", flush=True)
    report(rows_path, args)


def report(rows_path: Path, args) -> None:
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    lines = [f"# SpecPC through the LLMLingua-compatible API, against in-process SpecPC ({args.length} tokens)", "",
             f"Keep ratio {args.ratio}; draft Qwen2.5-Coder-0.5B-Instruct (bfloat16); RULER prompts of the accuracy "
             f"grid (seed 42); machine: {cpu_name()}, commit {commit}.", "",
             "| task | prompts | same kept tokens | kept (in process, mean) | kept (API, mean) |",
             "|---|---:|---:|---:|---:|"]
    for task, group in sorted(by_task.items()):
        same = sum(r["same_tokens"] for r in group)
        lines.append(f"| {task} | {len(group)} | {same} | {sum(r['in_process'] for r in group) / len(group):.0f} | "
                     f"{sum(r['api'] for r in group) / len(group):.0f} |")
    same = sum(r["same_tokens"] for r in rows)
    lines += [f"| all | {len(rows)} | {same} | | |", "",
              f"On {same} of {len(rows)} prompts the API kept exactly the tokens in-process SpecPC kept, so its "
              "accuracy row equals SpecPC's there (the target reads the same ids).", "",
              "Command:", "", "```bash",
              f"python scripts/llmlingua_api_check.py --samples {args.samples} --length {args.length} "
              f"--ratio {args.ratio} --out {args.out}", "```", ""]
    (args.out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
