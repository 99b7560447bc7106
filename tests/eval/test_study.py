"""`draftapprox eval study`: candidates compared on the development split, the chosen method on the test split,
the draft-right/wrong groups, the goal verdicts and the headline, from answer rows as `eval` writes them."""

import csv
import json
from pathlib import Path

import pytest

from draftapprox.bench import report
from draftapprox.bench.targets import load
from draftapprox.errors import InputError
from draftapprox.eval import study
from draftapprox.report_pages import END, START

TASKS = ("niah_single_1", "vt")


def rows(method, budget, scores, indices, length=2048, split=True):
    """One answer per (task, index) with the given score for each index (the same on both tasks)."""
    out = []
    for task in TASKS:
        for index, score in zip(indices, scores, strict=True):
            sample = f"{task}/{length}/42/{index}"
            label = method if budget is None else f"{method}@{budget}"
            row = {"key": f"{sample}|{label}", "sample": sample, "task": task, "index": index, "length": length,
                   "method": method, "budget": budget, "score": score}
            if split:
                row["split"] = "dev" if index < 5 else "test"
            out.append(row)
    return out


GOALS = load(Path(__file__).parents[2] / "scripts" / "targets" / "robust-speckv.toml", study.TARGETS)


def grid(tmp_path):
    dev, test = range(5), range(5, 10)
    answers = [
        # the draft is right on indices 0-2 and 5-7, wrong on 3-4 and 8-9 (rows older than the split field)
        *rows("draft", None, [100, 100, 100, 0, 0] * 2, range(10), split=False),
        *rows("fullkv", None, [100] * 10, range(10), split=False),
        *rows("speckv", 128, [100, 100, 100, 0, 0] * 2, range(10), split=False),
        *rows("snapkv", 128, [0, 0, 0, 100, 100] * 2, range(10), split=False),
        *rows("adaspeckv", 64, [100] * 5 + [0, 0, 0, 0, 100], range(10), split=False),
        *rows("verispeckv(correct=0)", 128, [100, 100, 100, 50, 0], dev),
        *rows("verispeckv", 128, [100, 100, 100, 100, 100], dev),
        *rows("verispeckv", 128, [100, 100, 100, 100, 0], test),
        *rows("verispeckv", 64, [100, 100, 0, 0, 100], test),
        # a candidate's test answers it was not chosen on must not reach the test tables
        *rows("verispeckv(correct=0)", 128, [0] * 5, test),
    ]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in answers))
    return path


def test_study_compares_candidates_on_dev_and_the_chosen_one_on_test(tmp_path):
    out = tmp_path / "robust.md"
    out.write_text(f"Chosen method: old\n# Robust SpecKV\n\nProse.\n\n{START}\nold\n{END}\nAfter.\n")
    study.write([grid(tmp_path)], out, "verispeckv", command="scripts/robust-speckv.sh", targets=GOALS)
    md = out.read_text()
    first, rest = md.split("\n", 1)
    assert first.startswith("Chosen method: verispeckv(window=8, kernel=7, pool=max, reduction=max, verify=True, "
                            "redraft=1, correct=8,")
    assert rest.startswith("# Robust SpecKV\n\nProse.") and rest.rstrip().endswith("After.")
    dev = md.split("## Development study")[1]
    # on dev: verispeckv 100 everywhere; draft-wrong prompts (3, 4): SpecKV 0, verispeckv 100
    assert "| verispeckv | 100.0 [100.0, 100.0] (10) | 100.0 [100.0, 100.0] (6) | 100.0 [100.0, 100.0] (4) |" in dev
    assert "| verispeckv(correct=0) |" in dev
    test = md.split("## Test set")[1].split("## Development study")[0]
    assert "verispeckv(correct=0)" not in test
    # test at 128: verispeckv 100,100,100,100,0 vs SpecKV 100,100,100,0,0: +20 overall, +0 draft right,
    # +50 draft wrong (pooled over tasks)
    line = next(x for x in test.split("### 2048 tokens, budget 128")[1].splitlines() if x.startswith("| speckv |"))
    assert "+20.0" in line and line.count("+0.0 [+0.0, +0.0]") == 1 and "+50.0" in line
    goals = md.split("## Goal figures")[1].split("## Test set")[0]
    assert "| budget 128: within 5 points of FullKV | -20.0" in goals and "missed" in goals
    assert "| budget 64: ahead of Ada-SpecKV | +40.0" in goals
    assert "no more than 1 point below SpecKV | +0.0 [+0.0, +0.0] (6 prompts) | met |" in goals
    assert "| 4,096 tokens, budget 256: within 3 points of FullKV | not measured yet |" in goals
    with open(out.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    cell = next(r for r in table if r["split"] == "test" and r["method"] == "speckv" and r["group"] == "draft wrong")
    assert cell["score"] == "0.0" and cell["n"] == "4"
    assert out.with_suffix(".png").is_file()


def test_without_targets_no_goal_is_judged_and_a_wrong_goal_is_refused(tmp_path):
    out = tmp_path / "robust.md"
    study.write([grid(tmp_path)], out, "verispeckv")
    assert "## Goal figures" not in out.read_text() and "## Test set" in out.read_text()
    for goal, message in (({"say": "x", "length": 2048, "budget": 128}, "a test"),
                          ({"say": "x", "length": 2048, "budget": 128, "against": "fullkv", "at_least": 0,
                            "above": 0}, "exactly one"),
                          ({"say": "x", "length": 2048, "budget": 128, "against": "fullkv", "over": 1}, "over")):
        with pytest.raises(InputError, match=message):
            study.check_goals({"goal": [goal]})


def test_study_refuses_an_unknown_chosen_method(tmp_path):
    from draftapprox.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown method"):
        study.write([grid(tmp_path)], tmp_path / "x.md", "nosuchkv")


def test_before_a_method_is_chosen_only_the_development_study_is_written(tmp_path):
    out = tmp_path / "robust.md"
    study.write([grid(tmp_path)], out, None)
    md = out.read_text()
    assert md.startswith("Chosen method: none yet") and "## Development study" in md
    assert "## Test set" not in md and "## Goal figures" not in md


def bench_file(path, task, speckv, mine):
    """A benchmark run on one `task` prompt: SpecKV's and verispeckv's time to first token at 2,048 tokens."""
    rows = [{"key": f"{m}@128|2048", "method": m, "length": 2048, "first_token": t, "decode_per_token": 0.2,
             "env": {"settings": {"task": task}}} for m, t in (("speckv", speckv), ("verispeckv", mine))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_timed_prompt_has_its_table_and_the_goal_takes_the_slowest(tmp_path):
    out = tmp_path / "robust.md"
    timed = [bench_file(tmp_path / "a.jsonl", "niah_multikey_1", 10.0, 10.5),
             bench_file(tmp_path / "b.jsonl", "vt", 10.0, 12.0)]
    study.write([grid(tmp_path)], out, "verispeckv", [report.load([path]) for path in timed], targets=GOALS)
    md = out.read_text()
    assert "## Time (one benchmark run, a `niah_multikey_1` prompt)" in md and "1.05x" in md
    assert "## Time (one benchmark run, a `vt` prompt)" in md
    assert "| time to first token at most 1.1x SpecKV's (the slowest prompt timed) | 1.20x | missed |" in md
