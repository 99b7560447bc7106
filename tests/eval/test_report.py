"""`draftapprox eval report`: tables, CSV, plots and the draft-split from answer files."""

import csv
import json

import pytest

from draftapprox.errors import InputError
from draftapprox.eval import report
from draftapprox.report_pages import END, START

FIXTURE = [
    # (method, budget, task, scores)
    ("fullkv", None, "niah_single_1", [100, 100]), ("fullkv", None, "vt", [100, 80]),
    ("draft", None, "niah_single_1", [0, 100]), ("draft", None, "vt", [20, 20]),
    ("snapkv", 64, "niah_single_1", [0, 0]), ("snapkv", 64, "vt", [40, 60]),
    ("speckv", 64, "niah_single_1", [100, 100]), ("speckv", 64, "vt", [100, 60]),
    ("specpc", 0.25, "niah_single_1", [100, 0]), ("specpc", 0.25, "vt", [60, 60]),
    ("kvpress:snapkv", 64, "niah_single_1", [0, 100]),  # incomplete: one task only
    ("streamingllm", 64, "niah_single_1", [0]), ("streamingllm", 64, "vt", [100]),  # one answer a task
]


def write_answers(path, fixture):
    with open(path, "w") as f:
        for method, budget, task, scores in fixture:
            for i, s in enumerate(scores):
                label = method if budget is None else f"{method}@{budget}"
                f.write(json.dumps({"key": f"{task}/2048/42/{i}|{label}", "sample": f"{task}/2048/42/{i}",
                                    "task": task, "length": 2048,
                                    "method": method, "budget": budget, "score": s, "seconds": 1.0,
                                    "env": {"peer": {"kvpress": "0.5.5"}} if ":" in method else {"device": "cpu"}})
                        + "\n")


