"""`bench kvpress`'s driver without kvpress's environment: a stand-in worker (this interpreter) answers the requests,
and the driver must measure our side, pair the two, resume, and write the table. kvpress itself is timed for real
in tests/eval/test_peers_real.py."""

from __future__ import annotations

from draftapprox.bench import kvpress
from draftapprox.eval.answer_log import read
from draftapprox.models.loading import pair_from_models

from ..conftest import stand_in_peer, tiny_model, tiny_tokenizer

TIMING = """
assert r["mode"] == "time" and r["press"] == "snapkv"
row = {"seconds": [0.2] * r["repeats"], "kept": round(len(r["input_ids"]) * (1 - r["ratio"])),
       "versions": {"kvpress": "0.5.5"}}
"""


def test_ours_and_kvpress_are_timed_on_the_same_input(tmp_path, monkeypatch):
    stand_in_peer(tmp_path, monkeypatch, "kvpress", TIMING)
    target = tiny_model("qwen2", layers=2, heads=4, kv_heads=2, seed=3)
    pair = pair_from_models(target, tiny_tokenizer())
    out = tmp_path / "timing.jsonl"
    args = (pair, tmp_path, [512, 1024], 64, 2, out)
    assert kvpress.measure(*args, dtype="float32", log=lambda *_: None) == 2
    rows = {r["length"]: r for r in read(out)}
    assert rows[1024]["kvpress_kept"] == 64 and rows[1024]["knobs"] == {"window_size": 32, "kernel_size": 7}
    assert all(len(r["ours_seconds"]) == 2 and all(s > 0 for s in r["ours_seconds"]) for r in rows.values())
    assert kvpress.measure(*args, dtype="float32", log=lambda *_: None) == 0  # a rerun resumes: nothing left
    text = kvpress.write(read(out), tmp_path / "kvpress.md", "draftapprox bench kvpress").read_text()
    assert "| 512 | 64 |" in text and "| 1024 | 64 |" in text and "kvpress 0.5.5" in text
    assert "`draftapprox bench kvpress`" in text  # the real kvpress side: tests/eval/test_peers_real.py
