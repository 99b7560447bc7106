"""The committed result scripts still drive the CLI they were written for (run here on tiny local models)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import save_tiny, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _tiny_pair(tmp_path) -> tuple[str, str]:
    """A tiny local draft (2 layers) and target sharing a chat tokenizer, saved for the scripts to load."""
    tok = tiny_tokenizer(chat=True)
    target = save_tiny(tmp_path / "target", tiny_model("llama", seed=0), tok)
    return save_tiny(tmp_path / "draft", tiny_model("llama", layers=2, seed=1), tok), target


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=600)


def test_gpu_grid_script_runs_its_grid_and_resumes(tmp_path):
    draft, target = _tiny_pair(tmp_path)
    out = tmp_path / "answers.jsonl"
    env = {**os.environ, "DEVICE": "cpu", "SAMPLES": "1", "LENGTHS": "1024", "BUDGETS": "64,0.25",
           "METHODS": "fullkv,speckv,specpc", "OUTPUT": str(out), "CLI": f"{sys.executable} -m draftapprox"}
    args = ["bash", str(ROOT / "scripts" / "accuracy-gpu.sh"), "--draft", draft, "--target", target,
            "--tasks", "niah_single_1", "--set", "specpc.start_layer=1", "--set", "specpc.window=16"]
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == ["niah_single_1/1024/42/0|fullkv",
                                               "niah_single_1/1024/42/0|speckv@64",
                                               "niah_single_1/1024/42/0|specpc(start_layer=1,window=16)@0.25"]
    assert {r["env"]["device"] for r in rows} == {"cpu"}
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 3

    sharded = subprocess.run(args, env={**env, "SHARDS": "2", "SAMPLES": "2"}, capture_output=True, text=True,
                             timeout=600)
    assert sharded.returncode == 0, sharded.stdout
    for i in range(2):
        rows = [json.loads(line) for line in (tmp_path / f"answers-shard{i}-of2.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and {r["index"] for r in rows} == {i}


def test_cuda_graph_script_measures_both_loops_and_resumes(tmp_path):
    """On a CPU the static step runs eagerly: the script's rows, its table and the tokens are what is checked."""
    draft, target = _tiny_pair(tmp_path)
    out, page = tmp_path / "rows.jsonl", tmp_path / "page.md"
    args = ["--device", "cpu", "--draft", draft, "--target", target, "--length", "512", "--steps", "6",
            "--batches", "1,3", "--output", str(out), "--out", str(page)]
    first = _script("cuda_graph_decode.py", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and {(r["method"], r["batch"], r["static"]) for r in rows} == {
        (m, b, s) for m in ("fullkv", "speckv@256") for b in (1, 3) for s in (False, True)}
    assert not any(r["captured"] for r in rows)
    text = page.read_text()
    assert text.count("no (eager)") == 4 and "| no |" not in text  # four pairs, each with the loop's tokens
    again = _script("cuda_graph_decode.py", *args)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 8


def test_prefill_attention_script_tabulates_both_attentions(tmp_path):
    """On tiny local models (head size 16, which the kernel takes): a row per model and length, a row per path."""
    from draftapprox import kernels

    if not kernels.vectorised():
        import pytest

        pytest.skip("the kernels are not built with wide vectors here")
    draft, target = _tiny_pair(tmp_path)
    page = tmp_path / "page.md"
    done = _script("prefill_attention.py", "--draft", draft, "--target", target, "--lengths", "256,512", "--pairs",
                   "1", "--start-layer", "1", "--out", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    text = page.read_text()
    assert text.count("| draft (4 heads on 2, head size 16) | float32 |") == 2  # tiny models run in float32
    assert text.count("| target (4 heads on 2, head size 16) | float32 |") == 2
    assert text.count("| draft SpecPC pass |") == 2 and text.count("| target prefill |") == 2


def test_batched_decode_script_decodes_every_answer_both_ways(tmp_path):
    """A decode takes over its prepared cache, so the script must give each way caches of its own; on tiny local
    models every answer is then decoded alone and in one batch, and the page says how many came out the same."""
    draft, target = _tiny_pair(tmp_path)
    page = tmp_path / "page.md"
    done = _script("batched_decode.py", "--draft", draft, "--target", target, "--length", "512", "--new-tokens", "4",
                   "--budgets", "64,128", "--out", str(page))
    assert done.returncode == 0, done.stderr[-2000:]
    text = page.read_text()
    assert "13 answers to one" in text and "| one at a time |" in text and "| together (groups of " in text
    assert "Identical tokens, batched against one at a time: 13 of 13 answers." in text


def test_isa_benchmark_measures_each_level_resumes_and_reports(tmp_path):
    """On tiny local models, at native and portable (every machine runs both): a row per level, precision and
    length, the attention rows where the kernels have wide vectors, a rerun that measures nothing, a page."""
    from draftapprox import kernels

    draft, target = _tiny_pair(tmp_path)
    out = tmp_path / "isa"
    args = ["--levels", "native,portable", "--lengths", "600", "--attention-lengths", "256", "--new-tokens", "3",
            "--stages", "ours,report", "--draft", draft, "--target", target, "--speckv", "window=8,kernel=5",
            "--out", str(out)]
    done = _script("isa_benchmark.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "raw.jsonl").read_text().splitlines()]
    engine = {r["key"] for r in rows if r["what"] == "engine"}
    levels, dtypes = ("native", "portable"), ("auto", "float32")
    assert all(550 <= r["length"] <= 600 for r in rows if r["what"] == "engine")  # RULER fits the prompt to it
    assert engine == {f"{level}|{dtype}|engine|600" for level in levels for dtype in dtypes}
    assert all(r["decode"] > 0 and r["lookahead"] > 0 and r["prefill"] > 0 for r in rows if r["what"] == "engine")
    attention = [r for r in rows if r["what"] == "attention"]
    assert [r["env"]["level"] for r in attention] == (["native"] if kernels.vectorised() else [])
    again = _script("isa_benchmark.py", *args)
    assert again.returncode == 0 and len((out / "raw.jsonl").read_text().splitlines()) == len(rows)
    page = (out / "README.md").read_text()
    assert page.count("| native (") == 1 and page.count("| portable (") == 1 and (out / "isa.png").is_file()
    assert "Command: `python scripts/isa_benchmark.py" in page
