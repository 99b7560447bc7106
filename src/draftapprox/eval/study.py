"""The development/test study of a new method against its baselines (`draftapprox eval study`), as
docs/results/robust-speckv.md reports VeriSpecKV's.

The split decides what may be compared: candidates are compared on the development samples (where they were
chosen), the chosen method against the baselines on the test samples (answered once, never used to choose), each
row's split read from the row (or, for rows older than the field, from its sample index by the same rule).
Every figure is a mean over tasks with a 95% stratified bootstrap interval; differences are paired, prompt by
prompt, on the prompts both methods answered; "draft right" means the draft model alone answered that prompt fully
right. The goal figures' verdicts apply the thresholds of the goals given (a targets file) to these numbers and
nothing else.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..errors import InputError
from ..report_pages import is_report, splice, table
from ..safe_write import replace_generated, save_figure
from .harness import parse_method
from .metrics import bootstrap_mean_over_tasks
from .report import load, paired_difference, write_csv
from .ruler import split_of

BASELINES = ("fullkv", "draft", "snapkv", "speckv", "adaspeckv")
HEADLINE = "Chosen method: "
CSV_FIELDS = ["split", "length", "method", "budget", "group", "score", "ci_low", "ci_high", "n"]
Answers = dict[str, tuple[str, float]]  # sample -> (task, score)


class Study:
    """Answers by (split, length, method, budget), and which prompts the draft alone got right."""

    def __init__(self, rows: list[dict]) -> None:
        self.answers: dict[tuple[str, int, str, object], Answers] = defaultdict(dict)
        for r in rows:
            split = r.get("split") or split_of(r["index"])
            self.answers[(split, r["length"], r["method"], r["budget"])][r["sample"]] = (r["task"], r["score"])
        self.right = {s: score == 100 for (_, _, m, _), a in self.answers.items() if m == "draft"
                      for s, (_, score) in a.items()}

    def get(self, split: str, length: int, method: str, budget: object) -> Answers:
        """A method's answers; FullKV and the draft have no budget and serve every budget."""
        return self.answers.get((split, length, method, None if method in ("fullkv", "draft") else budget), {})

    def methods(self, split: str, length: int) -> list[str]:
        found = {m for (s, n, m, _) in self.answers if s == split and n == length}
        return [m for m in BASELINES if m in found] + sorted(found - set(BASELINES))

    def budgets(self, split: str, length: int, method: str | None = None) -> list[int]:
        """The KV budgets answered in a split at a length (by `method`, where given)."""
        return sorted({b for (s, n, m, b) in self.answers if s == split and n == length and isinstance(b, int)
                       and method in (None, m)})

    def lengths(self, split: str, method: str | None = None) -> list[int]:
        """The prompt lengths answered in a split (by `method`, where given)."""
        return sorted({n for (s, n, m, _) in self.answers if s == split and method in (None, m)})

    def group(self, answers: Answers, which: str) -> Answers:
        """All answers (means over tasks), or those where the draft was right or wrong, pooled over tasks (one
        stratum: the split leaves some tasks one prompt or none, and a mean over tasks would then weigh one
        prompt as a whole task), as the accuracy report's own split does."""
        if which == "all":
            return answers
        want = which == "draft right"
        return {s: ("pooled", a[1]) for s, a in answers.items() if s in self.right and self.right[s] == want}


GROUPS = ("all", "draft right", "draft wrong")


def mean_over_tasks(answers: Answers) -> tuple[float | None, float | None, float | None, int]:
    if not answers:
        return None, None, None, 0
    by_task: dict[str, list[float]] = defaultdict(list)
    for task, score in answers.values():
        by_task[task].append(score)
    point, lo, hi = bootstrap_mean_over_tasks(dict(sorted(by_task.items())))
    return point, lo, hi, len(answers)


def _cell(answers: Answers) -> str:
    point, lo, hi, n = mean_over_tasks(answers)
    if point is None:
        return "-"
    return f"{point:.1f} " + ("[no interval]" if lo is None else f"[{lo:.1f}, {hi:.1f}]") + f" ({n})"


