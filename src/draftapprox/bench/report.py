"""Tables and plots of a benchmark JSONL (`draftapprox bench report`): time to first token and its phases, decode
time per token, memory, each as a ratio to FullKV at the same length, and the targets given checked
against the floors measured in the same run."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

from ..errors import InputError
from ..eval.report import read_keyed
from ..report_pages import splice, table
from ..safe_write import save_figure
from .run import DRAFT_LIMIT, DRAFT_PREFILL, FLOORS, TARGET_LIMIT, TARGET_PREFILL

PHASES = ("draft", "self_lookahead", "target_scoring", "scoring", "target_prefill", "target_lookahead",
          "compression", "refeed", DRAFT_PREFILL, TARGET_PREFILL, "engine_prefill", "gemm_bound")
MB = 2**20


def load(paths: list[Path]) -> dict[tuple[str, int], dict]:
    rows = read_keyed(paths, lambda row: (row["key"].split("|")[0], row["length"]),
                      "a row written by `draftapprox bench`", ("key", "length", "first_token"))
    if not rows:
        raise InputError("no benchmark rows in the input files")
    return rows


def _ratio(value: float | None, base: float | None) -> str:
    return "" if value is None or not base else f" ({value / base:.2f}x)"


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def _floor(rows, label: str) -> bool:
    """Floors, limits and engines: what the methods are measured against, drawn dotted."""
    return any(r["method"] in FLOORS or r["method"].startswith("engine:") for (job, _), r in rows.items()
               if job == label)


def _jobs(rows) -> list[str]:
    labels = dict.fromkeys(label for label, _ in rows)
    return sorted(labels, key=lambda j: (j.split()[0] != "fullkv", _floor(rows, j), j))


def write(paths: list[Path], out: Path, command: str | None = None, baseline: list[Path] | None = None,
          goals: dict[str, float] | None = None) -> list[Path]:
    """performance.md and the plots; `baseline`: an earlier run of the same protocol (an older engine on the same
    kind of machine), each job's times set against its own there; `goals`: thresholds of `TARGETS` to check."""
    rows = load(paths)
    base = load(baseline) if baseline else None  # a bad file is refused before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = sorted({n for _, n in rows})
    jobs = _jobs(rows)
    full = {n: rows.get(("fullkv", n)) for n in lengths}
    env = next(iter(rows.values()))["env"]
    settings = env.get("settings", {})
    target_dtypes = {r["env"]["dtype"] for r in rows.values() if r["method"] != DRAFT_PREFILL}
    repeats = sorted({len(r["runs"]) for r in rows.values()})
    draft_dtypes = {r["env"].get("draft_dtype") for r in rows.values()} | {
        r["env"]["dtype"] for r in rows.values() if r["method"] == DRAFT_PREFILL}
    lines = [f"Machine: {env.get('cpu', env.get('machine'))}, device {env.get('device')}, {env.get('threads')} "
             f"threads; torch {env.get('torch')}, transformers {env.get('transformers')}, python {env.get('python')}.",
             f"Target {'/'.join(sorted(target_dtypes))}, draft {'/'.join(sorted(draft_dtypes - {None}))}; "
             f"prompts: RULER `{settings.get('task')}` (seed {settings.get('seed')}); each cell the median of "
             f"{' or '.join(map(str, repeats))} timed runs after one warm-up (per row: `runs` in the JSONL); "
             f"decode over {settings.get('new_tokens')} tokens.",
             ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["![Time to first token, KV cache held and peak memory against prompt length](performance-scaling.png)",
              "", f"![Phases of the time to first token at {lengths[-1]} tokens](performance-phases.png)", ""]

    def grid(title: str, cell) -> None:
        body = [[job, *(cell(rows.get((job, n)), full.get(n)) for n in lengths)] for job in jobs]
        lines.extend([f"### {title}", "", *table(["job", *(f"{n} tokens" for n in lengths)], body), ""])

    grid("Time to first token, seconds (x FullKV)",
         lambda r, f: "" if r is None else _fmt(r["first_token"]) + _ratio(r["first_token"], f and f["first_token"]))
    grid("Decode, seconds per token (x FullKV)",
         lambda r, f: "" if r is None or r["decode_per_token"] is None else
         _fmt(r["decode_per_token"], digits=3) + _ratio(r["decode_per_token"], f and f["decode_per_token"]))
    grid("KV cache held while decoding, MiB (x FullKV)",
         lambda r, f: "" if r is None or r["kv_bytes"] is None else
         _fmt(r["kv_bytes"], MB, 1) + _ratio(r["kv_bytes"], f and f["kv_bytes"]))
    grid("Peak process memory (RSS), MiB (difference to FullKV)",
         lambda r, f: "" if r is None or r["peak_rss"] is None else _fmt(r["peak_rss"], MB, 0) + (
             "" if not f or f["peak_rss"] is None else f" ({(r['peak_rss'] - f['peak_rss']) / MB:+.0f})"))
    grid("Peak activation memory (RSS above the weights during the run), MiB",
         lambda r, f: "" if r is None or r["extra_rss"] is None else _fmt(r["extra_rss"], MB, 0))
    for n in lengths:
        present = [j for j in jobs if (j, n) in rows]
        phases = [p for p in PHASES if any(p in rows[(j, n)]["phases"] for j in present)]
        body = [[j, *(_fmt(rows[(j, n)]["phases"].get(p)) if p in rows[(j, n)]["phases"] else "" for p in phases),
                 _fmt(rows[(j, n)]["first_token"])] for j in present]
        lines.extend([f"### Phases of the time to first token at {n} tokens, seconds", "",
                      *table(["job", *phases, "first token"], body), ""])
    sparse = sparse_prefill(rows)
    if sparse:
        lines.extend(["### Sparse (vertical-slash) prefill against the dense one", "", *sparse, ""])
    lines.extend(["### Targets, from this run", "", *targets(rows, lengths, goals or {}), ""])
    versus = against_engines(rows)
    if versus:
        lines.extend(["### Against a real engine serving FullKV (same prompts, same file)", "", *versus, ""])
    if base:
        lines.extend([f"### Against an earlier run ({', '.join(f'`{Path(b).name}`' for b in baseline)})", "",
                      *against_baseline(rows, base), ""])
    rates = [r for r in rows.values() if r["method"] in (DRAFT_LIMIT, TARGET_LIMIT)]
    if rates:
        lines.extend(["Limits measured in this run: " + "; ".join(sorted({
            f"{r['method']} ({r['env']['dtype']}): GEMM {r['env']['rates']['gemm_flops'] / 1e9:.0f} GFLOP/s, GEMV "
            f"{r['env']['rates']['gemv_bytes'] / 1e9:.1f} GB/s" for r in rates})) + ".", ""])
    path = out / "performance.md"
    splice(path, "\n".join(lines))
    return [path, *_plot(rows, jobs, lengths, out)]


def _by_length(rows) -> list:
    """The rows as ((label, length), row), shortest prompt first, then by label: the order of the per-row tables."""
    return sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0]))


