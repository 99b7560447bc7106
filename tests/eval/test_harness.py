"""The resumable grid on tiny random models: shared work, resume and kill safety."""

import json
import re

import pytest

from draftapprox.errors import ConfigError
from draftapprox.eval import harness
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
    assert labels == ["fullkv", "snapkv@64", "speckv@64", "specpc(kernel=9,start_layer=1,window=16)@0.25", "draft"]
    with pytest.raises(ConfigError, match="ratios"):
        harness.plan(["specpc"], ["128"])
    with pytest.raises(ConfigError, match="unknown method"):
        harness.plan(["magic"], ["128"])
    with pytest.raises(ConfigError, match="unknown knob"):
        harness.plan(["snapkv"], ["128"], {"snapkv": {"colour": "red"}})


def test_a_method_at_several_settings_is_one_job_each_named_by_its_knobs():
    names = harness.parse_list("fullkv,speckv, speckv(window=16, pool=avg),specpc", "methods")
    assert names == ["fullkv", "speckv", "speckv(window=16, pool=avg)", "specpc"]
    plan = harness.plan(names, ["64", "0.25"], {"speckv": {"window": "8", "kernel": "3"}})
    assert [j.label for j in plan] == ["fullkv", "speckv(kernel=3,window=8)@64",
                                       "speckv(kernel=3,pool=avg,window=16)@64", "specpc@0.25"]
    assert plan[2].build().window == 16 and plan[2].build().pool == "avg"  # inline knobs win over --set ones
    for bad, message in [("speckv(window)", "not KEY=VALUE"), ("speckv(colour=red)", "unknown knob"),
                         ("fullkv(window=8)", "no knobs"), ("speckv[window=8]", "cannot read method"),
                         ("speckv(window=8),speckv(window=8)", "given twice")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            harness.plan(harness.parse_list(bad, "methods"), ["64"])


def test_grid_writes_every_answer_once_and_a_rerun_skips_them(pair, tmp_path, monkeypatch):
    out = tmp_path / "answers.jsonl"
    assert harness.run(pair, jobs(), TASKS, [1024], 2, out, progress=False, max_new_tokens=6) == 2 * 2 * 5
    rows = lines(out)
    assert len({r["key"] for r in rows}) == 20
    assert all(0 <= r["score"] <= 100 and r["prompt_tokens"] <= 1024 for r in rows)
    firsts = [r for r in rows if r["method"] == "fullkv"]
    assert all(r["shared_timings"].get("target_prefill", 0) > 0 for r in firsts)  # one shared prefill per sample
    assert all(not r["shared_timings"] for r in rows if r["method"] == "snapkv")
    # a prompt method's row keeps the prompt it gave the target (the word-level tokenizer decodes a word a token)
    cut = [r for r in rows if r["budget"] == 0.25]
    assert cut and all(len(r["compressed"].split()) == r["kept_tokens"] < r["prompt_tokens"] for r in cut)
    assert not any("compressed" in r for r in rows if r["budget"] != 0.25)

    # the same method at another setting is new work, on the same prefill, in its own rows
    window = harness.plan(["snapkv(window=8)"], ["64"])
    assert harness.run(pair, window, TASKS, [1024], 2, out, progress=False, max_new_tokens=6) == 4
    assert {r["method"] for r in lines(out)[20:]} == {"snapkv(window=8)"}
    assert "window=8" in lines(out)[-1]["config"]

    calls = []
    monkeypatch.setattr(harness, "generate", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(harness.ruler, "generate_sample", lambda *a, **k: calls.append(a))
    assert harness.run(pair, jobs(), TASKS, [1024], 2, out, progress=False, max_new_tokens=6) == 0 and not calls
    assert len(lines(out)) == 24


def test_shards_split_the_grid_by_sample_index(pair, tmp_path):
    outs = [tmp_path / f"shard{i}.jsonl" for i in range(2)]
    for i, out in enumerate(outs):
        harness.run(pair, jobs()[:2], TASKS, [1024], 3, out, progress=False, max_new_tokens=2, shard=(i, 2))
    indices = [{r["index"] for r in lines(out)} for out in outs]
    assert indices == [{0, 2}, {1}]
    assert sum(len(lines(out)) for out in outs) == 3 * len(TASKS) * 2  # every answer of the grid, once
    with pytest.raises(ConfigError, match="shard"):
        harness.run(pair, jobs(), TASKS, [1024], 1, outs[0], progress=False, shard=(2, 2))


def test_a_split_answers_only_its_samples_and_every_row_records_its_split(pair, tmp_path):
    """The protocol's split: samples 0-4 develop, 5-9 test; a split run touches no other sample."""
    assert [i for i, _, _ in harness.coordinates(TASKS[:1], [1024], 10, split="test")] == [5, 6, 7, 8, 9]
    out = tmp_path / "test.jsonl"
    fullkv = harness.plan(["fullkv"], ["64"])
    harness.run(pair, fullkv, TASKS[:1], [1024], 7, out, progress=False, max_new_tokens=1, split="test")
    assert [(r["index"], r["split"]) for r in lines(out)] == [(5, "test"), (6, "test")]
    harness.run(pair, fullkv, TASKS[:1], [1024], 7, out, progress=False, max_new_tokens=1)  # all: 0-4 join
    assert sorted({r["split"] for r in lines(out) if r["index"] < 5}) == ["dev"]
    with pytest.raises(ConfigError, match="unknown split"):
        harness.run(pair, fullkv, TASKS[:1], [1024], 1, out, progress=False, split="train")


def test_batched_decoding_writes_the_same_answers_once(pair, tmp_path):
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    harness.run(pair, jobs(), TASKS, [1024], 1, one, progress=False, max_new_tokens=6)
    assert harness.run(pair, jobs(), TASKS, [1024], 1, many, progress=False, max_new_tokens=6, decode_batch=4) == 10
    alone, together = ({r["key"]: r for r in lines(f)} for f in (one, many))
    assert alone.keys() == together.keys()
    assert max(r["decode_batch"] for r in together.values()) > 1 and all(r["seconds"] > 0 for r in together.values())
    differ = [k for k in alone if alone[k]["prediction"] != together[k]["prediction"]]
    assert not differ, differ  # the server's batches are held to the same: one answer, decoded alone or together
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


def test_a_resumed_grid_says_when_it_adds_answers_made_with_other_versions(pair, tmp_path):
    out, notes = tmp_path / "answers.jsonl", []
    harness.run(pair, jobs(), TASKS[:1], [1024], 1, out, progress=False, max_new_tokens=6, log=notes.append)
    rows = lines(out)
    assert notes == []  # a new file
    rows[0]["env"]["transformers"] = "5.0.0"  # as if the first answer had come from another release
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    harness.run(pair, jobs(), TASKS[:1], [1024], 1, out, progress=False, max_new_tokens=6, log=notes.append)
    assert len(notes) == 1 and "transformers 5.0.0" in notes[0] and f"transformers {rows[1]['env']['transformers']}" \
        in notes[0] and len(lines(out)) == len(rows)
    harness.run(pair, jobs(), TASKS[:1], [1024], 1, out, progress=False, max_new_tokens=6, log=notes.append)
    assert len(notes) == 2  # said on every resume, even with nothing left to do