def _difference(study: Study, mine: Answers, theirs: Answers, which: str) -> tuple[str, tuple | None]:
    """The paired difference within one group of prompts, as text and as numbers for the verdicts."""
    return paired_difference(study.group(mine, which), study.group(theirs, which))


def development(study: Study) -> list[str]:
    """Every candidate and baseline on the development prompts, split by the draft's answer, with its paired
    difference from SpecKV at the same budget (what each idea buys) on all prompts and on the draft-wrong ones."""
    lines = ["## Development study (samples 0-4 of every task)", "",
             "Every idea was tried and every knob chosen on these prompts. Cells: mean over tasks (draft right, "
             "draft wrong: over answers) [95% bootstrap interval] (answers). The last two columns are paired "
             "differences from SpecKV at the same budget, bold where the interval excludes zero.", ""]
    for length, budget in [(n, b) for n in study.lengths("dev") for b in study.budgets("dev", n)]:
        speckv = study.get("dev", length, "speckv", budget)
        rows = []
        for method in study.methods("dev", length):
            answers = study.get("dev", length, method, budget)
            if not answers:
                continue
            diffs = ["-", "-"] if method == "speckv" else [
                _difference(study, answers, speckv, which)[0] for which in ("all", "draft wrong")]
            rows.append([method, *(_cell(study.group(answers, g)) for g in GROUPS), *diffs])
        lines += [f"### {length} tokens, budget {budget}", "",
                  *table(["method", "all", "draft right", "draft wrong", "minus SpecKV (all)",
                          "minus SpecKV (draft wrong)"], rows), ""]
    return lines


def test_set(study: Study, chosen: str, length: int, budgets: list[int]) -> list[str]:
    """The chosen method against the baselines on the test prompts, overall and split by the draft's answer."""
    lines = []
    for budget in budgets:
        mine = study.get("test", length, chosen, budget)
        if not mine:
            continue
        rows = [[chosen, *(_cell(study.group(mine, g)) for g in GROUPS), "-", "-", "-"]]
        for method in BASELINES:
            theirs = study.get("test", length, method, budget)
            if theirs:
                rows.append([method, *(_cell(study.group(theirs, g)) for g in GROUPS),
                             *(_difference(study, mine, theirs, g)[0] for g in GROUPS)])
        lines += [f"### {length} tokens, budget {budget}", "",
                  *table(["method", "all", "draft right", "draft wrong", f"{chosen} minus row (all)",
                          "(draft right)", "(draft wrong)"], rows), ""]
    return lines


def timing(rows: dict, chosen: str) -> tuple[list[str], float | None]:
    """Time to first token and decode step of SpecKV and the chosen method from one benchmark file (one prompt:
    its task says whether the draft's answer held there, which is what the verification's cost depends on)."""
    name = parse_method(chosen)[0]
    found = {("speckv" if r["method"] == "speckv" else chosen, length): r for (_, length), r in rows.items()
             if r["method"] in ("speckv", name)}
    out = []
    ratio = None
    for length in sorted({n for _, n in found}):
        spec, mine = found.get(("speckv", length)), found.get((chosen, length))
        if spec is None or mine is None:
            continue
        ratio = mine["first_token"] / spec["first_token"]
        out.append([str(length), f"{spec['first_token']:.2f}", f"{mine['first_token']:.2f}", f"{ratio:.2f}x",
                    f"{spec['decode_per_token']:.3f}", f"{mine['decode_per_token']:.3f}",
                    f"{mine['decode_per_token'] / spec['decode_per_token']:.2f}x"])
    if not out:
        return [], None
    task = next(iter(found.values())).get("env", {}).get("settings", {}).get("task", "?")
    return [f"## Time (one benchmark run, a `{task}` prompt)", "",
            *table(["length", "SpecKV first token (s)", f"{chosen} first token (s)", "ratio",
                    "SpecKV decode step (s)", f"{chosen} decode step (s)", "ratio"], out), ""], ratio


GOAL_KEYS = {"say", "length", "budget", "against", "group", "at_least", "above", "interval_above"}
TARGETS = {
    "goal": "a goal on the test prompts (a table per goal): `say`, `length`, `budget`, `against` (a method), "
            "optionally `group` (draft right / draft wrong), and `at_least` (the paired difference), `above` (it) "
            "or `interval_above` (its interval's low end)",
    "ttft_over_speckv": "the chosen method's time to first token over SpecKV's (the slowest prompt timed), at most",
}
"""What `eval study --targets FILE` may hold."""


