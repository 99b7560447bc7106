"""Where the time goes: torch.profiler over one generation per method on a RULER prompt, summarised as the top
operators by self CPU time, written between the generated-table markers of docs/results/profile.md.

    python scripts/profile_methods.py --length 2048 --methods specpc,speckv --out docs/results/profile.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from draftapprox.eval import ruler
from draftapprox.generation import generate
from draftapprox.markdown import splice, table
from draftapprox.methods import make, parse_budget
from draftapprox.models.loading import load_pair


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--methods", default="specpc@0.25,speckv@256")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("docs/results/profile.md"))
    args = parser.parse_args(argv)
    pair = load_pair()
    sample = ruler.generate_sample(pair.tokenizer, "niah_multikey_1", args.length, 0)
    ids = ruler.encode(pair.tokenizer, sample.context + sample.question, sample.answer_prefix)
    lines = [f"One generation of {args.new_tokens} tokens on a {ids.shape[1]}-token RULER prompt, after a warm-up; "
             f"target {pair.target.dtype}, draft {pair.draft.dtype}, {torch.get_num_threads()} threads.", "",
             f"Command: `python scripts/profile_methods.py --length {args.length} --methods {args.methods} "
             f"--new-tokens {args.new_tokens}`", ""]
    for spec in args.methods.split(","):
        name, _, budget = spec.partition("@")
        method = make(name, parse_budget(budget) if budget else None,
                      **({"lookahead": 32} if name == "speckv" else {}))
        generate(pair, ids, method, max_new_tokens=2, ignore_eos=True)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            record = generate(pair, ids, method, max_new_tokens=args.new_tokens, ignore_eos=True).record
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        body = [[e.key, str(e.count), f"{e.self_cpu_time_total / 1e6:.2f}",
                 f"{100 * e.self_cpu_time_total / total:.1f}%"] for e in events[: args.top]]
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in record.timings.items())
        lines += [f"### {method.describe()}", "", f"Phases: {phases}; first token {record.first_token_seconds:.2f} s.",
                  "", *table(["operator", "calls", "self CPU, s", "share"], body), ""]
        print(f"profiled {spec}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    splice(args.out, "\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
