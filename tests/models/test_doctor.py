"""`draftapprox doctor`'s report: at every level, the choices the engine really makes there."""

from __future__ import annotations

from draftapprox import kernels
from draftapprox.models import doctor, loading


def test_the_report_names_the_level_and_each_choice(isa):
    rows = {what: (chosen, why) for what, chosen, why in doctor.report()}
    assert rows["kernels"][0] == isa and kernels.ENV in rows["kernels"][1]
    assert rows["--dtype auto"][0] == loading.auto_dtype("cpu")
    wide = "kernel" if kernels.vectorised() else "pytorch"
    assert rows["decode attention"][0] == wide
    for role in ("draft", "target"):
        chosen, why = rows[f"prefill attention ({role})"]
        assert chosen in ("kernel", "pytorch")
        assert ("probed: kernel" in why) == kernels.vectorised()
    if isa == "portable":
        assert rows["--dtype auto"][0] == "float32"  # no wide-vector kernel for bfloat16 weights
    if isa == "avx2":
        assert rows["--dtype auto"][0] == "bfloat16-weights"  # no native bfloat16 at this level


def test_the_command_prints_it(monkeypatch, capsys):
    from draftapprox.cli import run

    assert run(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "draftapprox on this machine" in out and "--dtype auto" in out and kernels.built() in out