def check_goals(goals: dict) -> None:
    """Refuse a goal that names no test, or a key the study does not know, before any answer is read."""
    for goal in goals.get("goal", []):
        unknown = set(goal) - GOAL_KEYS
        if unknown or not {"say", "length", "budget", "against"} <= set(goal):
            raise InputError(f"a goal takes say, length, budget, against and a test (at_least, above or "
                             f"interval_above), optionally group; got {sorted(goal)}")
        if len({"at_least", "above", "interval_above"} & set(goal)) != 1:
            raise InputError(f"goal {goal['say']!r}: give exactly one of at_least, above, interval_above")


def goals(study: Study, chosen: str, ttft_ratio: float | None, targets: dict) -> list[str]:
    """The goal figures on the test prompts, each with its number and verdict."""
    def diff(length: int, budget: int, other: str, which: str) -> tuple | None:
        mine, theirs = study.get("test", length, chosen, budget), study.get("test", length, other, budget)
        return _difference(study, mine, theirs, which)[1] if mine and theirs else None

    def holds(goal: dict, numbers: tuple) -> bool:
        point, lo, _, _ = numbers
        if "interval_above" in goal:
            return lo is not None and lo > goal["interval_above"]
        return point > goal["above"] if "above" in goal else point >= goal["at_least"]

    rows = []
    for goal in targets.get("goal", []):
        numbers = diff(goal["length"], goal["budget"], goal["against"], goal.get("group", "all"))
        if numbers is None:
            rows.append([goal["say"], "not measured yet", ""])
            continue
        point, lo, hi, n = numbers
        interval = "no interval" if lo is None else f"[{lo:+.1f}, {hi:+.1f}]"
        rows.append([goal["say"], f"{point:+.1f} {interval} ({n} prompts)", "met" if holds(goal, numbers) else
                     "missed"])
    limit = targets.get("ttft_over_speckv")
    if limit is not None:
        rows.append([f"time to first token at most {limit:g}x SpecKV's (the slowest prompt timed)",
                     "not measured yet" if ttft_ratio is None else f"{ttft_ratio:.2f}x",
                     "" if ttft_ratio is None else "met" if ttft_ratio <= limit else "missed"])
    if not rows:
        return []
    return ["## Goal figures (test prompts)", "",
            "Differences are the chosen method minus the named one, paired by prompt, mean over tasks "
            "[95% interval]. A point estimate that meets a threshold its interval straddles is met on the point "
            "alone; the interval says how sure.", "",
            *table(["goal", "measured", "verdict"], rows), ""]


def csv_rows(study: Study) -> list[dict]:
    out = []
    for (split, length, method, budget), answers in sorted(study.answers.items(), key=str):
        for which in GROUPS:
            point, lo, hi, n = mean_over_tasks(study.group(answers, which))
            if point is not None:
                out.append(dict(split=split, length=length, method=method, budget="" if budget is None else budget,
                                group=which, score=round(point, 2), ci_low="" if lo is None else round(lo, 2),
                                ci_high="" if hi is None else round(hi, 2), n=n))
    return out




