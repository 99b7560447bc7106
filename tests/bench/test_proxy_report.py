"""proxy.md from rows written the way `bench proxy` writes them: the first-token split, the targets' verdicts, the
warm-cache table and the accuracy comparison with the grid's in-process answers."""

from __future__ import annotations

import json
from pathlib import Path

from draftapprox.bench import proxy_report
from draftapprox.bench.targets import load
from draftapprox.eval import ruler

TARGETS_FILE = Path(__file__).parents[2] / "scripts" / "targets" / "proxy.toml"
ENV = {"engine": "vllm", "device": "cpu", "threads": 2, "ratio": 0.25, "seed": 42, "dtype": "float32"}


def _cold(mode, n, first, repeat, draft=None, upstream=None):
    record = {"timings": {"draft": draft, "queue": 0.0, "upstream_first_token": upstream}, "kept_tokens": n // 4} \
        if mode == "proxy" else None
    return {"key": f"vllm|cold|{mode}|{n}|{repeat}", "engine": "vllm", "stage": "cold", "mode": mode, "length": n,
            "repeat": repeat, "prompt_tokens": n, "first_token": first, "record": record, "env": ENV}


def _answer(mode, task, index, score, kept=None):
    sample = f"{task}/2048/42/{index}"
    return {"key": f"vllm|accuracy|{mode}|{sample}", "engine": "vllm", "stage": "accuracy", "mode": mode,
            "sample": sample, "task": task, "score": score, "kept_tokens": kept, "env": ENV}


def test_targets_split_and_accuracy_are_computed_from_the_rows(tmp_path):
    rows = [_cold("engine", 4096, 50.0, 0), _cold("engine", 4096, 60.0, 1),
            _cold("proxy", 4096, 36.0, 0, 20.0, 15.9), _cold("proxy", 4096, 40.0, 1, 24.0, 15.9)]
    grid = []
    for task in ruler.TASKS:
        for index in range(5):
            rows.append(_answer("proxy", task, index, 100.0 if index else 0.0, 512))
            grid.append({"key": f"{task}/2048/42/{index}|specpc@0.25", "sample": f"{task}/2048/42/{index}",
                         "task": task, "length": 2048, "method": "specpc", "budget": 0.25, "score": 100.0,
                         "kept_tokens": 512 if index else 500})
    rows.append({"key": "vllm|warm|engine|4096", "engine": "vllm", "stage": "warm", "mode": "engine",
                 "length": 4096, "questions": [{"first_token": t, "score": 100.0} for t in (40.0, 2.0)],
                 "env": ENV})
    path, reference = tmp_path / "proxy.jsonl", tmp_path / "grid.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference.write_text("".join(json.dumps(r) + "\n" for r in grid))
    goals = load(TARGETS_FILE, proxy_report.TARGETS)
    text = proxy_report.write([path], [reference], tmp_path / "out", "bench proxy", goals)[0].read_text()
    # medians: alone 55, proxy 38 (draft 22, engine 15.9): 0.69x, forwarding 0.1 s
    assert "| vLLM-CPU | 4096 | 4096 | 1024 | 55.0 | 38.0 | 0.69 | 22.0 | 0.10 | 15.9 |" in text
    assert "| 4096 tokens: proxy TTFT <= 0.70x vLLM-CPU alone | 0.69 | met |" in text
    assert "8192 tokens" not in text  # a target this run did not measure is left out
    # the proxy scores 80 a task where in-process SpecPC scores 100: 20 points below, on all 13 tasks x 5
    assert "within 2 points of in-process SpecPC | -20.0 points | missed |" in text
    assert f"kept exactly as many tokens as in-process SpecPC on {4 * 13} of {5 * 13} prompts" in text
    assert "| vLLM-CPU | engine alone | 40.0 | 2.0 | 21.0 | 42.0 | 2/2 |  |" in text
    assert (tmp_path / "out" / "proxy-ttft.png").stat().st_size > 0


def test_an_accuracy_run_short_of_five_samples_a_task_is_incomplete(tmp_path):
    rows = [_answer("proxy", task, 0, 100.0, 512) for task in ruler.TASKS]
    grid = [{"key": f"{t}/2048/42/0|specpc@0.25", "sample": f"{t}/2048/42/0", "task": t, "length": 2048,
             "method": "specpc", "budget": 0.25, "score": 100.0, "kept_tokens": 512} for t in ruler.TASKS]
    path, reference = tmp_path / "proxy.jsonl", tmp_path / "grid.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference.write_text("".join(json.dumps(r) + "\n" for r in grid))
    goals = load(TARGETS_FILE, proxy_report.TARGETS)
    text = proxy_report.write([path], [reference], tmp_path / "out", goals=goals)[0].read_text()
    assert "| +0.0 points | incomplete (13 prompts; 5 a task on 13 tasks needed) |" in text
    assert "## Targets" not in proxy_report.write([path], [reference], tmp_path / "bare")[0].read_text()


def test_requests_per_minute_count_the_prompts_sent_uncut(tmp_path):
    def cell(mode: str, clients: int, wall: float, uncut: int = 0) -> dict:
        requests = [{"first_token": 1.0, "record": {"forwarded_whole": "timeout" if i < uncut else None}}
                    for i in range(2 * clients)]
        return {"key": f"llamacpp|rate|{mode}|2048|{clients}", "engine": "llamacpp", "stage": "rate", "mode": mode,
                "length": 2048, "clients": clients, "wall": wall, "requests": requests, "env": ENV}

    path = tmp_path / "proxy.jsonl"
    rows = [cell("engine", 1, 60.0), cell("proxy", 1, 20.0), cell("engine", 4, 240.0), cell("proxy", 4, 60.0, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = proxy_report.write([path], [], tmp_path / "out")[0].read_text()
    assert "| llama.cpp (xllamacpp) | 2048 | 1 | 2.00 | 6.00 | 3.00 | 1.0 | 1.0 | 0/2 |" in text
    assert "| llama.cpp (xllamacpp) | 2048 | 4 | 2.00 | 8.00 | 4.00 | 1.0 | 1.0 | 3/8 |" in text
    assert "## Targets" not in text and "## Cold" not in text  # stages this run did not measure
    assert (tmp_path / "out" / "proxy-rate.png").stat().st_size > 0
