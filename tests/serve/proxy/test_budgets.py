"""Keep curves and per-model budgets (`--budget 4096:1.0,8192:0.5`, `--model-budget NAME=BUDGET`)."""

from __future__ import annotations

import pytest

from draftapprox.errors import ConfigError
from draftapprox.serve.proxy.budgets import Budgets, KeepCurve, parse


def test_a_curve_is_flat_outside_its_points_and_linear_between():
    curve = KeepCurve.parse("4096:1.0,8192:0.5,32768:0.25")
    assert [curve(n) for n in (100, 4096, 6144, 8192, 20480, 32768, 100_000)] == [1.0, 1.0, 0.75, 0.5, 0.375,
                                                                                     0.25, 0.25]
    assert str(curve) == "4096:1,8192:0.5,32768:0.25"


@pytest.mark.parametrize("text", ["4096:1.5", "4096:0", "x:0.5", "4096", "8192:0.5,4096:1.0", "4096:1,4096:0.5",
                                  "0:0.5"])
def test_a_bad_curve_is_refused_naming_the_point(text):
    with pytest.raises(ConfigError, match="keep curve"):
        KeepCurve.parse(text)


def test_budgets_by_model_and_by_length():
    budgets = Budgets.parse("1000:1.0,2000:0.5", ["small=0.25", "big=512"])
    assert budgets.for_prompt("other", 1500) == 0.75
    assert budgets.for_prompt("small", 1500) == 0.25 and budgets.for_prompt("big", 1500) == 512
    assert Budgets().for_prompt("any", 10) is None
    assert parse("256") == 256 and parse("0.25") == 0.25
    with pytest.raises(ConfigError, match="MODEL=BUDGET"):
        Budgets.parse(None, ["small"])
