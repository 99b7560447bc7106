"""Tables and plots of the evaluation protocol from answer files (`draftapprox eval report`).

Per length and budget: rows = methods, columns = tasks + the mean over tasks with its 95% bootstrap interval;
FullKV (ceiling) and the draft alone (floor) appear in every table. `accuracy.csv` has one row per (method,
length, budget, task), plus task "average". Peers (method names with a ':', e.g. `kvpress:snapkv`) are drawn
dashed. Nothing here interprets the numbers: the prose of a report is written by a person reading them.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError
from ..report_pages import splice
from ..safe_write import check_writable_folder, replace_generated, save_figure
from .answer_log import ANSWER_FIELDS, label_of
from .metrics import bootstrap_mean_over_tasks, mean
from .ruler import TASKS

REFERENCES = ("fullkv", "draft")
CSV_FIELDS = ["method", "length", "budget", "task", "score", "n", "ci_low", "ci_high"]


def read_keyed(paths: list[Path], key: Callable[[dict], object], what: str, required: tuple[str, ...] = ("key",)
               ) -> dict:
    """The rows of JSONL files by `key(row)`, a later row overriding an earlier one of the same key (a rerun's
    answer replaces the old one); a line that is not such a row (not JSON, or without the `required` fields: a
    file of another kind) is an InputError naming its file and line. An unfinished last line that does not parse
    is a write in flight (a grid still running, or killed mid-write), which the next run cuts: it is left out, not
    an error."""
    rows: dict = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no such file: {path}")
        lines = path.read_bytes().split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or any(field not in row for field in required):
                    raise KeyError(number)
                rows[key(row)] = row
            except (ValueError, KeyError, TypeError, AttributeError) as error:  # UnicodeDecodeError is a ValueError
                if number == len(lines) and isinstance(error, json.JSONDecodeError):  # no newline after it yet
                    continue
                raise InputError(f"{path}:{number}: not {what}") from None
    return rows


def load(paths: list[Path]) -> list[dict]:
    return list(read_keyed(paths, lambda row: row["key"], "an answer line written by `draftapprox eval`",
                           ANSWER_FIELDS).values())


def cells(rows: list[dict]) -> dict[tuple[int, str, object], dict[str, list[float]]]:
    """(length, method, budget) -> task -> scores."""
    out: dict[tuple[int, str, object], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[(r["length"], r["method"], r["budget"])][r["task"]].append(r["score"])
    return out


def _task_order(tasks: set[str]) -> list[str]:
    return [t for t in TASKS if t in tasks] + sorted(tasks - set(TASKS))


def _complete(scores: dict[str, list[float]], tasks: list[str]) -> bool:
    return all(scores.get(t) for t in tasks)


def write(paths: list[Path], out: Path, command: str | None = None) -> list[Path]:
    rows = load(paths)
    if not rows:
        raise InputError("no answers in the input files")
    out = Path(out)
    check_writable_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    table = cells(rows)
    written = [_write_csv(table, out / "accuracy.csv"), _write_markdown(rows, table, out / "accuracy.md", command)]
    written += _plot(table, out)
    return written


def _summaries(table) -> list[dict]:
    summary = []
    for (length, method, budget), by_task in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                    str(kv[0][2]))):
        for task in _task_order(set(by_task)):
            s = by_task[task]
            _, lo, hi = bootstrap_mean_over_tasks({task: s})
            summary.append(dict(method=method, length=length, budget=budget, task=task, score=round(mean(s), 2),
                                n=len(s), ci_low=_round(lo), ci_high=_round(hi)))
        point, lo, hi = bootstrap_mean_over_tasks(dict(by_task))
        summary.append(dict(method=method, length=length, budget=budget, task="average", score=round(point, 2),
                            n=sum(len(v) for v in by_task.values()), ci_low=_round(lo), ci_high=_round(hi)))
    return summary


def _round(bound: float | None) -> float | str:
    return "" if bound is None else round(bound, 2)  # no interval: an empty CSV cell


def write_csv(path: Path, fields: list[str], rows: list[dict], what: str) -> Path:
    """A generated CSV table, written only over a file that is one (its header is ours)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fields)
    writer.writeheader()
    writer.writerows(rows)
    header = ",".join(fields)
    return replace_generated(path, buffer.getvalue(), lambda text: text.splitlines()[0] == header, what)


