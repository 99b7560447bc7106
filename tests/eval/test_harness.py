"""The resumable grid on tiny random models: shared work, resume, kill safety, and the report."""

import csv
import json

import pytest

from draftapprox.errors import ConfigError
from draftapprox.eval import harness, report
from draftapprox.markdown import END, START
from draftapprox.models.loading import pair_from_models

from ..conftest import tiny_model, tiny_tokenizer

TASKS = ["niah_single_1", "vt"]
KNOBS = {"specpc": {"start_layer": "1", "window": "16", "kernel": "9"}}


@pytest.fixture(scope="module")
def pair():
    tok = tiny_tokenizer(chat=True)
    return pair_from_models(tiny_model("qwen2", layers=4, seed=0), tok,
                            tiny_model("qwen2", layers=3, heads=4, kv_heads=4, seed=1))


def jobs():
    return harness.plan(["fullkv", "draft", "snapkv", "speckv", "specpc"], ["64", "0.25"], KNOBS)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_plan_gives_each_kind_its_budgets_and_runs_kv_methods_first():
    labels = [j.label for j in jobs()]
    assert labels == ["fullkv", "snapkv@64", "speckv@64", "specpc@0.25", "draft"]
    with pytest.raises(ConfigError, match="ratios"):
        harness.plan(["specpc"], ["128"])
    with pytest.raises(ConfigError, match="unknown method"):
        harness.plan(["magic"], ["128"])
    with pytest.raises(ConfigError, match="unknown knob"):
        harness.plan(["snapkv"], ["128"], {"snapkv": {"colour": "red"}})


def test_grid_writes_every_answer_once_and_a_rerun_skips_them(pair, tmp_path, monkeypatch):
    out = tmp_path / "answers.jsonl"
    assert harness.run(pair, jobs(), TASKS, [1024], 2, out, progress=False, max_new_tokens=6) == 2 * 2 * 5
    rows = lines(out)
    assert len({r["key"] for r in rows}) == 20
    assert all(0 <= r["score"] <= 100 and r["prompt_tokens"] <= 1024 for r in rows)
    firsts = [r for r in rows if r["method"] == "fullkv"]
    assert all(r["shared_timings"].get("target_prefill", 0) > 0 for r in firsts)  # one shared prefill per sample
    assert all(not r["shared_timings"] for r in rows if r["method"] == "snapkv")

    calls = []
    monkeypatch.setattr(harness, "generate", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(harness.ruler, "generate_sample", lambda *a, **k: calls.append(a))
    assert harness.run(pair, jobs(), TASKS, [1024], 2, out, progress=False, max_new_tokens=6) == 0 and not calls
    assert len(lines(out)) == 20


def test_shards_split_the_grid_by_sample_index(pair, tmp_path):
    outs = [tmp_path / f"shard{i}.jsonl" for i in range(2)]
    for i, out in enumerate(outs):
        harness.run(pair, jobs()[:2], TASKS, [1024], 3, out, progress=False, max_new_tokens=2, shard=(i, 2))
    indices = [{r["index"] for r in lines(out)} for out in outs]
    assert indices == [{0, 2}, {1}]
    assert sum(len(lines(out)) for out in outs) == 3 * len(TASKS) * 2  # every answer of the grid, once
    with pytest.raises(ConfigError, match="shard"):
        harness.run(pair, jobs(), TASKS, [1024], 1, outs[0], progress=False, shard=(2, 2))


def test_batched_decoding_writes_the_same_answers_once(pair, tmp_path):
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    harness.run(pair, jobs(), TASKS, [1024], 1, one, progress=False, max_new_tokens=6)
    assert harness.run(pair, jobs(), TASKS, [1024], 1, many, progress=False, max_new_tokens=6, decode_batch=4) == 10
    alone, together = ({r["key"]: r for r in lines(f)} for f in (one, many))
    assert alone.keys() == together.keys()
    assert max(r["decode_batch"] for r in together.values()) > 1 and all(r["seconds"] > 0 for r in together.values())
    same = sum(alone[k]["prediction"] == together[k]["prediction"] for k in alone)
    assert same >= 8  # float32 rounding may flip a near-tie of the random tiny model, rarely
    assert harness.run(pair, jobs(), TASKS, [1024], 1, many, progress=False, decode_batch=4) == 0


def test_a_killed_run_loses_at_most_the_answer_in_flight(pair, tmp_path, monkeypatch):
    out = tmp_path / "answers.jsonl"
    real, count = harness.generate, []

    def dies_on_the_seventh(*args, **kwargs):
        count.append(1)
        if len(count) == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "generate", dies_on_the_seventh)
    with pytest.raises(KeyboardInterrupt):
        harness.run(pair, jobs(), TASKS, [1024], 1, out, progress=False, max_new_tokens=6)
    assert len(lines(out)) == 6
    with open(out, "a") as f:
        f.write('{"key": "torn')  # a kill in the middle of a write
    monkeypatch.setattr(harness, "generate", real)
    generated, make = [], harness.ruler.generate_sample
    monkeypatch.setattr(harness.ruler, "generate_sample", lambda tok, task, *a: generated.append(task) or
                        make(tok, task, *a))
    assert harness.run(pair, jobs(), TASKS, [1024], 1, out, progress=False, max_new_tokens=6) == 4
    assert generated == ["vt"]  # the finished sample's prompt is not generated again
    assert len({r["key"] for r in lines(out)}) == len(lines(out)) == 10


