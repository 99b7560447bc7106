"""`bench overlap`: the same prompts through SpecPC with the draft in two precisions."""

from __future__ import annotations

from draftapprox.bench import overlap

from ..conftest import save_tiny, tiny_model, tiny_tokenizer


def test_overlap_of_cheaper_drafts(tmp_path):
    draft = save_tiny(tmp_path / "draft", tiny_model("llama", layers=3, heads=4, kv_heads=4, seed=1),
                      tiny_tokenizer())
    rows = overlap.measure(draft, ["float32", "int8"], "float32", ["niah_single_1", "vt"], 1024, 1, 0.25,
                           progress=False, knobs={"start_layer": "1", "window": "16", "kernel": "9"})
    assert [(r["dtype"], r["task"]) for r in rows] == [("float32", "niah_single_1"), ("int8", "niah_single_1"),
                                                       ("float32", "vt"), ("int8", "vt")]
    assert all(r["overlap"] == 1.0 for r in rows if r["dtype"] == "float32")  # the reference against itself
    assert all(0 < r["overlap"] <= 1 and r["seconds"] > 0 for r in rows)
    path = overlap.write(rows, tmp_path / "draft-precision.md", command="draftapprox bench overlap")
    text = path.read_text()
    assert "| int8 vs float32 | 2 |" in text and "`draftapprox bench overlap`" in text
