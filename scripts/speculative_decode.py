"""Decode speed with and without speculative decoding (the draft proposes, the target checks in one forward), at
batch 1, per method, on RULER prompts and on chat/code prompts; the acceptance rate; whether the greedy tokens
stayed the same. Rows go to a JSONL as they are measured (a rerun resumes); the report is written from all rows.

    python scripts/speculative_decode.py --raw docs/results/raw/speculative-cpu.jsonl \
        --out docs/results/speculative

`--min-speedup` and `--min-code-speedup` are the ratios the report checks each cell against.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from draftapprox.eval import ruler
from draftapprox.eval.answer_log import Results, read
from draftapprox.generation import Prepared, encode, generate_prepared, new_state, prepare
from draftapprox.kernels.probe import cpu_name
from draftapprox.methods import FullKV, make
from draftapprox.models.loading import load_pair, precision
from draftapprox.report_pages import publish, table
from draftapprox.speculative import parse

CODE_PROMPTS = (
    "Write a Python function that parses an ISO 8601 date string into a timezone-aware datetime, with a "
    "docstring and a few doctests.",
    "Implement an LRU cache class in Python with get and put in O(1), using OrderedDict, with type hints.",
    "Write a C function that reverses a singly linked list in place and a main() that tests it.",
)


def method_of(label: str):
    """`fullkv`, or NAME@BUDGET (a count or a ratio)."""
    if label == "fullkv":
        return FullKV()
    name, budget = label.split("@")
    return make(name, float(budget) if "." in budget else int(budget))


def prompts(pair, args) -> list[tuple[str, str, int, object, int]]:
    """(id, kind, length, token ids, new tokens) of every prompt of the run."""
    out = []
    for length in args.lengths:
        for task in args.tasks:
            for index in range(args.samples):
                sample = ruler.generate_sample(pair.tokenizer, task, length, index, args.seed)
                ids = ruler.encode(pair.tokenizer, sample.context + sample.question, sample.answer_prefix)
                out.append((f"ruler-{length}-{task}-{index}", f"RULER {length}", ids.shape[1], ids, args.new_tokens))
    for index, text in enumerate(CODE_PROMPTS[:args.code_prompts]):
        ids = encode(pair, text, chat=True)
        out.append((f"code-{index}", "chat/code", ids.shape[1], ids, args.code_new_tokens))
    return out


def measure(args) -> None:
    results = Results(args.raw)
    pair = load_pair(dtype=args.dtype)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = {"cpu": cpu_name(), "target": precision(pair.target), "draft": precision(pair.draft), "commit": commit}
    for pid, kind, n, ids, new in prompts(pair, args):
        todo = [(m, p) for m in args.methods for p in args.proposals if f"{pid}|{m}|{p}" not in results.done]
        if not todo:
            continue
        state = new_state(pair, ids, new)  # one prefill and lookahead per prompt, shared by its methods
        for label, proposals in todo:
            prepared = prepare(pair, ids, method_of(label), max_new_tokens=new, state=state,
                               speculative=parse(proposals))
            runs = [generate_prepared(pair, copied(prepared)) for _ in range(args.repeats)]
            result = runs[0]
            if any(r.tokens != result.tokens for r in runs):
                raise SystemExit(f"{pid} {label}: the repeats decoded different tokens")
            seconds = statistics.median(r.record.timings["decode"] for r in runs)
            record = result.record
            results.append({"key": f"{pid}|{label}|{proposals}", "prompt": pid, "kind": kind, "length": n,
                            "method": label, "proposals": proposals, "tokens": result.tokens,
                            "new_tokens": record.new_tokens, "decode_seconds": seconds,
                            "decode_runs": [r.record.timings["decode"] for r in runs],
                            "proposed": record.proposed_tokens, "accepted": record.accepted_tokens,
                            "kv_bytes_kept": record.kv_bytes_kept, "kv_bytes_draft": record.kv_bytes_draft,
                            "env": env, "finished": time.time()})
            print(f"{pid} {label} speculative={proposals}: {record.new_tokens} tokens, "
                  f"{record.new_tokens / seconds:.1f} tokens/s, "
                  f"{record.accepted_tokens}/{record.proposed_tokens} accepted", flush=True)


def copied(p: Prepared) -> Prepared:
    """A prepared request with a cache (and a drafter) of its own: decoding takes over what it is given, so each
    repeat decodes a copy of the same prepared request, in the cache's own layout (not `twin`'s batch layout)."""
    return dataclasses.replace(p, cache=copy.deepcopy(p.cache), drafter=p.drafter and p.drafter.copy())


def report(args) -> None:
    rows = [r for r in read(args.raw) if r.get("method") in args.methods]
    if not rows:
        raise SystemExit(f"no rows in {args.raw}")
    base = {(r["prompt"], r["method"]): r for r in rows if r["proposals"] == "0"}
    cells: dict[tuple, dict] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        plain = base.get((r["prompt"], r["method"]))
        if plain is None:
            continue
        c = cells[r["kind"], r["method"], r["proposals"]]
        c["prompts"] += 1
        c["tokens"] += r["new_tokens"]
        c["seconds"] += r["decode_seconds"]
        c["plain_seconds"] += plain["decode_seconds"]
        c["proposed"] += r["proposed"]
        c["accepted"] += r["accepted"]
        c["same"] += r["tokens"] == plain["tokens"]
    kinds = sorted({k for k, _, _ in cells}, key=lambda k: (k == "chat/code", k))
    settings = [p for p in args.proposals if p != "0"]
    misses = []
    body = []
    for kind in kinds:
        target = args.min_code_speedup if kind == "chat/code" else args.min_speedup
        out = []
        for method in args.methods:
            for proposals in args.proposals:
                c = cells.get((kind, method, proposals))
                if not c:
                    continue
                speedup = c["plain_seconds"] / c["seconds"]
                rate = c["accepted"] / c["proposed"] if c["proposed"] else None
                verdict = "" if proposals == "0" else ("met" if speedup >= target else "missed")
                if verdict == "missed":
                    misses.append(f"{kind} {method} speculative={proposals}: {speedup:.2f}x")
                out.append([method, proposals, f"{int(c['prompts'])}", f"{int(c['tokens'])}",
                            f"{c['tokens'] / c['seconds']:.1f}", f"{speedup:.2f}x",
                            "-" if rate is None else f"{rate:.0%}", f"{int(c['same'])}/{int(c['prompts'])}",
                            verdict and f"{verdict} (>= {target}x)"])
        body += [f"### {kind}", ""]
        body += table(["method", "speculative", "prompts", "tokens", "decode tokens/s", "x without", "accepted",
                       "same greedy tokens", "target"], out)
        body.append("")
    env = rows[0]["env"]
    intro = [f"Decode speed at batch 1 with the draft proposing tokens (`speculative`) against decoding without "
             f"it, on {env['cpu']}; target {env['target']}, draft {env['draft']}, commit {env['commit']}. "
             "Decode seconds are the record's (from the first new token to the last), the median of "
             f"{args.repeats} decodes of the same prepared request; tokens/s weights every prompt by its tokens. "
             "RULER answers run to their end of sequence (a few to tens of tokens); the code "
             f"prompts to {args.code_new_tokens} tokens. A prompt's methods share its prefill and the draft's "
             "lookahead, as `eval` shares them.", ""]
    summary = ["Cells under their target: " + ("; ".join(misses) if misses else "none") + "."]
    command = ("python scripts/speculative_decode.py --raw " + str(args.raw) + " --out " + str(args.out)
               + f" --lengths {','.join(map(str, args.lengths))} --tasks {','.join(args.tasks)}"
               + f" --samples {args.samples} --proposals {','.join(args.proposals)} --repeats {args.repeats}")
    args.out.mkdir(parents=True, exist_ok=True)
    publish(args.out / "README.md", intro, command, body + summary)
    _plot(cells, kinds, args.methods, settings, args.out / "speedup.png", env["cpu"])
    print(f"wrote {args.out / 'README.md'}")


def _plot(cells, kinds, methods, settings, path: Path, cpu: str) -> None:
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), sharey=True, squeeze=False)
    width = 0.8 / max(1, len(settings))
    for ax, kind in zip(axes[0], kinds, strict=True):
        for i, proposals in enumerate(settings):
            values = []
            for method in methods:
                c = cells.get((kind, method, proposals))
                values.append(c["plain_seconds"] / c["seconds"] if c else 0)
            ax.bar([x + i * width for x in range(len(methods))], values, width, label=f"speculative={proposals}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([x + width * (len(settings) - 1) / 2 for x in range(len(methods))], methods, rotation=20,
                      fontsize=8)
        ax.set_title(kind, fontsize=10)
    axes[0][0].set_ylabel("decode speed vs without (x)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"Speculative decoding, batch 1 — {cpu}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--tasks", default="niah_single_2,niah_multikey_1,vt,fwe,qa_1",
                        type=lambda s: s.split(","))
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--code-prompts", type=int, default=3)
    parser.add_argument("--methods", default="fullkv,speckv@256,verispeckv@128,specpc@0.25",
                        type=lambda s: s.split(","))
    parser.add_argument("--proposals", default="0,4,auto", type=lambda s: s.split(","))
    parser.add_argument("--new-tokens", type=int, default=64, help="RULER answers' limit (most end sooner)")
    parser.add_argument("--code-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="decodes of each prepared request; the median counts")
    parser.add_argument("--raw", type=Path, default=Path("docs/results/raw/speculative-cpu.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/speculative"))
    parser.add_argument("--min-speedup", type=float, default=1.3)
    parser.add_argument("--min-code-speedup", type=float, default=1.5)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if "0" not in args.proposals:
        parser.error("--proposals must include 0, the baseline")
    if not args.report_only:
        measure(args)
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
