"""The README's Python examples run as written, on the real offline pair, and print what their comments say."""

import contextlib
import io
import re
from pathlib import Path

import pytest

from draftapprox.examples import ANSWER

pytestmark = pytest.mark.real

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_examples_run_and_find_the_fact():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
              if "OpenAI(" not in b and "integrations.kvpress" not in b]
    assert len(blocks) == 7, "the README's Python examples changed; update this test (the server's example runs in "\
        "tests/serve/test_real.py, the kvpress one in tests/integrations/test_kvpress.py)"
    namespace: dict = {}
    printed, results = [], []
    for block in blocks:  # one namespace: the later examples go on from the first's `pair`
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(README), "exec"), namespace)
        printed.append(out.getvalue())
        results.append(namespace.get("result"))
    assert ANSWER in printed[0], printed[0]  # print(result.text)  # Blue Heron 7421
    assert namespace["short"].positions == sorted(namespace["short"].positions)
    assert 0 < namespace["result"].record.kv_bytes_kept < namespace["result"].record.kv_bytes_full
    methods = ("snapkv", "speckv", "adakv")
    names = sorted(words[0] for words in map(str.split, printed[1].splitlines()) if words and words[0] in methods)
    assert names == ["adakv", "snapkv", "speckv"], printed[1]
    assert namespace["fixed"].tokens == results[0].tokens  # static decode: the first example's tokens
    assert ANSWER in printed[2], printed[2]
    assert namespace["fast"].tokens == results[0].tokens  # speculative decoding: the first example's tokens
    assert 0 < namespace["fast"].record.accepted_tokens <= namespace["fast"].record.proposed_tokens
    assert printed[4].count(ANSWER) == 2, printed[4]  # a patched generate, then the authors' API
    assert "generate" not in vars(namespace["pair"].target)  # unpatched again
    origin, compressed, kept = printed[5].split()  # the LLMLingua-compatible compressor
    assert int(compressed) < 0.3 * int(origin) and kept == "True", printed[5]
    assert namespace["out"].shape == (1, 300, 14, 64)  # the prefill attention example checks itself against SDPA
