"""What a CUDA graph buys a decode step: tokens/s at batch 1 and 32 on FullKV and SpecKV caches, the ordinary
decode loop against fixed-shape steps replayed as one graph (`static_decode`), same prepared caches, same run.
Rows go to a JSONL as they are measured (a rerun resumes); the table goes between the generated-table markers of
`--out`. On a CPU the static step runs eagerly, which checks the script and the tokens but measures no graph.

    python scripts/cuda_graph_decode.py --device cuda --output docs/results/raw/cuda-graph-decode.jsonl \\
        --out docs/results/cuda-graph-decode.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from draftapprox.eval import ruler
from draftapprox.eval.answer_log import Results, read
from draftapprox.generation import DecodeBatch, prepare, twin
from draftapprox.methods import FullKV, make
from draftapprox.models.loading import load_pair, precision
from draftapprox.report_pages import publish, table
from draftapprox.static_decode import WARMUP_STEPS

METHODS = {"fullkv": lambda: FullKV(), "speckv@256": lambda: make("speckv", 256, lookahead=32)}


def _measure(pair, first, batch_size: int, steps: int, static: bool) -> dict:
    batch = DecodeBatch(pair, static=static)
    for i in range(batch_size):  # copies of one prepared request, each with a cache of its own
        batch.join(first if i == 0 else twin(first), key=i)
    tokens, seconds = [], []
    for _ in range(steps):
        began = time.perf_counter()
        out = batch.step()  # picking the tokens reads them back: every step ends synchronised
        seconds.append(time.perf_counter() - began)
        tokens.extend(out[0].tokens)
    timed = seconds[WARMUP_STEPS + 1:]  # the first steps stack the caches, warm up and capture
    step = statistics.median(timed)
    return {"step_seconds": seconds, "median_step": step, "tokens_per_second": batch_size / step,
            "captured": batch.captured, "tokens": tokens}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--draft", default=None)
    parser.add_argument("--target", default=None)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--methods", default="fullkv,speckv@256")
    parser.add_argument("--task", default="niah_single_2")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    methods, batches = args.methods.split(","), [int(b) for b in args.batches.split(",")]
    if any(m not in METHODS for m in methods) or min(batches) < 1 or args.steps <= WARMUP_STEPS + 1:
        parser.error(f"methods from {', '.join(METHODS)}; batches >= 1; steps > {WARMUP_STEPS + 1}")
    results = Results(args.output)
    pair = load_pair(args.draft, args.target, dtype=args.dtype, device=args.device)
    device = pair.target.device
    sample = ruler.generate_sample(pair.tokenizer, args.task, args.length, 0)
    ids = ruler.encode(pair.tokenizer, sample.context + sample.question, sample.answer_prefix)
    for name in methods:
        first = None
        for batch_size in batches:
            for static in (False, True):
                key = f"{name}|{ids.shape[1]}|{batch_size}|{'static' if static else 'loop'}|{device.type}"
                if key in results.done:
                    continue
                if first is None:
                    first = prepare(pair, ids, METHODS[name](), max_new_tokens=args.steps + 1, ignore_eos=True)
                row = _measure(pair, twin(first), batch_size, args.steps, static)
                results.append({"key": key, "method": name, "prompt_tokens": ids.shape[1], "batch": batch_size,
                                "static": static, **row, "env": {
                                    "device": device.type, "dtype": precision(pair.target),
                                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                    "torch": torch.__version__}, "finished": time.time()})
                print(f"{key}: {row['tokens_per_second']:.1f} tokens/s, captured={row['captured']}",
                      file=sys.stderr)
    if args.out is not None:
        report(args.output, args.out)
    return 0


def report(output: Path, out: Path) -> Path:
    """The table of `output`'s rows: per method and batch, the loop and the static step side by side."""
    rows = {(r["method"], r["prompt_tokens"], r["batch"], r["env"]["device"], r["static"]): r for r in read(output)}
    lines = []
    for (method, tokens, batch, device, static), r in sorted(rows.items()):
        loop = rows.get((method, tokens, batch, device, False))
        if not static or loop is None:
            continue
        lines.append([method, str(tokens), str(batch), device, f"{loop['tokens_per_second']:.1f}",
                      f"{r['tokens_per_second']:.1f}", f"{r['tokens_per_second'] / loop['tokens_per_second']:.2f}x",
                      "yes" if r["captured"] else "no (eager)", "yes" if r["tokens"] == loop["tokens"] else "no"])
    envs = sorted({f"{r['env']['device']} ({r['env']['gpu'] or 'CPU'}), {r['env']['dtype']}, torch "
                   f"{r['env']['torch']}" for r in rows.values()})
    intro = [f"Decode tokens/s, median step after {WARMUP_STEPS + 1} warm-up steps; {'; '.join(envs)}. "
             "Same tokens: the first sequence's greedy tokens, static against the loop.", ""]
    devices = ",".join(sorted({r["env"]["device"] for r in rows.values()}))
    return publish(out, intro, f"python scripts/cuda_graph_decode.py --device {devices} --output {output} --out {out}",
                   table(["method", "prompt tokens", "batch", "device", "loop tokens/s", "static tokens/s",
                          "static / loop", "graph captured", "same tokens"], lines))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
