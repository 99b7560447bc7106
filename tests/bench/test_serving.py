"""`bench serve` end to end on tiny models: our server started as a process, concurrent streaming clients, the
stall study, resumption, and serving.md with its targets and plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from draftapprox.cli import main
from tests.conftest import tiny_pair_folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_pair_folders(root)
    return root


def run(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["draftapprox", "bench", "serve", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)


def test_bench_serve_measures_resumes_and_reports(folders, tmp_path, monkeypatch, capsys):
    out, report = tmp_path / "serve.jsonl", tmp_path / "report"
    common = ["--target", str(folders / "target"), "--draft", str(folders / "draft"), "--dtype", "float32",
              "--methods", "fullkv,speckv@256,fullkv+spec=2", "--lengths", "512", "--clients", "1,2",
              "--new-tokens", "6",
              "--stall-chunks", "auto,16", "--stall-length", "512", "--output", str(out), "--report", str(report),
              "--targets", str(Path(__file__).parents[2] / "scripts/targets/serving.toml")]
    run(monkeypatch, *common)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cells = [r for r in rows if r["kind"] == "cell"]
    assert sorted((r["method"], r["clients"]) for r in cells) == [
        ("fullkv", 1), ("fullkv", 2), ("fullkv+spec=2", 1), ("fullkv+spec=2", 2), ("speckv@256", 1), ("speckv@256", 2)]
    for cell in cells:
        assert len(cell["requests"]) == cell["clients"] and cell["decode_tokens"] == 6 * cell["clients"]
        assert all(r["usage"]["completion_tokens"] == 6 for r in cell["requests"])
        speculated = [r["record"]["speculative"] for r in cell["requests"]]
        assert speculated == [2 if "+spec=" in cell["method"] else 0] * cell["clients"]
    assert sorted(str(r["prefill_chunk"]) for r in rows if r["kind"] == "stall") == ["16", "auto"]
    text = (report / "serving.md").read_text()
    assert "### 512-token prompts" in text and "| speckv@256 | 2 |" in text and "### Targets" in text
    assert "SpecKV@256 holds FullKV's concurrent requests in 512 MiB >= 10x" in text and "| auto |" in text
    assert (report / "serving-throughput.png").stat().st_size > 0 and (report / "serving-stall.png").exists()
    capsys.readouterr()
    run(monkeypatch, *common)  # everything is there: nothing is measured again
    assert "already in" in capsys.readouterr().err and len(out.read_text().splitlines()) == len(rows)