def _sparse(row: dict) -> bool:
    return str(row.get("knobs", {}).get("sparse_prefill", "")).lower() in ("true", "1", "yes")


def _first(rows, method: str, n: int) -> dict | None:
    """The first row of `method` at `n` tokens measured with the default settings (no variant, dense prefill)."""
    for (_, length), row in rows.items():
        if length == n and row["method"] == method and not row.get("variant") and not _sparse(row):
            return row
    return None


def sparse_prefill(rows) -> list[str]:
    """Target prefill with the vertical-slash pattern against SpecKV's dense one at the same length."""
    body = []
    for (label, n), row in _by_length(rows):
        dense = _first(rows, row["method"], n) if _sparse(row) else None
        if dense is not None:
            sparse_s, dense_s = row["phases"]["target_prefill"], dense["phases"]["target_prefill"]
            body.append([label, str(n), _fmt(dense_s), _fmt(sparse_s), f"{sparse_s / dense_s:.2f}x"])
    return table(["job", "tokens", "dense target prefill, s", "sparse, s", "ratio"], body) if body else []


TARGETS = {
    "specpc_first_token_over_floors": "SpecPC's first token over the draft's prefill plus the target's of the kept "
                                      "tokens, at most",
    "specpc_first_token_over_fullkv": "SpecPC's first token over FullKV's, at most",
    "specpc_cheaper_draft_first_token_over_fullkv": "SpecPC with a cheaper draft precision, over FullKV's, at most",
    "speckv_extra_work_over_fullkv_first_token": "SpecKV's target-side extra work over FullKV's first token, at most",
    "speckv_decode_over_fullkv": "SpecKV's decode per token over FullKV's, at most",
    "speckv_kv_bytes_tolerance": "SpecKV's KV bytes within this share of budget/prompt",
    "speckv_rss_over_draft_resident": "SpecKV's peak RSS over FullKV's, over the draft's resident size, at most",
    "fullkv_first_token_over_engine": "FullKV's first token over each real engine's, at most",
    "fullkv_decode_over_engine": "FullKV's decode per token over each real engine's, at most",
    "specpc_draft_over_gemm_bound": "SpecPC's draft pass over the draft's GEMM-bound prefill, at most",
    "fullkv_decode_over_bandwidth_limit": "FullKV's decode per token over the weight-bandwidth limit, at most",
    "bandwidth_limit_up_to_tokens": "the longest prompt the bandwidth-limit target applies to",
}
"""The targets `write` checks when given them (`bench report --targets FILE`), by name."""


