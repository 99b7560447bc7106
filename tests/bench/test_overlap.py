"""`bench overlap`: the same prompts through SpecPC with the draft in two precisions."""

from __future__ import annotations

from draftapprox.bench import overlap
from draftapprox.eval import ruler
from draftapprox.methods import make
from draftapprox.models.loading import load_model

from ..conftest import save_tiny, tiny_model, tiny_tokenizer
from ..reference import specpc_positions

KNOBS = {"start_layer": "1", "window": "16", "kernel": "9"}


def test_overlap_of_cheaper_drafts(tmp_path):
    """Each row's overlap is the share of the float32 draft's kept tokens that the int8 draft keeps too, both
    selections recomputed here by the slow SpecPC reference on the same prompt and weights."""
    draft = save_tiny(tmp_path / "draft", tiny_model("llama", layers=3, heads=4, kv_heads=4, seed=1),
                      tiny_tokenizer())
    rows = overlap.measure(draft, ["int8"], "float32", ["niah_single_1", "vt"], 1024, 1, 0.25, progress=False,
                           knobs=KNOBS)
    assert [(r["dtype"], r["against"], r["task"]) for r in rows] == [("int8", "float32", "niah_single_1"),
                                                                     ("int8", "float32", "vt")]
    budget = make("specpc", 0.25, **KNOBS).tokens
    for row in rows:
        kept = {}
        for dtype in ("float32", "int8"):
            model, tokenizer = load_model(draft, dtype=dtype)
            sample = ruler.generate_sample(tokenizer, row["task"], 1024, 0)
            ids = ruler.encode(tokenizer, sample.context + sample.question, sample.answer_prefix)
            kept[dtype] = set(specpc_positions(model, ids, budget(ids.shape[1]), 16, 9, 9, 1))
        assert row["overlap"] == len(kept["int8"] & kept["float32"]) / len(kept["float32"])
        assert 0 < row["overlap"] <= 1 and row["seconds"] > 0 and row["reference_seconds"] > 0
    path = overlap.write(rows, tmp_path / "draft-precision.md", command="draftapprox bench overlap")
    text = path.read_text()
    assert "| int8 vs float32 | 2 |" in text and "`draftapprox bench overlap`" in text
