"""The peers' real workers in their real environments (`draftapprox eval setup-peer NAME`), on tiny models and
short prompts: the code that wrote the committed peer answers, run for real. Each test skips, naming the command,
where its environment is not set up; CI sets up kvpress."""

from __future__ import annotations

import statistics

import pytest

from draftapprox.bench import kvpress as kvpress_bench
from draftapprox.eval import peers, ruler
from draftapprox.eval.answer_log import read
from draftapprox.eval.peers import kvpress_selection, reference
from draftapprox.generation import compress_prompt, new_state
from draftapprox.methods import SpecPC
from draftapprox.models.loading import load_model, pair_from_models

from ..conftest import save_tiny, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.peer


def ready(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not (peers.venv(name) / ".draftapprox-ready").exists(),
                              reason=f"{name}'s environment is not set up: run `draftapprox eval setup-peer {name}`")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A GQA target and a draft of one tokenizer with a chat template, saved as the peers load them."""
    root = tmp_path_factory.mktemp("tiny-peers")
    tokenizer = tiny_tokenizer(chat=True)
    target = save_tiny(root / "target", tiny_model("llama", layers=2, heads=4, kv_heads=2, seed=3), tokenizer)
    draft = save_tiny(root / "draft", tiny_model("llama", layers=2, heads=4, kv_heads=4, seed=4), tokenizer)
    for folder in (root / "target", root / "draft"):  # transformers 5's generic class, by the name 4.x knows too
        config = folder / "tokenizer_config.json"
        config.write_text(config.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
    return {"target": root / "target", "draft": root / "draft", "tokenizer": tokenizer, "target_path": target,
            "draft_path": draft}


@ready("kvpress")
def test_kvpress_presses_answer_both_ways_with_the_budget_kept(tiny, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = (tiny["tokenizer"], tiny["target"], ["snapkv", "streamingllm"], [64], ["agnostic", "aware"],
            ["niah_single_1"], [1024], 1, out)
    assert peers.run_kvpress(*args, dtype="float32", log=lambda *_: None) == 4
    rows = {r["key"]: r for r in read(out)}
    sample = ruler.generate_sample(tiny["tokenizer"], "niah_single_1", 1024, 0)
    for _key, row in rows.items():
        assert row["env"]["peer"]["kvpress"] == "0.5.5" and isinstance(row["prediction"], str)
        assert row["prompt_sha"] == sample.fingerprint and row["score"] in (0.0, 100.0)
        assert "compression_ratio=" in row["config"]
    aware = rows[f"{sample.id}|kvpress-qa:snapkv@64"]
    agnostic = rows[f"{sample.id}|kvpress:snapkv@64"]
    assert aware["compressed_tokens"] > agnostic["compressed_tokens"]  # the question is compressed too
    assert peers.run_kvpress(*args, dtype="float32", log=lambda *_: None) == 0  # resumes


@ready("kvpress")
def test_kvpress_snapkv_is_timed_and_keeps_the_budget(tiny, tmp_path):
    model, tokenizer = load_model(tiny["target_path"], dtype="float32")
    out = tmp_path / "timing.jsonl"
    written = kvpress_bench.measure(pair_from_models(model, tokenizer), tiny["target"], [1024], 64, 2, out,
                                    dtype="float32", log=lambda *_: None)
    assert written == 1
    row = read(out)[0]
    assert row["kvpress_kept"] == 64 and row["env"]["kvpress"]["kvpress"] == "0.5.5"
    assert len(row["kvpress_seconds"]) == 2 and all(s > 0 for s in row["kvpress_seconds"])
    assert statistics.median(row["kvpress_seconds"]) != statistics.median(row["ours_seconds"])


@ready("kvpress")
def test_kvpress_selection_is_compared_per_head(tiny, tmp_path):
    model, tokenizer = load_model(tiny["target_path"], dtype="float32")
    out = tmp_path / "selection.jsonl"
    written = kvpress_selection.run(pair_from_models(model, tokenizer), tiny["target"], ["snapkv", "streamingllm"],
                                    [64], ["niah_single_1"], [1024], 1, out, dtype="float32", log=lambda *_: None)
    assert written == 2
    rows = {r["case"]: r for r in read(out)}
    for row in rows.values():  # 2 layers x 2 KV heads, 64 pairs each on our side; kvpress's own counts beside
        assert row["heads"] == 4 and row["kept_ours"] == [128, 128] and len(row["kept_kvpress"]) == 2
        assert row["env"]["kvpress"]["kvpress"] == "0.5.5"
    assert rows["streamingllm"]["overlap"] > 0.95  # no scores: the same sinks and recent pairs, give or take one


@ready("llmlingua")
@pytest.mark.real
def test_llmlingua_compresses_with_our_draft_and_our_model_answers(tmp_path):
    """LongLLMLingua needs a tokenizer that decodes back to its text (a BPE one), so this runs on the real 0.5B draft,
    which also answers (the target's role does not matter here), on a short prompt."""
    from draftapprox.models import offline

    draft_dir = offline.fetch(offline.DRAFT.name)
    model, tokenizer = load_model(draft_dir)
    out = tmp_path / "answers.jsonl"
    written = peers.run_llmlingua(pair_from_models(model, tokenizer), draft_dir, [0.25], ["niah_single_2"], [512],
                                  1, out, log=lambda *_: None)
    assert written == 1
    row = read(out)[0]
    assert row["method"] == "llmlingua:longllmlingua" and row["env"]["peer"]["llmlingua"] == "0.2.2"
    assert 0 < row["kept_tokens"] < row["prompt_tokens"] and isinstance(row["prediction"], str)


@ready("reference")
def test_the_reference_specpc_selects_what_ours_does_and_names_its_commit(tiny, tmp_path):
    model, tokenizer = load_model(tiny["draft_path"], dtype="float32")
    pair = pair_from_models(model, tokenizer, model)
    out = tmp_path / "reference.jsonl"
    knobs = {"window": 16, "kernel": 9, "start_layer": 1}
    assert reference.run_specpc(pair, tiny["draft"], [0.25], ["niah_single_1"], [1024], 1, out, knobs=knobs,
                                log=lambda *_: None) == 1
    row = read(out)[0]
    assert row["env"]["reference"]["commit"] == peers.PEERS["reference"].commit
    sample = ruler.generate_sample(tokenizer, "niah_single_1", 1024, 0)
    ids = ruler.encode(tokenizer, sample.context + sample.question, sample.answer_prefix)
    ours = compress_prompt(new_state(pair, ids, 1), SpecPC(0.25, **knobs))[0].tolist()
    assert row["overlap"] > 0.9 and len(ours) == row["kept"]