def targets(rows, lengths, goals: dict[str, float]) -> list[str]:
    """Each of `goals` that this run measured, with its numbers and whether it holds."""
    if not goals:
        return ["(no targets given: `draftapprox bench report --targets FILE`)"]
    body = []

    def check(name: str, n: int, value: float, goal: str, holds=lambda v, limit: v <= limit) -> None:
        if goal in goals:
            limit = goals[goal]
            body.append([name, str(n), f"{value:.3f}", f"{limit:.3f}", "yes" if holds(value, limit) else "**no**"])

    for n in lengths:
        full, specpc = rows.get(("fullkv", n)), _first(rows, "specpc", n)
        draft = rows.get((DRAFT_PREFILL, n))
        if specpc is not None:
            kept = rows.get((f"{TARGET_PREFILL}@{specpc['budget']}", n))
            if draft and kept:
                floor = draft["first_token"] + kept["first_token"]
                check(f"{specpc['key'].split('|')[0]} first token / (draft prefill + target prefill of kept)", n,
                      specpc["first_token"] / floor, "specpc_first_token_over_floors")
            cheaper = [r for (_, length), r in rows.items() if length == n and r["method"] == "specpc"
                       and r["budget"] == specpc["budget"] and "draft=" in r.get("variant", "")]
            for row, goal in [(specpc, "specpc_first_token_over_fullkv"),
                              *((r, "specpc_cheaper_draft_first_token_over_fullkv") for r in cheaper)] if full else []:
                check(f"{row['key'].split('|')[0]} first token / FullKV's", n, row["first_token"] / full["first_token"],
                      goal)
        speckv = _first(rows, "speckv", n)
        if speckv is not None and full:
            label = speckv["key"].split("|")[0]
            # draft-token forward + scoring + compression (the refeed of the last prompt token is one decode step,
            # shown in the phase table)
            extra = sum(speckv["phases"].get(p, 0.0) for p in ("target_lookahead", "scoring", "compression"))
            check(f"{label} target-side extra work (draft-token forward + scoring + compression) / FullKV first "
                  "token", n, extra / full["first_token"], "speckv_extra_work_over_fullkv_first_token")
            check(f"{label} decode per token / FullKV's", n, speckv["decode_per_token"] / full["decode_per_token"],
                  "speckv_decode_over_fullkv")
            expected = min(speckv["budget"], n) / speckv["prompt_tokens"]
            actual = speckv["kv_bytes"] / speckv["kv_bytes_full"]
            check(f"{label} KV bytes / FullKV's, off budget/prompt = {expected:.4f} by this share", n,
                  abs(actual - expected) / expected, "speckv_kv_bytes_tolerance")
            if draft and draft["env"].get("loaded_rss") and speckv["peak_rss"] and full["peak_rss"]:
                draft_resident = draft["env"]["loaded_rss"]  # what loading the draft adds to a process
                over = speckv["peak_rss"] - full["peak_rss"]
                check(f"{label} peak RSS over FullKV's / draft's resident size", n, over / draft_resident,
                      "speckv_rss_over_draft_resident")
    for n in lengths:
        engine_speed(rows, n, check, goals)
    if not body:
        return ["(this run measured none of the targets given)"]
    return table(["target", "tokens", "measured", "limit", "holds"], body)


def _engines(rows, n: int) -> list[dict]:
    return [r for (_, length), r in sorted(rows.items()) if length == n and r["method"].startswith("engine:")]


def _name(row: dict) -> str:
    return row["key"].split("|")[0]


def engine_speed(rows, n: int, check, goals: dict[str, float]) -> None:
    """The engine-speed targets: our FullKV against each real engine in the same file, the draft's SpecPC pass and
    the decode step against the limits measured in the same run."""
    full = rows.get(("fullkv", n))
    target_limit, draft_limit = _first(rows, TARGET_LIMIT, n), _first(rows, DRAFT_LIMIT, n)
    for engine in _engines(rows, n) if full else []:
        check(f"FullKV first token / {_name(engine)}'s", n, full["first_token"] / engine["first_token"],
              "fullkv_first_token_over_engine")
        if engine["decode_per_token"]:
            check(f"FullKV decode per token / {_name(engine)}'s", n,
                  full["decode_per_token"] / engine["decode_per_token"], "fullkv_decode_over_engine")
    specpc = _first(rows, "specpc", n)
    if specpc and draft_limit and "draft" in specpc["phases"]:
        check("SpecPC draft pass / the draft's GEMM-bound prefill", n,
              specpc["phases"]["draft"] / draft_limit["first_token"], "specpc_draft_over_gemm_bound")
    if full and target_limit and n <= goals.get("bandwidth_limit_up_to_tokens", float("inf")):
        check("FullKV decode per token / the weight-bandwidth limit", n,
              full["decode_per_token"] / target_limit["decode_per_token"], "fullkv_decode_over_bandwidth_limit")


