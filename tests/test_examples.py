"""Every script under examples/ runs as written on the real offline pair and prints what it promises."""

from __future__ import annotations

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
