"""Every script under examples/ runs as written on the real offline pair and prints what it promises."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from draftapprox.examples import ANSWER

pytestmark = pytest.mark.real
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_transformers_generate(capsys):
    runpy.run_path(str(EXAMPLES / "transformers_generate.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert ANSWER in printed and "speckv: kept 2" in printed, printed
