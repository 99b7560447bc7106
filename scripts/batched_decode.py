"""What batched decoding buys: a RULER prompt's answers under the grid's KV methods decoded one after another and
together (`generation.generate_batched`), same prepared caches, same run; written between the generated-table
markers of docs/results/batched-decode.md.

    python scripts/batched_decode.py --length 2048 --new-tokens 16 --out docs/results/batched-decode.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

from draftapprox.eval import ruler
from draftapprox.generation import generate_batched, generate_prepared, new_state, prepare
from draftapprox.methods import FullKV, make
from draftapprox.models.loading import load_pair, precision
from draftapprox.report_pages import splice, table

METHODS = ("streamingllm", "snapkv", "pyramidkv", "adakv", "speckv", "adaspeckv")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--budgets", default="64,128,256")
    parser.add_argument("--task", default="niah_single_2")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--draft", default=None, help="draft model (default: the offline pair's)")
    parser.add_argument("--target", default=None, help="target model (default: the offline pair's)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/batched-decode.md"))
    args = parser.parse_args(argv)

    pair = load_pair(args.draft, args.target, dtype=args.dtype)
    sample = ruler.generate_sample(pair.tokenizer, args.task, args.length, 0)
    ids = ruler.encode(pair.tokenizer, sample.context + sample.question, sample.answer_prefix)
    methods = [make(m, int(b)) for m in METHODS for b in args.budgets.split(",")] + [FullKV()]
    state = new_state(pair, ids, args.new_tokens)
    prepared = [prepare(pair, ids, m, max_new_tokens=args.new_tokens, state=state, ignore_eos=True) for m in methods]

    # a decode takes over the cache it is given (`Prepared.cache` is released): one at a time decodes copies
    copies = [dataclasses.replace(p, cache=copy.deepcopy(p.cache)) for p in prepared]
    start = time.perf_counter()
    alone = [generate_prepared(pair, p) for p in copies]
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    together = dict(generate_batched(pair, prepared, max_batch=len(prepared)))
    batched = time.perf_counter() - start

    differ = [methods[i] for i in range(len(prepared)) if together[i].tokens != alone[i].tokens]
    groups = sorted({r.record.decode_batch for r in together.values()})
    lines = [f"{len(prepared)} answers to one {ids.shape[1]}-token RULER `{args.task}` prompt (the grid's KV "
             f"methods at budgets {args.budgets}, and FullKV), {args.new_tokens} tokens each, EOS ignored; target "
             f"{precision(pair.target)}, one run, the same prepared caches decoded both ways.", "",
             f"Command: `python scripts/batched_decode.py --length {args.length} --new-tokens {args.new_tokens}`", ""]
    lines += table(["decoding", "seconds", "x one at a time"],
                   [["one at a time", f"{sequential:.1f}", "1.00x"],
                    [f"together (groups of {', '.join(map(str, groups))})", f"{batched:.1f}",
                     f"{batched / sequential:.2f}x"]])
    lines += ["", f"Identical tokens, batched against one at a time: {len(prepared) - len(differ)} of {len(prepared)} "
              "answers" + (". Differing: " + ", ".join(f"{m.name}@{m.budget}" for m in differ) if differ else "")
              + "."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    splice(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