def _write_csv(table, path: Path) -> Path:
    rows = [{**row, "budget": "" if row["budget"] is None else row["budget"]} for row in _summaries(table)]
    return write_csv(path, CSV_FIELDS, rows, "results table")


def _budget_sort(b: object) -> tuple[int, float]:
    """None (FullKV, the draft) first, then KV budgets, then keep ratios."""
    if b is None:
        return (-1, 0.0)
    return (0, float(b)) if isinstance(b, int) else (1, float(b))  # type: ignore[arg-type]


def _environments(rows: list[dict]) -> list[str]:
    """One line per distinct environment with the answers it wrote: a grid spanning sessions can span library
    versions too, and a reader must be able to see that (peers record their own virtualenv's)."""
    def text(env: dict) -> str:
        return ", ".join(f"{k} ({text(v)})" if isinstance(v, dict) else f"{k} {v}" for k, v in env.items())

    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[text(row.get("env", {})) or "not recorded"] += 1
    return ["Environments (answers from each):", ""] + [
        f"- {n}: {env}" for env, n in sorted(counts.items(), key=lambda item: -item[1])] + [""]


def _write_markdown(rows: list[dict], table, path: Path, command: str | None) -> Path:
    finished = sorted(r["finished"] for r in rows if "finished" in r)
    compute = sum(r["seconds"] + sum(r.get("shared_timings", {}).values()) for r in rows)
    lines = ["# RULER accuracy (generated tables)", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += [f"Answers: {len(rows)}. Compute time summed over answers: {compute / 3600:.2f} h"
              + (f" (first to last answer: {(finished[-1] - finished[0]) / 3600:.2f} h)" if finished else "") + ".",
              "", *_environments(rows),
              "Scores are RULER's (string_match_all; string_match_part for QA) x 100. `avg [lo, hi]` is the mean "
              "over tasks with its 95% stratified bootstrap interval; `n` is the fewest answers of any task in a row. "
              "Peers (`kvpress:` query-agnostic pipeline, `kvpress-qa:` question inside the compressed context, "
              "`llmlingua:`) get their own tables beside our methods of the same name.", ""]
    by_length: dict[int, dict] = defaultdict(dict)
    for (length, method, budget), by_task in table.items():
        by_length[length][(method, budget)] = by_task
    lines += _summary(by_length)
    for length in sorted(by_length):
        group = by_length[length]
        refs = [(m, None) for m in REFERENCES if (m, None) in group]
        for budget in sorted({b for (_, b) in group if b is not None}, key=_budget_sort):
            kind = "KV budget (pairs per head)" if isinstance(budget, int) else "prompt keep ratio"
            members = sorted([(m, b) for (m, b) in group if b == budget], key=lambda k: _order(k[0]))
            ours = [k for k in members if ":" not in k[0]]
            peers = [k for k in members if ":" in k[0]]
            lines += _table(f"## {length} tokens, {kind} {budget}", group, refs + ours)
            if peers:
                same = [k for k in ours if any(p[0].split(":", 1)[1].split("(")[0] == k[0] for p in peers)]
                lines += _table(f"### Peers at {length} tokens, {kind} {budget}", group, refs + same + peers)
    lines += _by_draft(rows) + _by_survival(rows) + _paired(rows)
    splice(path, "\n".join(lines))
    return path


def _by_draft(rows: list[dict]) -> list[str]:
    """Each method's answers split by whether the draft model, answering the same prompt alone, was right: how far
    a draft-based method rides on its draft's own answer (and whether a prompt-only one does not)."""
    draft = {r["sample"]: r["score"] == 100 for r in rows if r["method"] == "draft"}
    if not draft:
        return []
    split: dict[tuple[int, str, object], dict[bool, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["sample"] in draft and r["method"] != "draft" and ":" not in r["method"]:
            split[(r["length"], r["method"], r["budget"])][draft[r["sample"]]].append(r["score"])
    return _split_table("By the draft's own answer", "whether the draft model alone answered the same prompt "
                        "fully right", ("draft right", "draft wrong"), split)


def _by_survival(rows: list[dict]) -> list[str]:
    """A prompt compressor's answers split by whether every expected answer is still whole in the compressed
    prompt it gave the target (for rows that carry that prompt): a compressor that cuts a token out of the needle
    loses the answer however well it ranks the rest."""
    split: dict[tuple[int, str, object], dict[bool, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if "compressed" in r:
            whole = all(answer in r["compressed"] for answer in r["expected"])
            split[(r["length"], r["method"], r["budget"])][whole].append(r["score"])
    return _split_table("Is the answer still in the compressed prompt?", "whether every expected answer string is "
                        "whole in the compressed prompt the target answered", ("answer kept", "answer cut"), split)


def _split_table(title: str, by: str, columns: tuple[str, str], split: dict) -> list[str]:
    """Each (length, method, budget)'s answers in two groups (True, then False), pooled over tasks."""
    if not split:
        return []
    lines = [f"## {title}", "", f"Answers pooled over tasks, split by {by}. Means over answers with a 95% "
             "bootstrap interval over answers; n answers.", "",
             f"| length | method | budget | {columns[0]}: mean [95% CI] (n) | {columns[1]}: mean [95% CI] (n) |",
             "|---|---|---|---|---|"]
    for (length, method, budget) in sorted(split, key=lambda k: (k[0], _order(k[1]), _budget_sort(k[2]))):
        cells_ = [f"{_avg({'all': v})} ({len(v)})" if (v := split[(length, method, budget)].get(group)) else "-"
                  for group in (True, False)]
        lines.append(f"| {length} | {method} | {'' if budget is None else budget} | " + " | ".join(cells_) + " |")
    return [*lines, ""]


DRAFT_BASED = ("speckv", "adaspeckv", "specpc")


def _paired(rows: list[dict]) -> list[str]:
    """The draft-based methods against every other method of the same length and budget, on the prompts both
    answered. Two methods' own intervals can overlap while the difference between them, prompt by prompt, is
    clear (a hard prompt is hard for both), so the differences a report states are judged here."""
    answers: dict[tuple[int, str, object], dict[str, tuple[str, float]]] = defaultdict(dict)
    for r in rows:
        answers[(r["length"], r["method"], r["budget"])][r["sample"]] = (r["task"], r["score"])
    lines = ["## Paired differences", "",
             "Mean over tasks of the per-prompt difference (column method minus row method) on the prompts both "
             "answered, with its 95% stratified bootstrap interval, then the number of prompts. Bold where the "
             "interval excludes zero.", ""]
    for length in sorted({k[0] for k in answers}):
        for budget in sorted({k[2] for k in answers if k[0] == length and k[2] is not None}, key=_budget_sort):
            ours = [m for m in DRAFT_BASED if (length, m, budget) in answers]
            if not ours:
                continue
            others = sorted({(m, b) for (n, m, b) in answers if n == length and b in (budget, None)},
                            key=lambda k: (k[1] is not None, ":" in k[0], _order(k[0])))
            kind = "KV budget" if isinstance(budget, int) else "keep ratio"
            lines += [f"### {length} tokens, {kind} {budget}", "",
                      "| row method | " + " | ".join(f"{m} minus row" for m in ours) + " |",
                      "|---" * (len(ours) + 1) + "|"]
            for method, b in others:
                cells_ = [paired_difference(answers[(length, mine, budget)], answers[(length, method, b)])[0]
                          if method != mine else "-" for mine in ours]
                lines.append(f"| {method} | " + " | ".join(cells_) + " |")
            lines.append("")
    return lines


def paired_difference(mine: dict[str, tuple[str, float]], theirs: dict[str, tuple[str, float]]
                      ) -> tuple[str, tuple[float, float | None, float | None, int] | None]:
    """Mean over tasks of the per-prompt difference on the prompts both answered, as text (bold where the 95%
    interval excludes zero) and as (point, low, high, prompts); ("-", None) when they share no prompt."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for sample in sorted(mine.keys() & theirs.keys()):  # a fixed order: the seeded bootstrap then repeats
        by_task[mine[sample][0]].append(mine[sample][1] - theirs[sample][1])
    if not by_task:
        return "-", None
    point, lo, hi = bootstrap_mean_over_tasks(by_task)
    n = sum(len(v) for v in by_task.values())
    if lo is None:
        return f"{point:+.1f} [n=1: no interval] ({n})", (point, lo, hi, n)
    text = f"{point:+.1f} [{lo:+.1f}, {hi:+.1f}]"
    return (f"**{text}**" if lo > 0 or hi < 0 else text) + f" ({n})", (point, lo, hi, n)


def _summary(by_length: dict[int, dict]) -> list[str]:
    """Per length and kind of budget, one table of every method's mean over all tasks (rows: budgets), the figures
    a report's prose quotes. Methods without every task at a budget, and peers, are left to the full tables."""
    lines = ["## Summary: mean over all tasks [95% CI]", ""]
    for length in sorted(by_length):
        group = by_length[length]
        tasks = _task_order({t for by_task in group.values() for t in by_task})
        kinds = (("KV budget", lambda b: isinstance(b, int)), ("keep ratio", lambda b: isinstance(b, float)))
        for kind, is_kind in kinds:
            budgets = sorted({b for (_, b) in group if b is not None and is_kind(b)}, key=_budget_sort)
            methods = sorted({m for (m, b) in group if b in budgets and ":" not in m}, key=_order)
            if not budgets:
                continue
            refs = [m for m in REFERENCES if (m, None) in group and _complete(group[(m, None)], tasks)]
            rows = []
            for budget in budgets:
                cells_ = [_avg(group[(m, None)]).replace("**", "") for m in refs]
                cells_ += [_avg(group[(m, budget)]).replace("**", "")
                           if (m, budget) in group and _complete(group[(m, budget)], tasks) else "-" for m in methods]
                rows.append(f"| {kind} {budget} | " + " | ".join(cells_) + " |")
            lines += [f"### {length} tokens, by {kind}", "", "| | " + " | ".join(refs + methods) + " |",
                      "|---" * (len(refs) + len(methods) + 1) + "|", *rows, ""]
    return lines


def _table(title: str, group: dict, keys: list) -> list[str]:
    """One table: per-task means, the mean over all tasks when a row has them all, and the mean over the tasks
    every row of the table has (what a partial grid can already compare), each with its bootstrap interval."""
    tasks = _task_order({t for key in keys for t in group[key]})
    common = [t for t in tasks if all(group[key].get(t) for key in keys)]
    lines = [title, "", f"Common tasks (every row has them): {len(common)} of {len(tasks)}.", "",
             "| method | " + " | ".join(tasks) + " | avg, all tasks [95% CI] | avg, common tasks [95% CI] | n |",
             "|---" * (len(tasks) + 4) + "|"]
    for key in keys:
        by_task = group[key]
        cells_ = [f"{mean(by_task[t]):.1f}" if by_task.get(t) else "-" for t in tasks]
        full = _avg({t: by_task[t] for t in tasks}) if _complete(by_task, tasks) else "(incomplete)"
        shared = _avg({t: by_task[t] for t in common}) if common else "-"
        n = min(len(v) for v in by_task.values())
        lines.append(f"| {key[0]} | " + " | ".join(cells_) + f" | {full} | {shared} | {n} |")
    return [*lines, ""]


def _avg(scores: dict[str, list[float]]) -> str:
    point, lo, hi = bootstrap_mean_over_tasks(scores)
    return f"**{point:.1f}** " + ("[n=1: no interval]" if lo is None else f"[{lo:.1f}, {hi:.1f}]")


_ORDER = ("fullkv", "draft", "streamingllm", "snapkv", "pyramidkv", "adakv", "laq", "speckv", "adaspeckv", "speckvpc",
          "recencypc", "randompc", "specprefill", "targetpc", "specpc")


def _order(method: str) -> tuple[int, str]:
    return (_ORDER.index(method), method) if method in _ORDER else (len(_ORDER), method)


Point = tuple[float, float, float | None, float | None]  # (budget, mean over tasks, interval low, high)


def _series(cells_: dict, refs: dict) -> tuple[set[str], dict[str, list[Point]]]:
    """The tasks every plotted point averages, and each method's points with their bootstrap intervals. The tasks
    are those every cell of ours (and each reference) has: all, once complete. A peer's point is drawn only where
    it has them all too, so a partly run peer cannot shrink the set."""
    ours = [v for k, v in cells_.items() if ":" not in k[1]]
    common = set.intersection(*(set(v) for v in [*ours, *refs.values()])) if ours else set()
    series: dict[str, list[Point]] = defaultdict(list)
    for (_, method, budget), by_task in cells_.items():
        if common and common <= {t for t, scores in by_task.items() if scores}:
            series[method].append((float(budget), *bootstrap_mean_over_tasks({t: by_task[t] for t in sorted(common)})))
    return common, series


# A colour per method, the same on every plot: a peer's press takes the colour of our method of the same name,
# so ours and theirs sit side by side (solid and dashed). The two panels may reuse colours.
_COLOURS = {"streamingllm": "tab:brown", "snapkv": "tab:orange", "pyramidkv": "tab:olive", "adakv": "tab:green",
            "laq": "tab:cyan", "speckv": "tab:blue", "adaspeckv": "tab:purple", "speckvpc": "navy",
            "expectedattention": "tab:red", "kvzip": "tab:pink",
            "recencypc": "tab:brown", "randompc": "tab:olive", "specprefill": "tab:orange", "targetpc": "tab:green",
            "specpc": "tab:blue", "longllmlingua": "tab:red"}


def _style(method: str, fallback: int) -> dict:
    """Bold for the draft-based methods, dashed for peers, dash-dotted for SpecKV-PC so that SpecKV shows through
    where the two are equal (prompts within its prompt budget); a method's knob variants share its colour."""
    base = method.split(":")[-1].split("(")[0]
    spare = ("tab:pink", "tab:gray", "tab:cyan", "tab:red", "gold", "black")
    style = {"color": _COLOURS.get(base, spare[fallback % len(spare)]), "linewidth": 1.3, "linestyle": "-",
             "marker": "osD^vx+*pPh<>"[fallback % 13], "markersize": 5, "markerfacecolor": "none", "capsize": 2,
             "elinewidth": 0.8}
    if base in (*DRAFT_BASED, "speckvpc"):
        style["linewidth"] = 2.2
    if ":" in method:
        style["linestyle"] = "--"
    elif base == "speckvpc":
        style["linestyle"] = "-."
    return style


def _plot(table, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    kinds = ((True, "KV cache methods (budget = pairs per KV head)"), (False, "prompt compression (keep ratio)"))
    for length in sorted({k[0] for k in table}):
        panels = [(integer, title, {k: v for k, v in table.items()
                                    if k[0] == length and k[2] is not None and isinstance(k[2], int) == integer})
                  for integer, title in kinds]
        panels = [panel for panel in panels if panel[2]]  # a grid of KV methods only gets no empty second panel
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 4.8), squeeze=False)
        for ax, (integer, title, cells_) in zip(axes[0], panels, strict=True):
            refs = {m: table[(length, m, None)] for m in REFERENCES if (length, m, None) in table}
            common, series = _series(cells_, refs)
            for i, (method, points) in enumerate(sorted(series.items(), key=lambda kv: _order(kv[0]))):
                xs, ys, los, his = zip(*sorted(points), strict=True)
                below = [y - lo if lo is not None else 0 for y, lo in zip(ys, los, strict=True)]
                above = [hi - y if hi is not None else 0 for y, hi in zip(ys, his, strict=True)]
                ax.errorbar(xs, ys, yerr=[below, above], label=method, **_style(method, i))
            for (ref, by_task), style in zip(refs.items(), (":", "-."), strict=False):
                if common:
                    ax.axhline(mean([mean(by_task[t]) for t in common]), color="gray", linestyle=style, label=ref)
            ax.set_title(f"{title}\nmean over {len(common)} tasks, 95% bootstrap intervals\n"
                         "(a peer's points: where it has all those tasks)", fontsize=10)
            ax.set_xlabel("budget" if integer else "keep ratio")
            ax.set_ylabel("mean RULER score over tasks")
            if integer:
                ax.set_xscale("log", base=2)
            # ticks where points stand, written as given (128, not 2^7)
            ticks = sorted({x for points in series.values() for x, *_ in points})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            if common:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
            else:
                ax.text(0.5, 0.5, "no task that every method has answered yet", ha="center",
                        transform=ax.transAxes)
        fig.suptitle(f"RULER, {length}-token prompts")
        fig.tight_layout()
        path = out / f"accuracy-{length}.png"
        save_figure(fig, path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def diff(rows: list[dict], method: str, against: str, width: int = 120) -> list[str]:
    """Markdown of the prompts where `method` and `against` scored differently, the largest loss first and the
    gains last, each with the expected answer, both answers and the draft's alone: what a gap's investigation
    reads first, to tell a wrong answer from one the scorer missed. An unknown label is an InputError naming the
    known ones."""
    by_label: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_label[label_of(r["key"])][r["sample"]] = r
    for name in (method, against):
        if name not in by_label:
            raise InputError(f"no answers labelled {name!r}; the files hold: {', '.join(sorted(by_label))}")
    mine, theirs, draft = by_label[method], by_label[against], by_label.get("draft", {})
    both = sorted(mine.keys() & theirs.keys())
    delta = {s: mine[s]["score"] - theirs[s]["score"] for s in both}
    differ = sorted((s for s in both if delta[s]), key=lambda s: (delta[s] > 0, -abs(delta[s]), s))
    below = sum(delta[s] < 0 for s in both)

    def cell(row: dict | None) -> str:
        if row is None:
            return "-"
        text = " ".join(str(row.get("prediction", "")).split()).replace("|", "\\|")
        return f"{text[:width]}{'…' if len(text) > width else ''} ({row['score']:.0f})"

    with_draft = "draft" not in (method, against)
    header = ["prompt", "difference", "expected", f"{against} (score)", f"{method} (score)"]
    header += ["draft alone (score)"] if with_draft else []
    lines = [f"`{method}` against `{against}` on the {len(both)} prompts both answered: below on {below}, above "
             f"on {len(differ) - below}, level on {len(both) - len(differ)}.", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for s in differ:
        cells_ = [s, f"{delta[s]:+.0f}", ", ".join(map(str, theirs[s].get("expected", []))).replace("|", "\\|"),
                  cell(theirs[s]), cell(mine[s])]
        cells_ += [cell(draft.get(s))] if with_draft else []
        lines.append("| " + " | ".join(cells_) + " |")
    return [*lines, ""]