def test_report_from_a_fixture(tmp_path):
    src = tmp_path / "answers.jsonl"
    write_answers(src, FIXTURE)
    out = tmp_path / "results"
    (out).mkdir()
    prose = f"# Accuracy\n\nProse before.\n\n{START}\nold\n{END}\nProse after.\n"
    (out / "accuracy.md").write_text(prose)
    report.write([src], out, command="draftapprox eval --samples 2")
    with open(out / "accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    avg = {(r["method"], r["budget"]): float(r["score"]) for r in rows if r["task"] == "average"}
    assert avg[("speckv", "64")] == 90 and avg[("snapkv", "64")] == 25 and avg[("fullkv", "")] == 95
    nvt = next(r for r in rows if r["method"] == "specpc" and r["task"] == "vt")
    assert nvt["n"] == "2" and nvt["score"] == "60.0" and nvt["ci_low"] == nvt["ci_high"] == "60.0"
    md = (out / "accuracy.md").read_text()
    assert md.startswith("# Accuracy\n\nProse before.") and md.rstrip().endswith("Prose after.") and "\nold\n" not in md
    peers, ours = (sum(len(scores) for method, *_, scores in FIXTURE if (":" in method) == peer) for peer in (1, 0))
    assert f"- {ours}: device cpu\n- {peers}: peer (kvpress 0.5.5)\n" in md  # each environment, with its answers
    assert "draftapprox eval --samples 2" in md and "| speckv | 100.0 | 80.0 | **90.0**" in md
    assert "### Peers at 2048 tokens, KV budget (pairs per head) 64" in md
    assert "| kvpress:snapkv | 50.0 | - | (incomplete) | **50.0** [0.0, 100.0] | 2 |" in md  # common: niah_single_1
    assert "## 2048 tokens, prompt keep ratio 0.25" in md
    assert "| streamingllm | 0.0 | 100.0 | **50.0** [n=1: no interval] |" in md  # a point is not an interval
    single = next(r for r in rows if r["method"] == "streamingllm" and r["task"] == "average")
    assert single["ci_low"] == single["ci_high"] == "" and single["score"] == "50.0"
    assert (out / "accuracy-2048.png").stat().st_size > 10_000
    # split by the draft's own answer: right on niah_single_1/1 only, wrong on the other three prompts
    assert "| 2048 | speckv | 64 | **100.0** [n=1: no interval] (1) | **86.7** [" in md
    assert "| 2048 | draft |" not in md and "| 2048 | kvpress:snapkv |" not in md
    # paired differences: speckv - snapkv is 100 on both niah prompts and 60, 0 on vt's: (100 + 30) / 2
    paired = md[md.index("## Paired differences"):]
    assert "| snapkv | **+65.0 [+50.0, +80.0]** (4) |" in paired
    assert "| kvpress:snapkv | +50.0 [+0.0, +100.0] (2) |" in paired  # the two prompts both answered
    assert "| fullkv | -5.0 [-10.0, +0.0] (4) |" in paired  # not bold: the interval reaches zero
    assert "| speckv | - |" in paired and "| specpc minus row |" in paired


def test_a_compressors_answers_are_split_by_whether_the_needle_survived():
    """Rows that carry their compressed prompt: an answer cut anywhere (one of several missing, or a digit dropped)
    counts as cut; rows without a compressed prompt get no line."""
    def row(compressed, expected, score):
        return {"length": 2048, "method": "llmlingua:longllmlingua", "budget": 0.25, "expected": expected,
                "compressed": compressed, "score": score}

    rows = [row("the number is 7854524.", ["7854524"], 100), row("the number is 785452.", ["7854524"], 0),
            row("values 12 and 34", ["12", "34"], 100), row("values 12 and 3", ["12", "34"], 50),
            {"length": 2048, "method": "specpc", "budget": 0.25, "expected": ["1"], "score": 100}]
    text = "\n".join(report._by_survival(rows))
    assert "| 2048 | llmlingua:longllmlingua | 0.25 | **100.0** [100.0, 100.0] (2) | **25.0** [0.0, 50.0] (2) |" in text
    assert "| specpc |" not in text and report._by_survival(rows[-1:]) == []


def test_a_partly_run_peer_neither_shrinks_the_plotted_tasks_nor_gets_a_point():
    cells_ = {(2048, "snapkv", 64): {"vt": [40], "qa_1": [60]},
              (2048, "kvpress:snapkv", 64): {"vt": [100]}, (2048, "kvpress:snapkv", 128): {"vt": [0], "qa_1": [20]}}
    common, series = report._series(cells_, {"fullkv": {"vt": [100], "qa_1": [100]}})
    # one answer a task: a point without an interval, never a zero-width one
    assert common == {"vt", "qa_1"} and series == {"snapkv": [(64.0, 50.0, None, None)],
                                                   "kvpress:snapkv": [(128.0, 10.0, None, None)]}
    _, series = report._series({(2048, "snapkv", 64): {"vt": [0, 100], "qa_1": [50, 50]}}, {})
    (budget, point, lo, hi), = series["snapkv"]
    assert (budget, point) == (64.0, 50.0) and lo < point < hi  # two answers a task: an interval to draw


@pytest.mark.filterwarnings("error")  # matplotlib warns of a legend with nothing in it
def test_a_grid_of_one_kind_gets_one_panel_and_a_grid_with_no_common_task_says_so(tmp_path):
    kv_only = [row for row in FIXTURE if not isinstance(row[1], float) and ":" not in row[0]]
    write_answers(tmp_path / "kv.jsonl", kv_only)
    report.write([tmp_path / "kv.jsonl"], tmp_path / "kv")
    assert (tmp_path / "kv" / "accuracy-2048.png").stat().st_size > 10_000
    apart = [("speckv", 64, "vt", [100]), ("speckv(window=8)", 64, "qa_1", [0])]  # variants on other tasks
    write_answers(tmp_path / "apart.jsonl", apart)
    report.write([tmp_path / "apart.jsonl"], tmp_path / "apart")


def test_the_plots_mark_the_budgets_measured_as_written(tmp_path, monkeypatch):
    """A log-2 axis would label 64 and 128 as 2^6 and 2^7, and a lone keep ratio would get ticks nobody ran; a
    partly-run peer's budget (kvpress:snapkv@32, one task of two) gets no point, so no tick."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    more = [("snapkv", 128, "niah_single_1", [0]), ("snapkv", 128, "vt", [100]), ("kvpress:snapkv", 32, "vt", [0])]
    write_answers(tmp_path / "answers.jsonl", [*FIXTURE, *more])
    report.write([tmp_path / "answers.jsonl"], tmp_path / "out")
    kv, prompt = (ax for ax in figures[0].axes if ax.get_xlabel())
    assert [label.get_text() for label in kv.get_xticklabels()] == ["64", "128"]
    assert [label.get_text() for label in prompt.get_xticklabels()] == ["0.25"]


def test_report_refuses_files_that_are_not_answers(tmp_path):
    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("")
    bad.write_text('{"not": "an answer"}\n')
    with pytest.raises(InputError, match="no answers"):
        report.write([empty], tmp_path / "out")
    with pytest.raises(InputError, match=r"bad\.jsonl:1"):
        report.write([bad], tmp_path / "out")


def test_report_reads_a_file_being_written(tmp_path):
    """The grid appends while a report is made: an unfinished last line is a write in flight, left out."""
    src = tmp_path / "answers.jsonl"
    row = {"key": "vt/2048/42/0|fullkv", "sample": "vt/2048/42/0", "task": "vt", "length": 2048,
           "method": "fullkv", "budget": None, "score": 100.0}
    src.write_text(json.dumps(row) + "\n" + '{"key": "vt/2048/42/1|ful')
    assert report.load([src]) == [row]
    src.write_text('{"key": "vt/2048/4\n' + json.dumps(row) + "\n")  # a torn line inside is an error
    with pytest.raises(InputError, match=r"answers\.jsonl:1"):
        report.load([src])


def test_diff_lists_the_prompts_scored_differently_losses_first(tmp_path):
    src = tmp_path / "answers.jsonl"
    write_answers(src, FIXTURE)
    rows = report.load([src])
    lines = report.diff(rows, "speckv@64", "snapkv@64")
    assert lines[0].startswith("`speckv@64` against `snapkv@64` on the 4 prompts both answered: below on 0, above "
                               "on 3, level on 1.")
    table = [line for line in lines if line.startswith("| niah") or line.startswith("| vt")]
    assert [line.split(" | ")[:2] for line in table] == [
        ["| niah_single_1/2048/42/0", "+100"], ["| niah_single_1/2048/42/1", "+100"], ["| vt/2048/42/0", "+60"]]
    mixed = [line.split(" | ")[:2] for line in report.diff(rows, "draft", "snapkv@64")[4:-1]]
    assert mixed == [["| vt/2048/42/1", "-40"], ["| vt/2048/42/0", "-20"], ["| niah_single_1/2048/42/1", "+100"]]
    assert lines[2].endswith("| draft alone (score) |") and table[0].endswith(" (0) |")  # the draft's answer scored 0
    assert "below on 1, above on 0, level on 3" in report.diff(rows, "speckv@64", "fullkv")[0]
    assert "draft alone" not in "".join(report.diff(rows, "draft", "fullkv"))
    with pytest.raises(InputError, match=r"no answers labelled 'speckv@128'; the files hold: draft, fullkv, "):
        report.diff(rows, "speckv@128", "fullkv")
