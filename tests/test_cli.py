"""The command line: success paths on tiny local models, and every bad input as one line + non-zero exit."""

import io
import json
import subprocess
import sys

import pytest

from draftapprox.cli import main
from draftapprox.report_pages import START

from .conftest import save_tiny, tiny_model, tiny_tokenizer

PROMPT = " ".join(f"w{i % 300}" for i in range(120))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    made = {}
    for name, kwargs, tok in (("target", {}, tiny_tokenizer()),
                              ("draft", {"layers": 2, "seed": 1}, tiny_tokenizer()),
                              ("other", {"seed": 2}, tiny_tokenizer(shift=3)),
                              ("short", {"context": 64}, tiny_tokenizer())):
        made[name] = save_tiny(root / name, tiny_model("llama", **kwargs), tok)
    return made


def cli(monkeypatch, capsys, args, stdin: bytes | None = PROMPT.encode()):
    monkeypatch.setattr(sys, "argv", ["draftapprox", *args])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin or b"")))
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


def tiny(models, *extra):
    return ["--draft", models["draft"], "--target", models["target"], *extra]


def test_generate_json_reports_text_bytes_and_timings(monkeypatch, capsys, models):
    code, out, _ = cli(monkeypatch, capsys, ["generate", "-m", "speckv", "-b", "0.25", "-n", "4", "--json",
                                             "--set", "window=8", "--set", "kernel=5", *tiny(models)])
    assert code == 0
    record = json.loads(out)
    assert record["method"] == "speckv" and record["prompt_tokens"] == 120
    assert record["kv_bytes_kept"] / record["kv_bytes_full"] == pytest.approx(0.25, rel=0.05)
    assert {"draft", "target_prefill", "decode"} <= set(record["timings"]) and isinstance(record["text"], str)


def test_generate_with_static_decode_writes_the_same_answer(monkeypatch, capsys, models):
    args = ["generate", "-m", "snapkv", "-b", "40", "-n", "6", "--json", "--set", "window=8", *tiny(models)]
    plain = json.loads(cli(monkeypatch, capsys, args)[1])
    code, out, _ = cli(monkeypatch, capsys, [*args, "--static-decode"])
    assert code == 0 and json.loads(out)["text"] == plain["text"] and plain["new_tokens"] == 6


def test_generate_with_speculative_decoding_writes_the_same_answer(monkeypatch, capsys, models):
    args = ["generate", "-m", "fullkv", "-n", "8", "--json", *tiny(models)]
    plain = json.loads(cli(monkeypatch, capsys, args)[1])
    for proposals in ("3", "auto"):
        code, out, _ = cli(monkeypatch, capsys, [*args, "--speculative", proposals])
        record = json.loads(out)
        assert code == 0 and record["text"] == plain["text"] and record["kv_bytes_draft"] > 0
        assert record["speculative"] == (3 if proposals == "3" else "auto")


def test_generate_from_prompt_file_prompt_method(monkeypatch, capsys, models, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT)
    code, out, _ = cli(monkeypatch, capsys, ["generate", "-m", "recencypc", "-b", "30", "-n", "3", "--json",
                                             "--prompt-file", str(path), *tiny(models)], stdin=None)
    assert code == 0 and json.loads(out)["kept_tokens"] == 30


def test_compress_json_gives_ids_and_positions(monkeypatch, capsys, models):
    from draftapprox.models import loading

    loaded = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda source, **kw: loaded.append(source) or real(source, **kw))
    code, out, _ = cli(monkeypatch, capsys, ["compress", "-b", "40", "--json", "--set", "window=8",
                                             "--set", "kernel=4", "--set", "start_layer=1", *tiny(models)])
    assert code == 0
    assert loaded == [models["draft"]]  # SpecPC reads the draft alone: the target is never loaded
    record = json.loads(out)
    words = PROMPT.split()
    assert len(record["positions"]) == 40 == record["kept_tokens"]
    assert record["text"].split() == [words[p] for p in record["positions"]]


def test_methods_lists_every_method(monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, ["methods"])
    assert code == 0
    for name in ("fullkv", "snapkv", "speckv", "adaspeckv", "specpc", "speckvpc", "window=32", "kernel=64"):
        assert name in out


def test_models_list_with_a_cache_dir(monkeypatch, capsys, tmp_path):
    code, out, _ = cli(monkeypatch, capsys, ["models", "list", "--cache-dir", str(tmp_path)])
    assert code == 0 and "missing" in out and "qwen2.5-coder-1.5b-instruct" in out


