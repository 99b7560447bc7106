"""The peer driver without the peers' environments: a stand-in worker (this interpreter) answers the requests,
and the driver must score them into rows, resume, and refuse what it cannot run."""

import json
from pathlib import Path

import pytest
import torch

from draftapprox.errors import ConfigError, InputError
from draftapprox.eval import peers
from draftapprox.models.loading import pair_from_models

from ..conftest import stand_in_peer, tiny_model, tiny_tokenizer

KVPRESS = """
# answers the planted value when "compression" keeps most of the context, nothing otherwise
value = r["context"].split("is: ")[1].split(".")[0] if r["ratio"] < 0.5 else "none"
row = {"answer": " " + value, "seconds": 0.1, "versions": {}}
"""


@pytest.fixture
def tokenizer():
    return tiny_tokenizer(chat=True)


@pytest.fixture
def fake_kvpress(tmp_path, monkeypatch):
    return stand_in_peer(tmp_path, monkeypatch, "kvpress", KVPRESS)


def test_kvpress_answers_become_scored_rows_and_a_rerun_adds_none(tokenizer, fake_kvpress, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = (tokenizer, tmp_path, ["snapkv", "streamingllm"], [128, 800], ["agnostic", "aware"], ["niah_single_1"],
            [1024], 1, out)
    assert peers.run_kvpress(*args, log=lambda *_: None) == 8
    rows = {r["key"]: r for r in map(json.loads, out.read_text().splitlines())}
    low = rows["niah_single_1/1024/42/0|kvpress-qa:snapkv@800"]
    assert low["score"] == 100 and low["method"] == "kvpress-qa:snapkv" and low["budget"] == 800
    assert "query-aware" in low["config"] and low["compressed_tokens"] > 900  # the question is compressed too
    high = rows["niah_single_1/1024/42/0|kvpress:streamingllm@128"]
    assert high["score"] == 0 and "compression_ratio=0.8" in high["config"]  # 1 - 128 / ~1000
    assert peers.run_kvpress(*args, log=lambda *_: None) == 0


def test_a_failing_worker_keeps_its_answers_and_its_error_is_quoted(tokenizer, tmp_path, monkeypatch):
    """The worker's output goes to its log, not the terminal; when it dies, the error quotes the log's end and the
    answers it wrote before are kept, so a rerun asks only for the rest."""
    stand_in_peer(tmp_path, monkeypatch, "kvpress", KVPRESS + """
if r["ratio"] < 0.5:
    raise RuntimeError("press exploded on " + r["key"])
""")
    out = tmp_path / "answers.jsonl"
    args = (tokenizer, tmp_path, ["snapkv"], [128, 800], ["aware"], ["niah_single_1"], [1024], 1, out)
    with pytest.raises(InputError, match=r"(?s)worker failed \(exit 1\).*RuntimeError: press exploded on "):
        peers.run_kvpress(*args, log=lambda *_: None)
    assert len(out.read_text().splitlines()) == 1
    assert "Traceback" in (tmp_path / ".peer-work" / "answers.kvpress-worker.log").read_text()
    with pytest.raises(InputError, match="worker failed"):
        peers.run_kvpress(*args, log=lambda *_: None)
    assert len(out.read_text().splitlines()) == 1  # the answer already there is not asked for again


def test_compression_ratio_keeps_exactly_the_budget():
    """kvpress keeps int(m * (1 - ratio)) pairs; 1 - C / m alone keeps C - 1 for many m (m = 131 at C = 64)."""
    assert int(131 * (1 - (1 - 64 / 131))) == 63
    for budget in (64, 128, 256, 1000):
        for tokens in range(budget + 1, 4200, 7):
            assert int(tokens * (1 - peers.compression_ratio(budget, tokens))) == budget
    assert peers.compression_ratio(128, 100) == 0.0


def test_peer_requests_are_checked_before_anything_runs(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="unknown kvpress press"):
        peers.run_kvpress(tokenizer, tmp_path, ["magic"], [128], ["aware"], ["vt"], [1024], 1, tmp_path / "a")
    with pytest.raises(ConfigError, match="mode"):
        peers.run_kvpress(tokenizer, tmp_path, ["snapkv"], [128], ["sideways"], ["vt"], [1024], 1, tmp_path / "a")
    with pytest.raises(InputError, match="setup-peer kvpress"):
        peers.run_kvpress(tokenizer, tmp_path, ["snapkv"], [128], ["aware"], ["vt"], [1024], 1, tmp_path / "a",
                          cache=tmp_path / "empty")
    with pytest.raises(ConfigError, match="unknown peer"):
        peers.setup("nonesuch", tmp_path)


def test_llmlingua_compressed_prompts_are_answered_by_our_target(tokenizer, tmp_path, monkeypatch):
    stand_in_peer(tmp_path, monkeypatch, "llmlingua", """
        words = r["context"].split()
        kept = " ".join(words[-int(len(words) * r["rate"]):]) + "\\n" + r["question"]
        row = {"compressed": kept, "origin_tokens": len(words), "compressed_tokens": len(kept.split()), "seconds": 0.2}
    """)
    pair = pair_from_models(tiny_model("llama", layers=2, seed=0), tokenizer)
    out = tmp_path / "answers.jsonl"
    assert peers.run_llmlingua(pair, tmp_path, [0.25], ["vt"], [1024], 1, out, log=lambda *_: None) == 1
    row = json.loads(out.read_text())
    assert row["method"] == "llmlingua:longllmlingua" and row["budget"] == 0.25
    assert 200 < row["kept_tokens"] < 400 and row["timings"]["compression"] == 0.2
    worker = json.loads((tmp_path / ".peer-work" / "answers.llmlingua-answers.jsonl").read_text())
    assert row["compressed"] == worker["compressed"]  # the prompt the target answered is kept with its answer


def test_press_settings_are_passed_on_and_named_in_the_method(tokenizer, fake_kvpress, tmp_path):
    out = tmp_path / "answers.jsonl"
    peers.run_kvpress(tokenizer, tmp_path, ["snapkv"], [800], ["aware"], ["niah_single_1"], [1024], 1, out,
                      knobs={"window_size": "32", "kernel_size": "7"}, log=lambda *_: None)
    row = json.loads(out.read_text())
    assert row["method"] == "kvpress-qa:snapkv(kernel_size=7,window_size=32)"
    requests = (tmp_path / ".peer-work" / "answers.kvpress-requests.jsonl").read_text()
    assert json.loads(requests)["knobs"] == {"kernel_size": 7, "window_size": 32}


REFERENCE = """
import sys, torch
sys.path.insert(0, ROOT)
from tests.conftest import tiny_model
from tests.reference import specpc_positions, speckv_keep
ids = torch.tensor([r["input_ids"]])
n = ids.shape[1]
if r["method"] == "specpc":  # the specification's SpecPC on the test's draft, not our selection
    draft = tiny_model("qwen2", layers=3, heads=4, kv_heads=4, seed=1, attn="eager")
    kept = specpc_positions(draft, ids, r["budget"], r["window"], r["kernel"], r["kernel"], r["start_layer"])
    if r["ratio"] >= 0.5:  # the reporting of a difference: one position swapped
        kept = kept[1:] + [min(set(range(n)) - set(kept))]
    row = {"kept": kept, "lookahead_ids": None}
else:  # the specification's SpecKV on the test's models, with the draft's greedy answer from transformers
    draft = tiny_model("qwen2", layers=2, heads=4, kv_heads=2, seed=1, attn="eager")
    target = tiny_model("qwen2", layers=3, heads=4, kv_heads=2, seed=2, attn="eager")
    length = len(r["lookahead_ids"])
    tokens = draft.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=length, do_sample=False,
                            min_new_tokens=length)[:, n:]
    w = r["window"]
    keep = speckv_keep(target, ids, tokens, r["budget"], w, r["kernel"], r["pool"], r["reduction"])
    kept = [[sorted(p for p in head if p < n - w - 1) for head in layer] for layer in keep]  # its top-k alone
    if r["budget"] > 64:  # the reporting of a difference: one position of one head swapped
        kept[0][0] = kept[0][0][1:] + [min(set(range(n - w - 1)) - set(kept[0][0]))]
    reported = tokens[0].tolist() if r["budget"] > 64 else tokens[0].tolist()[:-1] + [0]
    row = {"kept": kept, "lookahead_ids": reported}
row.update(seconds=0.5, versions={"transformers": "4.51.3"})
""".replace("ROOT", repr(str(Path(__file__).resolve().parents[2])))


@pytest.fixture
def fake_reference(tmp_path, monkeypatch):
    from draftapprox.eval.peers import reference

    stand_in_peer(tmp_path, monkeypatch, "reference", REFERENCE, reference)
    for module in (peers, reference):
        monkeypatch.setattr(module, "venv", lambda name, cache=None: tmp_path / "venv")
    (tmp_path / "venv" / "src").mkdir(parents=True)
    return reference


def test_reference_specpc_selections_are_compared_with_ours(tokenizer, tmp_path, fake_reference):
    from draftapprox.eval.answer_log import read

    draft = tiny_model("qwen2", layers=3, heads=4, kv_heads=4, seed=1)
    pair = pair_from_models(draft, tokenizer, draft)
    out = tmp_path / "reference.jsonl"
    args = (pair, tmp_path, [0.25, 0.5], ["niah_single_1"], [1024], 1, out)
    small = {"start_layer": 1, "window": 16, "kernel": 9}
    assert fake_reference.run_specpc(*args, log=lambda *_: None, knobs=small) == 2
    rows = {r["ratio"]: r for r in read(out)}
    assert rows[0.25]["identical"] and rows[0.25]["overlap"] == 1 and rows[0.25]["ours_seconds"] > 0
    assert not rows[0.5]["identical"] and len(rows[0.5]["only_ours"]) <= 1 and rows[0.5]["overlap"] > 0.99
    assert fake_reference.run_specpc(*args, log=lambda *_: None, knobs=small) == 0
    text = fake_reference.report(read(out), tmp_path / "reference.md", "draftapprox eval reference").read_text()
    assert "| 0.25 | 1 | 1 | 100.00% |" in text and "Prompts whose SpecPC selections differ" in text


def test_reference_speckv_selections_are_compared_per_layer_and_head(tokenizer, tmp_path, fake_reference):
    from draftapprox.eval.answer_log import read

    draft = tiny_model("qwen2", layers=2, heads=4, kv_heads=2, seed=1)
    target = tiny_model("qwen2", layers=3, heads=4, kv_heads=2, seed=2)
    pair = pair_from_models(target, tokenizer, draft)
    out = tmp_path / "reference.jsonl"
    args = (pair, tmp_path, tmp_path, [64, 128], ["niah_single_1"], [1024], 1, out)
    small = {"window": 16, "lookahead": 4}
    assert fake_reference.run_speckv(*args, log=lambda *_: None, knobs=small) == 2
    rows = {r["budget"]: r for r in read(out)}
    assert rows[64]["identical"] and rows[64]["overlap"] == 1 and not rows[64]["lookahead_identical"]
    assert rows[128]["lookahead_identical"] and not rows[128]["identical"]
    assert rows[128]["heads"] == 6 and rows[128]["heads_identical"] == 5 and rows[128]["min_overlap"] == 127 / 128
    assert rows[128]["differing_ties"] + rows[128]["differing_other"] == 2  # one position swapped for another
    assert rows[64]["differing_ties"] == rows[64]["differing_other"] == 0
    assert fake_reference.run_speckv(*args, log=lambda *_: None, knobs=small) == 0
    text = fake_reference.report(read(out), tmp_path / "reference.md").read_text()
    assert "| 64 | 1 | 0 | 1 | 6 / 6 | 100.00% | 100.0% | 0 / 0 |" in text and "| 128 | 1 | 1 | 0 | 5 / 6 |" in text
    with pytest.raises(InputError, match="CUDA"):
        narrow = {**small, "prefill_window": 512, "prefill_vertical": 256}  # dense below 768 tokens only
        fake_reference.run_speckv(pair, tmp_path, tmp_path, [32], ["niah_single_1"], [1024], 1, out, knobs=narrow,
                                  log=lambda *_: None)


def test_configs_written_by_transformers_5_keep_their_rope_base_on_4x(monkeypatch):
    """transformers 4.x ignores `rope_parameters` and would run Qwen2.5 at rope_theta=10000; a stand-in for its
    AutoConfig shows the patch puts the real base back (plain and `return_unused_kwargs` forms)."""
    import types

    import transformers

    from draftapprox.eval.peers import common

    def old_loader(path, return_unused_kwargs=False):
        config = types.SimpleNamespace(rope_theta=10000.0, rope_parameters={"rope_theta": 1e6})
        return (config, {}) if return_unused_kwargs else config

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", old_loader)
    common.patch()
    assert transformers.AutoConfig.from_pretrained("x").rope_theta == 1e6
    assert transformers.AutoConfig.from_pretrained("x", return_unused_kwargs=True)[0].rope_theta == 1e6


SELECTION = """
kept = r["ours"]
if r["case"] == "adakv":  # one head keeps the position after its first instead of its first
    head = kept[0][0]
    kept[0][0] = sorted(head[1:] + [min(set(range(len(r["input_ids"]))) - set(head))])
row = {"kept": kept, "seconds": 0.5, "versions": {"kvpress": "0.5.5"}}
"""


def test_kvpress_selections_are_compared_with_ours_pair_by_pair(tokenizer, tmp_path, monkeypatch):
    from draftapprox.eval.answer_log import read
    from draftapprox.eval.peers import kvpress_selection

    stand_in_peer(tmp_path, monkeypatch, "kvpress", SELECTION, kvpress_selection)
    pair = pair_from_models(tiny_model("qwen2", layers=2, heads=4, kv_heads=2, seed=3), tokenizer)
    out = tmp_path / "selection.jsonl"
    args = (pair, tmp_path, ["snapkv", "adakv", "snapkv-input"], [128], ["niah_single_1"], [1024], 1, out)
    assert kvpress_selection.run(*args, log=lambda *_: None) == 3
    rows = {r["case"]: r for r in read(out)}
    assert rows["snapkv"]["overlap"] == 1 and rows["snapkv"]["heads_identical"] == rows["snapkv"]["heads"] == 4
    assert rows["adakv"]["heads_identical"] == 3 and rows["adakv"]["differing"] == 2
    assert rows["snapkv"]["kept_ours"] == [256, 256] and rows["snapkv"]["prompt_tokens"] > 1000
    assert rows["snapkv-input"]["kvpress_tokens"] < rows["snapkv-input"]["prompt_tokens"]  # up to the question
    assert kvpress_selection.run(*args, log=lambda *_: None) == 0
    text = kvpress_selection.report(read(out), tmp_path / "selection.md", "draftapprox eval kvpress-selection")
    assert "| snapkv | 128 | 1 | 100.00% | 4 / 4 | 0 / 0 | 128 / 128 | 128 / 128 |" in text.read_text()
    with pytest.raises(ConfigError, match="unknown case"):
        kvpress_selection.run(pair, tmp_path, ["h2o"], [128], ["niah_single_1"], [1024], 1, out)


def test_selection_agreement_tells_ties_at_the_cut_from_other_differences():
    from draftapprox.eval.peers.kvpress_selection import agreement

    scores = [torch.tensor([[3.0, 2.0, 2.0, 1.0]])]  # one layer, one KV head, candidates 0..3; 4 is the window
    ours = [[[0, 1, 4]]]
    tie = agreement(ours, [[[0, 2, 4]]], scores)
    assert tie["overlap"] == 2 / 3 and tie["differing"] == 2 and tie["differing_tied"] == 2
    other = agreement(ours, [[[0, 3, 4]]], scores)
    assert other["differing"] == 2 and other["differing_tied"] == 1  # 1 sits at the cut, 3 is below it
    assert agreement(ours, [[[0, 4]]], scores)["differing_tied"] == 0  # budgets differ: no cut to compare


def test_kvpress_worker_reads_kept_positions_back_from_the_gathered_keys(monkeypatch):
    """The worker learns what a press kept from the keys it returned: each kept row is a prompt row."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(peers.__file__).parent))
    worker = importlib.import_module("kvpress_worker")
    keys = torch.randn(10, 4)
    assert worker._rows(keys, keys[[7, 2, 5]]) == [2, 5, 7]
    with pytest.raises(RuntimeError, match="matches no prompt key"):
        worker._rows(keys, keys[[1]] + 1)
