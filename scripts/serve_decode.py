"""The decode phase of `concurrency` long requests decoding together, per method: what the server's decode step
(`generation.DecodeBatch`, the scheduler's own) does once every request is admitted, without the prefills that
make a CPU run of eight 4k requests take many minutes. One RULER prompt is prepared once per method; `concurrency`
copies of it join one batch, and the steps are timed. Rows (kind "decode") go to the serving benchmark's JSONL,
which `bench serve` reports from.

    python scripts/serve_decode.py --length 4096 --concurrency 8 --steps 32 \
        --output docs/results/raw/bench-serve-cpu.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from draftapprox.eval import ruler
from draftapprox.eval.answer_log import Results
from draftapprox.generation import DecodeBatch, prepare, twin
from draftapprox.methods import FullKV, make
from draftapprox.models.loading import load_pair, precision

METHODS = {"fullkv": FullKV(), "speckv@256": make("speckv", 256, lookahead=32),
           "adaspeckv@256": make("adaspeckv", 256, lookahead=32)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--methods", default="fullkv,speckv@256")
    parser.add_argument("--task", default="niah_single_2")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or args.concurrency < 1 or args.steps < 2:
        parser.error(f"methods from {', '.join(METHODS)}; concurrency >= 1, steps >= 2")
    results = Results(args.output)
    pair = load_pair()
    sample = ruler.generate_sample(pair.tokenizer, args.task, args.length, 0)
    ids = ruler.encode(pair.tokenizer, sample.context + sample.question, sample.answer_prefix)
    for name in methods:
        key = f"decode|{name}|{args.length}|{args.concurrency}"
        if key in results.done:
            continue
        first = prepare(pair, ids, METHODS[name], max_new_tokens=args.steps + 1, ignore_eos=True)
        batch = DecodeBatch(pair)
        for i in range(args.concurrency):  # copies of one prepared request, each with a cache of its own
            batch.join(first if i == 0 else twin(first), key=i)
        seconds = []
        for _ in range(args.steps):
            began = time.perf_counter()
            batch.step()
            seconds.append(time.perf_counter() - began)
        step = statistics.median(seconds[1:])  # the first step stacks the caches
        results.append({"key": key, "kind": "decode", "method": name, "length": args.length,
                        "clients": args.concurrency, "step_seconds": seconds, "median_step": step,
                        "tokens_per_second": args.concurrency / step, "kv_bytes_kept": first.record.kv_bytes_kept,
                        "env": {"dtype": precision(pair.target), "task": args.task}, "finished": time.time()})
        print(f"{name}: {args.concurrency} x {args.length} tokens, step {step:.3f} s, "
              f"{args.concurrency / step:.2f} tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
