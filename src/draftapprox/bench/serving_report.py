"""`docs/results/serving.md` from the rows of `bench serve`: throughput and latency per method and concurrency,
the requests a KV pool holds, the targets given, and the prefill-chunk stall trade-off, with plots."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..errors import InputError
from ..eval.answer_log import read
from ..report_pages import splice, table
from ..safe_write import save_figure

MIB = 2**20
POOL = 512 * MIB  # the pool the fit table and the target use


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(cell: dict) -> dict:
    """A cell's figures: wall time from the first request sent to the last token, and what it implies."""
    requests = cell["requests"]
    wall = max(r["end"] for r in requests)
    tokens = sum(r["usage"]["completion_tokens"] for r in requests)
    ttft = [r["stamps"][0] - r["start"] for r in requests]
    itl = [b - a for r in requests for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    records = [r["record"] for r in requests]
    per_token = records[0]["kv_bytes_full"] / records[0]["prompt_tokens"]
    held = statistics.mean(rec["kv_bytes_kept"] + rec["new_tokens"] * per_token for rec in records)
    return {"wall": wall, "requests_per_minute": len(requests) / wall * 60, "tokens_per_second": tokens / wall,
            "decode_tokens_per_second": cell["decode_tokens"] / cell["decode_seconds"] if cell["decode_seconds"]
            else None, "decode_batch": cell["decode_tokens"] / cell["decode_steps"] if cell["decode_steps"] else None,
            "ttft_p50": _percentile(ttft, 0.5), "ttft_p99": _percentile(ttft, 0.99),
            "itl_p50": _percentile(itl, 0.5), "itl_p99": _percentile(itl, 0.99), "kv_held": held,
            "fit": int(POOL // held)}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _load(paths: list[Path]) -> tuple[dict, list[dict], dict]:
    cells, stalls, decodes = {}, [], {}
    for path in paths:
        for row in read(path):
            if row.get("kind") == "cell":
                cells[(row["method"], row["length"], row["clients"])] = row
            elif row.get("kind") == "stall":
                stalls.append(row)
            elif row.get("kind") == "decode":
                decodes[(row["method"], row["length"], row["clients"])] = row
    if not cells and not stalls:
        raise InputError(f"no `bench serve` rows in {', '.join(map(str, paths))}")
    return cells, decodes, sorted(stalls, key=lambda r: (r["prefill_chunk"] != "auto", r["prefill_chunk"]
                                                if r["prefill_chunk"] != "auto" else 0))


def stall_points(stalls: list[dict]) -> list[dict]:
    out = []
    for row in stalls:
        steady = statistics.median(row["steady_gaps"]) if row["steady_gaps"] else None
        p99 = _percentile(row["gaps_during"], 0.99)
        out.append({"chunk": row["prefill_chunk"], "steady": steady, "p99": p99,
                    "ratio": p99 / steady if steady and p99 else None, "ttft": row["admitted_first_token"],
                    "tokens": row["admitted_prompt_tokens"]})
    return out


def write(paths: list[Path], out: Path, command: str | None = None, goals: dict | None = None) -> list[Path]:
    """serving.md and its plots; `goals`: thresholds of `TARGETS` to check."""
    cells, decodes, stalls = _load(paths)
    out.mkdir(parents=True, exist_ok=True)
    figures = {key: summarize(cell) for key, cell in cells.items()}
    methods = list(dict.fromkeys(m for m, _, _ in cells))
    lengths = sorted({n for _, n, _ in cells})
    env = next(iter(cells.values()))["env"] if cells else stalls[0]["env"]
    lines = [f"Our server (`draftapprox serve`, {env['dtype']}, {env['threads']} CPU threads) under concurrent "
             f"streaming clients; RULER `{env['task']}` prompts as token ids, {env['new_tokens']} new tokens each "
             "(EOS ignored), every request of a cell sent at once. One run: read ratios, not absolute seconds.",
             "Decode-phase tokens/s counts decode steps only (the server's `draftapprox_decode_step_seconds`), "
             "prefill excluded; `tokens/step` is the mean number of tokens a step gave: the sequences it decoded, more "
             "where they speculate (`METHOD+spec=K`: the draft proposed, the target checked).", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    header = ["method", "clients", "requests/min", "tokens/s", "decode tokens/s", "tokens/step", "TTFT p50 s",
              "TTFT p99 s", "ITL p50 s", "ITL p99 s", "KV MiB/request"]
    for n in lengths:
        body = []
        for m in methods:
            for c in sorted(c for mm, nn, c in cells if mm == m and nn == n):
                f = figures[(m, n, c)]
                body.append([m, str(c), _fmt(f["requests_per_minute"]), _fmt(f["tokens_per_second"]),
                             _fmt(f["decode_tokens_per_second"]), _fmt(f["decode_batch"], 1), _fmt(f["ttft_p50"], 1),
                             _fmt(f["ttft_p99"], 1), _fmt(f["itl_p50"], 3), _fmt(f["itl_p99"], 3),
                             _fmt(f["kv_held"] / MIB, 1)])
        lines += [f"### {n}-token prompts", "", *table(header, body), ""]
    fit = {m: next((figures[k]["fit"] for k in sorted(figures, key=lambda k: -k[1]) if k[0] == m), None)
           for m in methods}
    longest = max(lengths) if lengths else None
    if longest:
        base = fit.get("fullkv")
        lines += [f"### Concurrent {longest}-token requests a {POOL // MIB} MiB KV pool holds", "",
                  "The scheduler admits a request when its KV bytes after compression (kept prompt + new tokens) fit "
                  "beside the running ones; from the bytes each method really kept in this run:", "",
                  *table(["method", "requests", "x FullKV"],
                         [[m, str(fit[m]), _fmt(fit[m] / base, 1) if base else ""] for m in methods]), ""]
    if decodes:
        base = {(n, c): r for (m, n, c), r in decodes.items() if m == "fullkv"}
        lines += ["### The decode phase once every request is admitted", "",
                  "`scripts/serve_decode.py`: copies of one prepared RULER request join one `DecodeBatch`, the "
                  "scheduler's own decode step, and its steps are timed (median after the first, which stacks the "
                  "caches). In the grid above a CPU's prefills are so long that short answers finish before the "
                  "next request is admitted, so the batch rarely fills.", "",
                  *table(["method", "prompt tokens", "requests", "step s", "tokens/s", "x FullKV"],
                         [[m, str(n), str(c), _fmt(r["median_step"], 3), _fmt(r["tokens_per_second"]),
                           _fmt(r["tokens_per_second"] / base[(n, c)]["tokens_per_second"]) if (n, c) in base
                           else ""] for (m, n, c), r in sorted(decodes.items(), key=lambda kv: kv[0][1:])]), ""]
    lines += ["### Targets", "", *_targets(figures, fit, longest, decodes, goals or {}), ""]
    points = stall_points(stalls)
    if points:
        fixed = [p for p in points if p["chunk"] != "auto"]
        chosen = max((p for p in fixed if p["ratio"] is not None and p["ratio"] <= 4), key=lambda p: p["chunk"],
                     default=None)
        lines += [f"### The stall a {points[0]['tokens']}-token admission puts on a running stream, per prefill "
                  "chunk", "",
                  *table(["prefill chunk", "steady step s", "ITL p99 during s", "x steady", "admitted TTFT s"],
                         [[str(p["chunk"]), _fmt(p["steady"], 3), _fmt(p["p99"], 3), _fmt(p["ratio"], 1),
                           _fmt(p["ttft"], 1)] for p in points]), "",
                  f"Largest chunk keeping the running stream's ITL p99 within 4x its steady step: "
                  f"{chosen['chunk'] if chosen else 'none measured'}.", ""]
    path = out / "serving.md"
    splice(path, "\n".join(lines))
    return [path, *_plot(figures, methods, lengths, points, out)]


TARGETS = {
    "speckv_fit_over_fullkv": "SpecKV@256's concurrent requests over FullKV's in the fit table's pool, at least",
    "speckv_decode_over_fullkv_8_clients": "8 clients at the longest prompts: SpecKV@256 decode tokens/s over "
                                           "FullKV's, at least",
    "speckv_decode_over_fullkv_8_decoding": "8 requests decoding together: SpecKV@256 tokens/s over FullKV's, at "
                                            "least",
    "specpc_requests_over_fullkv_4_clients": "4 clients at the longest prompts: SpecPC@0.25 requests/min over "
                                             "FullKV's, at least",
}
"""The targets `write` checks when given them (`bench serve --targets FILE`), by name."""


def _targets(figures: dict, fit: dict, longest: int | None, decodes: dict, goals: dict) -> list[str]:
    rows = []

    def ratio(a, b):
        return a / b if a is not None and b else None

    def check(name: str, goal: str, value: float | None) -> None:
        if goal in goals:
            rows.append([f"{name} >= {goals[goal]:g}x", _fmt(value, 1 if goal.endswith("fit_over_fullkv") else 2),
                         "" if value is None else "met" if value >= goals[goal] else "missed"])

    if longest:
        check(f"SpecKV@256 holds FullKV's concurrent requests in {POOL // MIB} MiB",
              "speckv_fit_over_fullkv", ratio(fit.get("speckv@256"), fit.get("fullkv")))
        a, b = figures.get(("speckv@256", longest, 8)), figures.get(("fullkv", longest, 8))
        check(f"8 clients, {longest} tokens: SpecKV@256 decode tokens/s over FullKV's (the grid)",
              "speckv_decode_over_fullkv_8_clients",
              ratio(a and a["decode_tokens_per_second"], b and b["decode_tokens_per_second"]))
        a, b = decodes.get(("speckv@256", longest, 8)), decodes.get(("fullkv", longest, 8))
        check(f"8 requests of {longest} tokens decoding together: SpecKV@256 tokens/s over FullKV's",
              "speckv_decode_over_fullkv_8_decoding", ratio(a and a["tokens_per_second"], b and b["tokens_per_second"]))
        a, b = figures.get(("specpc@0.25", longest, 4)), figures.get(("fullkv", longest, 4))
        check(f"4 clients, {longest} tokens: SpecPC@0.25 requests/min over FullKV's",
              "specpc_requests_over_fullkv_4_clients",
              ratio(a and a["requests_per_minute"], b and b["requests_per_minute"]))
    if not rows:
        return ["(no targets given: `draftapprox bench serve --targets FILE`)"]
    return table(["target", "ratio", "verdict"], rows)


def _plot(figures: dict, methods: list[str], lengths: list[int], points: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if figures:
        fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.6), squeeze=False)
        for ax, n in zip(axes[0], lengths, strict=True):
            for m in methods:
                keys = sorted((k for k in figures if k[0] == m and k[1] == n), key=lambda k: k[2])
                if keys:
                    ax.plot([k[2] for k in keys], [figures[k]["requests_per_minute"] for k in keys], "o-", label=m)
            ax.set(title=f"{n}-token prompts", xlabel="concurrent clients", ylabel="requests per minute")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "serving-throughput.png")
        save_figure(fig, paths[-1], dpi=120)
        plt.close(fig)
    usable = [p for p in points if p["ratio"] is not None]
    if usable:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.plot([p["ttft"] for p in usable], [p["ratio"] for p in usable], "o-")
        for p in usable:
            ax.annotate(str(p["chunk"]), (p["ttft"], p["ratio"]), textcoords="offset points", xytext=(4, 4))
        ax.axhline(4, color="gray", ls="--", lw=1)
        ax.set(xlabel="admitted request's time to first token, s", ylabel="running stream's ITL p99 / steady step",
               title="Prefill chunk: stall against admission")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "serving-stall.png")
        save_figure(fig, paths[-1], dpi=120)
        plt.close(fig)
    return paths