def _plot(study: Study, chosen: str | None, path: Path) -> Path | None:
    """Left: every candidate on the development prompts at each budget, draft right and wrong; right: the chosen
    method against the baselines on the test prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = study.lengths("dev")
    if not lengths:
        return None
    length = lengths[0]  # the shortest: where the development study runs its whole grid
    dev = [m for m in study.methods("dev", length) if m not in ("fullkv", "draft")]
    budgets = study.budgets("dev", length)
    if not dev or not budgets:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.32 * len(dev) * len(budgets) + 2.5),
                             gridspec_kw={"width_ratios": [3, 2]})
    labels, right, wrong = [], [], []
    for budget in budgets:
        for method in dev:
            answers = study.get("dev", length, method, budget)
            if answers:
                labels.append(f"{method} @{budget}")
                right.append(mean_over_tasks(study.group(answers, "draft right"))[0] or 0)
                wrong.append(mean_over_tasks(study.group(answers, "draft wrong"))[0] or 0)
    y = range(len(labels))
    axes[0].barh([i + 0.2 for i in y], right, height=0.4, label="draft right", color="tab:blue")
    axes[0].barh([i - 0.2 for i in y], wrong, height=0.4, label="draft wrong", color="tab:red")
    axes[0].set_yticks(list(y), labels, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("RULER score (development prompts, mean over tasks)")
    axes[0].legend(loc="lower right")
    for method in ([chosen] if chosen else []) + list(BASELINES):
        points = [(b, mean_over_tasks(study.get("test", length, method, b))) for b in budgets]
        points = [(b, m) for b, m in points if m[0] is not None]
        if points:
            axes[1].errorbar([b for b, _ in points], [m[0] for _, m in points],
                             yerr=[[m[0] - (m[1] if m[1] is not None else m[0]) for _, m in points],
                                   [(m[2] if m[2] is not None else m[0]) - m[0] for _, m in points]],
                             marker="o", capsize=2, label=method, linewidth=2.2 if method == chosen else 1.2)
    if not axes[1].lines:
        axes[1].set_visible(False)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("KV budget (pairs per head)")
    axes[1].set_ylabel("RULER score (test prompts)")
    axes[1].legend(fontsize=7)
    axes[1].set_title(f"test prompts, {length:,} tokens")
    fig.tight_layout()
    saved = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return saved


def headline(chosen: str | None) -> str:
    """The report's first line: the chosen method with every knob, or that none is chosen yet."""
    from ..methods import make

    if chosen is None:
        return f"{HEADLINE}none yet (the development study is under way; nothing below is a test-set figure)"
    name, knobs = parse_method(chosen)
    method = make(name, **knobs)
    return f"{HEADLINE}{name}(" + ", ".join(f"{f.name}={getattr(method, f.name)}" for f in method.knobs()) + ")"


def write(paths: list[Path], out: Path, chosen: str | None, timings: list[dict] | None = None,
          command: str | None = None, targets: dict | None = None) -> list[Path]:
    """robust-speckv.md (first line: the chosen method with its knobs), its CSV and its plot. Without a chosen
    method (the study still under way) only the development study is written. `timings`: benchmark files' rows
    (`bench.report.load`, one file per prompt) with SpecKV and the chosen method timed; `targets`: the goals to
    judge (`TARGETS`)."""
    rows = load(paths)
    if not rows:
        raise InputError("no answers in the input files")
    first = headline(chosen)
    study = Study(rows)
    ratio, time_lines = None, []
    if timings and chosen is not None:
        timed = [timing(rows, chosen) for rows in timings]
        time_lines = [line for lines, _ in timed for line in lines]
        ratio = max((r for _, r in timed if r is not None), default=None)  # the goal is judged on the slowest
    lines = ["The protocol: RULER samples 0-4 of every task are the development set, 5-9 the test set "
             "(`draftapprox eval --split`); each answer row records its split. Baselines come from the main grid, "
             "on the same prompts and precision.", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    if chosen is not None:
        lines += goals(study, chosen, ratio, targets or {})
        lines += ["## Test set (samples 5-9, answered once by the chosen method)", "",
                  "Cells: mean over tasks (draft right, draft wrong: over answers) [95% bootstrap interval] "
                  f"(answers); the last three columns are paired differences, {chosen} minus the row, bold where "
                  "the interval excludes zero.", ""]
        for length in study.lengths("test", chosen):
            lines += test_set(study, chosen, length, study.budgets("test", length, chosen))
    lines += time_lines + development(study)
    out = Path(out)
    splice(out, "\n".join(lines))
    text = out.read_text()
    body = text.split("\n", 1)[1] if text.startswith(HEADLINE) else text
    replace_generated(out, f"{first}\n{body}", is_report)
    written = [out, write_csv(out.with_suffix(".csv"), CSV_FIELDS, csv_rows(study), "study table")]
    figure = _plot(study, chosen, out.with_suffix(".png"))
    return written + ([figure] if figure else [])