def against_engines(rows) -> list[str]:
    """What each method gains against every engine serving FullKV: first-token and decode time, as ratios (below
    1: ours is faster)."""
    names = sorted({_name(r) for r in rows.values() if r["method"].startswith("engine:")})
    body = []
    for (label, n), row in _by_length(rows):
        if not names or row["method"] in FLOORS or row["method"].startswith("engine:"):
            continue
        cells = []
        for name in names:
            engine = rows.get((name, n))
            cells.append("-" if engine is None else f"{row['first_token'] / engine['first_token']:.2f}x")
            cells.append("-" if engine is None or not engine["decode_per_token"] or not row["decode_per_token"]
                         else f"{row['decode_per_token'] / engine['decode_per_token']:.2f}x")
        body.append([label, str(n), *cells])
    if not body:
        return []
    header = ["job", "tokens"] + [f"{kind} / {name}'s" for name in names for kind in ("first token", "decode")]
    return table(header, body)


def against_baseline(rows, base) -> list[str]:
    """Each job's first-token and decode time against the same job's in an earlier run (below 1: faster now).
    Only a run of the same protocol on the same kind of machine makes this a comparison of engines; the
    machine each ran on is named beside it."""
    body = []
    for (label, n), row in _by_length(rows):
        old = base.get((label, n))
        if old is None or row["method"].startswith("engine:"):
            continue
        now_d, old_d = row["decode_per_token"], old["decode_per_token"]
        body.append([label, str(n), _fmt(old["first_token"]), _fmt(row["first_token"]),
                     f"{row['first_token'] / old['first_token']:.2f}x",
                     _fmt(old_d, digits=3), _fmt(now_d, digits=3), f"{now_d / old_d:.2f}x" if now_d and old_d else "-"])
    if not body:
        return ["No job was measured at the same length in both runs."]
    machines = [next(iter(r.values()))["env"].get("cpu", "?") for r in (base, rows)]
    return [f"Machines: earlier {machines[0]}, now {machines[1]}.", "",
            *table(["job", "tokens", "first token then, s", "now, s", "now / then", "decode then, s/token", "now",
                    "now / then"], body)]


def _plot(rows, jobs: list[str], lengths: list[int], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    series = defaultdict(list)
    for (job, n), row in rows.items():
        series[job].append((n, row))
    for job in jobs:
        points = sorted(series[job], key=lambda p: p[0])
        if points[0][1].get("variant") or _sparse(points[0][1]):
            continue  # variants are in the tables; the plots show the default settings
        style = ":" if _floor(rows, job) else "-"
        xs = [n for n, _ in points]
        axes[0].plot(xs, [r["first_token"] for _, r in points], style, marker="o", label=job)
        if all(r["peak_rss"] is not None for _, r in points):
            axes[2].plot(xs, [r["peak_rss"] / MB for _, r in points], style, marker="o", label=job)
        if all(r["kv_bytes"] is not None for _, r in points):
            axes[1].plot(xs, [r["kv_bytes"] / MB for _, r in points], style, marker="o", label=job)
    for ax, title, unit in ((axes[0], "time to first token", "seconds"),
                            (axes[1], "KV cache held while decoding", "MiB"),
                            (axes[2], "peak process memory (RSS)", "MiB")):
        ax.set_title(title)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        if ax is not axes[2]:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    scaling = out / "performance-scaling.png"
    save_figure(fig, scaling, dpi=120)
    plt.close(fig)

    n = lengths[-1]
    present = [j for j in jobs if (j, n) in rows and not _floor(rows, j)]
    fig, ax = plt.subplots(figsize=(10, 0.7 * len(present) + 1.5))
    labels = [textwrap.fill(j, 34) for j in present]  # a job's settings can be longer than the bars' width
    left = [0.0] * len(present)
    for phase in PHASES:
        widths = [rows[(j, n)]["phases"].get(phase, 0.0) for j in present]
        if any(widths):
            ax.barh(labels, widths, left=left, label=phase)
            left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("seconds")
    ax.set_title(f"phases of the time to first token, {n}-token prompt")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(present)), ncol=len(PHASES))
    phases = out / "performance-phases.png"
    save_figure(fig, phases, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [scaling, phases]