BAD = [
    (["generate"], b"   \n", "prompt is empty"),
    (["generate", "-b", "0"], None, "budget must be > 0"),
    (["generate", "-b", "1.5"], None, "ratio must be in (0, 1]"),
    (["generate", "-b", "lots"], None, "budget must be a token count"),
    (["generate", "-m", "h2o"], None, "unknown method 'h2o'"),
    (["generate", "-m", "snapkv", "--set", "colour=red"], None, "unknown knob 'colour'"),
    (["generate", "-m", "snapkv", "--set", "kernel=6"], None, "kernel must be a positive odd number"),
    (["generate", "-m", "snapkv", "-b", "16"], None, "window=32 is larger than the budget 16"),
    (["generate", "--set", "window"], None, "KEY=VALUE"),
    (["generate", "--set", "window=abc"], None, "cannot read 'abc'"),
    (["generate", "--set", "window="], None, "--set: 'window=' is not KEY=VALUE"),
    (["eval", "--set", "speckv.window="], None, "--set expects METHOD.KEY=VALUE, got 'speckv.window='"),
    (["eval", "--set", "window=0.5"], None, "--set expects METHOD.KEY=VALUE, got 'window=0.5'"),
    (["eval", "--methods", "speckv(window=)"], None, "'window=' is not KEY=VALUE"),
    (["generate"], b"\xff\xfe bad bytes", "not valid UTF-8"),
    (["generate", "--prompt-file", "/nonexistent/prompt.txt"], None, "prompt file not found"),
    (["generate", "--prompt-file", "/"], None, "prompt file is a folder"),
    (["compress", "-m", "snapkv"], None, "not a prompt-compression method"),
    (["eval", "--decode-batch", "0"], None, "--decode-batch must be >= 1"),
    (["eval", "--device", "gpu"], None, "unknown device 'gpu'"),
    (["eval", "--methods", "speckv(window)"], None, "'window' is not KEY=VALUE"),
    (["eval", "--shard", "2/2"], None, "need 0 <= I < N"),
    (["eval", "--shard", "half"], None, "--shard must be I/N"),
    (["eval", "--output", "/"], None, "--output / is a folder"),
    (["eval", "--output", __file__], None, "test_cli.py is not a results file: line 1 is not one of its rows"),
    (["generate", "--device", "gpu"], None, "unknown device 'gpu'"),
    (["bench", "--device", "gpu", "--output", "/nonexistent/bench.jsonl"], None, "unknown device 'gpu'"),
    (["eval", "reference", "--method", "h2o"], None, "--method must be specpc or speckv"),
    (["generate", "--speculative", "many"], None, "speculative must be a number of tokens"),
    (["generate", "--speculative", "2", "--static-decode"], None, "does not run with --static-decode"),
    (["serve", "--speculative", "2", "--upstream", "http://127.0.0.1:9/v1"], None, "the engine decodes"),
]


@pytest.mark.parametrize(("args", "stdin", "message"), BAD)
def test_bad_input_is_one_line_and_non_zero(monkeypatch, capsys, models, args, stdin, message):
    code, out, err = cli(monkeypatch, capsys, [*args, *tiny(models)], stdin=stdin or PROMPT.encode())
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_appends_answers_and_says_when_a_rerun_has_nothing_left(monkeypatch, capsys, models, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = ["eval", "--methods", "fullkv", "--lengths", "1024", "--tasks", "niah_single_1", "--samples", "1",
            "--output", str(out), *tiny(models)]
    code, _, err = cli(monkeypatch, capsys, args)
    assert code == 0 and "1 answers written to" in err and len(out.read_text().splitlines()) == 1
    code, _, err = cli(monkeypatch, capsys, args)
    assert code == 0 and "already in" in err and "nothing to run" in err and len(out.read_text().splitlines()) == 1


def test_eval_diff_prints_a_table_or_one_line_errors(monkeypatch, capsys, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"key": f"vt/2048/42/0|{m}", "sample": "vt/2048/42/0", "score": s,
                                           "task": "vt", "length": 2048, "method": m.split("@")[0],
                                           "budget": 128 if "@" in m else None,
                                           "prediction": p, "expected": ["XKQZT"]}) + "\n"
                               for m, s, p in [("fullkv", 100, "XKQZT"), ("speckv@128", 0, "ABCDE")]))
    code, out, _ = cli(monkeypatch, capsys, ["eval", "diff", str(answers), "--method", "speckv@128"])
    assert code == 0 and "| vt/2048/42/0 | -100 | XKQZT | XKQZT (100) | ABCDE (0) | - |" in out
    code, _, _ = cli(monkeypatch, capsys, ["eval", "diff", str(answers), "--method", "speckv@128", "--out",
                                           str(tmp_path / "new" / "diff.md")])
    written = (tmp_path / "new" / "diff.md").read_text()
    assert code == 0 and out.strip() in written and written.startswith(START)  # spliced: a rerun replaces it
    (tmp_path / "mine.md").write_text("my notes\n")
    code, _, err = cli(monkeypatch, capsys, ["eval", "diff", str(answers), "--method", "speckv@128", "--out",
                                             str(tmp_path / "mine.md")])
    assert code == 2 and "not a report of ours" in err and (tmp_path / "mine.md").read_text() == "my notes\n"
    for args, message in [(["/nonexistent/answers.jsonl", "--method", "speckv@128"], "no such file"),
                          ([str(answers), "--method", "snapkv@128"], "no answers labelled 'snapkv@128'"),
                          ([str(answers), "--method", "speckv@128", "--out", str(tmp_path)], "is a folder")]:
        code, out, err = cli(monkeypatch, capsys, ["eval", "diff", *args])
        assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_model_problems_are_one_line_errors(monkeypatch, capsys, models, tmp_path):
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"not a gguf file")
    cases = [
        (["--draft", models["other"], "--target", models["target"]], "tokenizers differ"),
        (["--target", str(tmp_path / "missing.gguf")], "not found"),
        (["--target", str(corrupt), "-m", "fullkv"], "cannot load model"),
        (["--draft", models["draft"], "--target", models["short"]], "exceeds the target's context of 64"),
    ]
    for args, message in cases:
        code, _, err = cli(monkeypatch, capsys, ["generate", "-m", "speckv", "--set", "window=8", *args]
                           if "-m" not in args else ["generate", *args])
        assert code == 2 and message in err and "Traceback" not in err, err


def test_real_entry_point_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "draftapprox", "generate", "-m", "nope"], input=b"hello",
                          capture_output=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().startswith("error: unknown method 'nope'")
    assert b"Traceback" not in proc.stderr


def test_kvpress_selection_refuses_unknown_cases_before_loading_anything(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, ["eval", "kvpress-selection", "--cases", "snapkv,h2o"])
    assert code == 2 and out == "" and "unknown case(s) h2o; choose from snapkv," in err and "Traceback" not in err
