"""Every script under examples/ runs as written on the real offline pair and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from draftapprox.examples import ANSWER

pytestmark = pytest.mark.real
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name: str) -> str:
    """An example as a user runs it, in a process of its own (its models are freed with it). The kvpress example
    runs in kvpress's environment (tests/integrations/test_kvpress.py)."""
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_transformers_generate():
    printed = run("transformers_generate.py")
    assert ANSWER in printed and "speckv: kept 2" in printed, printed


def test_reference_patch_model():
    printed = run("reference_patch_model.py")
    assert ANSWER in printed and "read 512 of" in printed, printed


def test_llmlingua_compressor():
    printed = run("llmlingua_compressor.py")
    assert ANSWER in printed and " -> " in printed, printed


def test_langchain_retriever():
    printed = run("langchain_retriever.py")
    assert ": kept " in printed and "the planted fact survives: True" in printed, printed


def test_llama_index_postprocessor():
    printed = run("llama_index_postprocessor.py")
    assert "Blue Heron in it: True" in printed, printed


def test_litellm_hook():
    printed = run("litellm_hook.py")
    lines = printed.splitlines()
    assert ANSWER in lines[0], printed
    read, total = (int(x) for x in re.findall(r"\d+", lines[1]))  # the server read R tokens of T
    assert read < total // 2, printed
