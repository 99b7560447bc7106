"""Where the time goes on each path of the engine, against the physical limits measured in the same process:
the draft's SpecPC pass, the target's prefill (GEMM-bound) and a decode step (weight-bandwidth-bound), at several
prompt lengths. torch.profiler's operators are grouped into matrix multiplies, attention and the rest, and the
table is written between the generated-table markers of docs/results/profile-epyc.md.

    python scripts/profile_paths.py --lengths 1024,2048,4096,8192 --out docs/results/profile-epyc.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from draftapprox.bench import limits
from draftapprox.cache import new_cache, reserve
from draftapprox.eval import ruler
from draftapprox.forward import forward
from draftapprox.generation import compress_prompt, new_state
from draftapprox.methods import make
from draftapprox.models.loading import load_pair, precision
from draftapprox.report_pages import splice, table

GROUPS = {
    "matrix multiplies": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "draftapprox::linear_bf16",
                          "aten::linear", "mkldnn::_linear_pointwise"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax", "aten::softmax",
                  "draftapprox::decode_attention", "draftapprox::prefill_attention"),
}
DECODE_STEPS = 8


def _group(name: str) -> str:
    return next((group for group, names in GROUPS.items() if name in names), "other")


def _profiled(fn) -> tuple[float, dict[str, float], list]:
    """Wall seconds of `fn` (run once, unprofiled), then its operators' self CPU seconds by group, and the top ones."""
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[_group(e.key)] += e.self_cpu_time_total / 1e6
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    return wall, groups, [(e.key, e.self_cpu_time_total / 1e6) for e in top]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=Path("docs/results/profile-epyc.md"))
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    pair = load_pair(dtype=args.dtype)
    target, draft = pair.target, pair.draft
    forward(target, torch.randint(100, 1000, (1, 128)), new_cache(), 0)  # warm-up: first calls, kernel loading
    rates = {"target": limits.rates(target), "draft": limits.rates(draft)}  # after it: a cold process measured low
    specpc = make("specpc", 0.25)
    rows, tops = [], []
    for n in lengths:
        sample = ruler.generate_sample(pair.tokenizer, "niah_multikey_1", n, 0)
        ids = ruler.encode(pair.tokenizer, sample.context + sample.question, sample.answer_prefix)
        m = ids.shape[1]
        target_bound = limits.bounds(target, rates["target"]["gemm_flops"], rates["target"]["gemv_bytes"], m)
        draft_bound = limits.bounds(draft, rates["draft"]["gemm_flops"], rates["draft"]["gemv_bytes"], m)

        def specpc_pass(ids=ids):
            compress_prompt(new_state(pair, ids, 1), specpc)

        caches = []

        def target_prefill(ids=ids, caches=caches):
            caches[:] = [new_cache()]
            forward(target, ids, caches[0], 0)
            reserve(caches[0], 2 * DECODE_STEPS)  # the decode steps below run twice, appending in place

        token, fed = torch.tensor([[pair.tokenizer.eos_token_id]]), [m]

        def decode_steps(caches=caches, fed=fed, token=token):
            for _ in range(DECODE_STEPS):
                forward(target, token, caches[0], fed[0], compressed=True)
                fed[0] += 1

        for path, fn, bound, steps in (("draft SpecPC pass", specpc_pass, draft_bound["prefill"], 1),
                                       ("target prefill", target_prefill, target_bound["prefill"], 1),
                                       ("decode step", decode_steps, target_bound["decode"], DECODE_STEPS)):
            wall, groups, top = _profiled(fn)
            total = sum(groups.values())
            per = wall / steps
            rows.append([path, str(m), f"{per:.3f}", f"{bound:.3f}", f"{per / bound:.2f}x",
                         *(f"{100 * groups.get(g, 0.0) / total:.0f}%" for g in (*GROUPS, "other"))])
            tops.append([path, str(m), ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in top[:4])])
            print(f"{path} at {m} tokens: {per:.3f} s (limit {bound:.3f} s)", file=sys.stderr, flush=True)
    fmt = {k: f"GEMM {v['gemm_flops'] / 1e9:.0f} GFLOP/s, GEMV {v['gemv_bytes'] / 1e9:.1f} GB/s"
           for k, v in rates.items()}
    lines = [f"Target {precision(target)}, draft {precision(draft)}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}. Limits measured in this process: target {fmt['target']}; draft "
             f"{fmt['draft']}. The prefill limit is the model's non-embedding multiply-adds at the GEMM rate; the "
             f"decode limit is the bytes a step reads (weights as stored but the input embedding, plus the KV cache) "
             f"at the GEMV rate; a decode step's time is the mean of {DECODE_STEPS}. Shares are of the profiled "
             "self CPU time.", "",
             f"Command: `python scripts/profile_paths.py --lengths {args.lengths} --dtype {args.dtype}`", "",
             *table(["path", "tokens", "seconds", "limit, s", "x limit", *GROUPS, "other"], rows), "",
             "Top operators (self CPU time):", "",
             *table(["path", "tokens", "operators"], tops), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    splice(args.out, "\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