@pytest.mark.parametrize("legacy", [False, True])
def test_a_resumed_sample_must_have_the_prompt_its_answers_had(pair, tmp_path, legacy):
    out = tmp_path / "answers.jsonl"
    harness.run(pair, jobs(), TASKS[:1], [1024], 1, out, progress=False, max_new_tokens=6)
    rows = lines(out)[:-1]  # the last answer is still to do
    for row in rows:  # as if the generator had changed since: a fingerprint, or (older rows) a count, differs
        if legacy:
            del row["prompt_sha"]
            row["prompt_tokens"] -= 1
        else:
            row["prompt_sha"] = "0" * 16
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match="another prompt"):
        harness.run(pair, jobs(), TASKS[:1], [1024], 1, out, progress=False, max_new_tokens=6)
    assert len(lines(out)) == 4


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


def test_report_from_a_fixture(tmp_path):
    src = tmp_path / "answers.jsonl"
    with open(src, "w") as f:
        for method, budget, task, scores in FIXTURE:
            for i, s in enumerate(scores):
                label = method if budget is None else f"{method}@{budget}"
                f.write(json.dumps({"key": f"{task}/2048/42/{i}|{label}", "sample": f"{task}/2048/42/{i}",
                                    "task": task, "length": 2048,
                                    "method": method, "budget": budget, "score": s, "seconds": 1.0,
                                    "env": {"device": "cpu"}}) + "\n")
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
    assert md.startswith("# Accuracy\n\nProse before.") and md.rstrip().endswith("Prose after.") and "old" not in md
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


def test_a_partly_run_peer_neither_shrinks_the_plotted_tasks_nor_gets_a_point():
    cells_ = {(2048, "snapkv", 64): {"vt": [40], "qa_1": [60]},
              (2048, "kvpress:snapkv", 64): {"vt": [100]}, (2048, "kvpress:snapkv", 128): {"vt": [0], "qa_1": [20]}}
    common, series = report._series(cells_, {"fullkv": {"vt": [100], "qa_1": [100]}})
    assert common == {"vt", "qa_1"} and series == {"snapkv": [(64.0, 50.0)], "kvpress:snapkv": [(128.0, 10.0)]}


def test_report_refuses_files_that_are_not_answers(tmp_path):
    from draftapprox.errors import InputError

    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("")
    bad.write_text('{"not": "an answer"}\n')
    with pytest.raises(InputError, match="no answers"):
        report.write([empty], tmp_path / "out")
    with pytest.raises(InputError, match=r"bad\.jsonl:1"):
        report.write([bad], tmp_path / "out")
