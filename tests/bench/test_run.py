"""The benchmark on tiny random models saved to disk: one worker process per job, resumable rows, memory, report."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from draftapprox.bench import report, run
from draftapprox.bench.targets import load
from draftapprox.errors import DraftApproxError, InputError
from draftapprox.eval.answer_log import read

from ..conftest import save_tiny, tiny_model, tiny_tokenizer

KNOBS = {"specpc": {"start_layer": "1", "window": "16", "kernel": "9"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    target = save_tiny(root / "target", tiny_model("llama", layers=4, seed=0), tok)
    draft = save_tiny(root / "draft", tiny_model("llama", layers=3, heads=4, kv_heads=4, seed=1), tok)
    return draft, target


def settings(models, **kw) -> run.Settings:
    draft, target = models
    return run.Settings(**{"lengths": [600, 400], "repeats": 2, "new_tokens": 3, "task": "niah_single_1",
                           "draft": draft, "target": target, "dtype": "float32", **kw})


def test_plan_adds_the_floors_of_each_keep_ratio():
    labels = [j.label for j in run.plan(["fullkv", "speckv", "specpc"], ["64", "0.25", "0.5"])]
    assert labels == ["fullkv", "speckv@64", "specpc@0.25", "specpc@0.5", "draft-prefill", "target-prefill@0.25",
                      "target-prefill@0.5", "draft-limit", "target-limit"]
    assert "draft-prefill" not in [j.label for j in run.plan(["fullkv"], ["64"], floors=False)]


def test_an_int8_draft_has_no_gemm_bound_limit(models):
    jobs = run.plan(["specpc"], ["0.25"])
    assert "draft-limit" in [j.label for j in run.measurable(jobs, settings(models))]
    kept = [j.label for j in run.measurable(jobs, settings(models, draft_dtype="int8"))]
    assert "draft-limit" not in kept and {"draft-prefill", "target-limit", "specpc@0.25"} <= set(kept)


def test_bench_measures_every_job_and_length_once_and_reports(models, tmp_path):
    out = tmp_path / "bench.jsonl"
    jobs = run.plan(["fullkv", "specpc"], ["0.25"], KNOBS)
    assert run.run(jobs, settings(models), out, progress=False) == 6 * 2
    rows = {(r["key"]): r for r in read(out)}
    pc_label = "specpc@0.25 kernel=9 start_layer=1 window=16"  # knobs are part of a row's label
    assert set(rows) == {run.key(j, settings(models), n) for j in jobs for n in (400, 600)}
    assert {r["key"].split("|")[0] for r in rows.values()} == {"fullkv", pc_label, "draft-prefill",
                                                               "target-prefill@0.25", "draft-limit", "target-limit"}
    limit = rows["target-limit|600"]
    assert limit["env"]["rates"]["gemm_flops"] > 1e8 and limit["env"]["rates"]["gemv_bytes"] > 1e8
    assert 0 < limit["first_token"] < rows["fullkv|600"]["first_token"]  # nothing beats its own limit
    assert rows["target-limit|600"]["decode_per_token"] > rows["target-limit|400"]["decode_per_token"]  # KV grows
    for n in (400, 600):
        full, pc = rows[f"fullkv|{n}"], rows[f"{pc_label}|{n}"]
        assert full["kv_bytes"] == full["kv_bytes_full"] and pc["kv_bytes"] / full["kv_bytes"] == pytest.approx(
            0.25, abs=0.01)
        assert len(full["runs"]) == 2 and full["decode_per_token"] > 0 and full["first_token"] > 0
        assert set(pc["phases"]) >= {"draft", "scoring", "target_prefill"}
        assert full["peak_rss"] > 0 and full["env"]["loaded_rss"] > 0 and full["env"]["dtype"] == "float32"
        floor = rows[f"target-prefill@0.25|{n}"]
        assert floor["prompt_tokens"] == int(0.25 * full["prompt_tokens"]) and floor["decode_per_token"] is None
    assert run.run(jobs, settings(models), out, progress=False) == 0  # resumed: nothing left to measure

    goals = load(Path(__file__).parents[2] / "scripts" / "targets" / "performance.toml", report.TARGETS)
    written = report.write([out], tmp_path / "docs", command="draftapprox bench ...", goals=goals)
    text = written[0].read_text()
    assert "| fullkv | " in text and "(1.00x)" in text and "`draftapprox bench ...`" in text
    assert f"{pc_label} first token / (draft prefill + target prefill of kept)" in text
    assert "SpecPC draft pass / the draft's GEMM-bound prefill" in text and "Limits measured in this run" in text
    assert all(p.exists() and p.stat().st_size > 0 for p in written)


def test_a_failing_worker_is_reported(models, tmp_path):
    bad = settings(models, target=str(tmp_path / "missing"))
    with pytest.raises(DraftApproxError, match="worker for fullkv failed"):
        run.run(run.plan(["fullkv"], ["64"], floors=False), bad, tmp_path / "b.jsonl", progress=False)


def test_bad_settings_and_files_are_refused(models, tmp_path):
    with pytest.raises(DraftApproxError, match="new-tokens"):
        run.run(run.plan(["fullkv"], ["64"]), settings(models, new_tokens=1), tmp_path / "b.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:1"):
        report.write([bad], tmp_path)


@pytest.mark.parametrize("kernel_peak", [True, False])
def test_memory_sees_an_allocation_in_the_block(kernel_peak, monkeypatch):
    if kernel_peak and not run._reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    if not kernel_peak:  # where the reset is refused: the sampling thread
        monkeypatch.setattr(run, "_reset_peak_rss", lambda: False)
    with run.Memory(torch.device("cpu")) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        if not kernel_peak:
            time.sleep(0.05)  # the sampler's thread needs the GIL once while the block lives
        del block
    assert memory.result()["extra_rss"] >= 48 * 2**20
    assert memory._kernel_peak == kernel_peak
