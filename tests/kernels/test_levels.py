"""Choosing the kernels' instruction-set level: what is requested, what this CPU runs, what a build is keyed by,
and what a first build says while it runs."""

from __future__ import annotations

import logging

import pytest

from draftapprox import kernels


@pytest.fixture
def avx2_cpu(monkeypatch):
    """This process as an AVX2 CPU without AVX-512 (the cached feature list replaced, the level forgotten)."""
    features = frozenset({"avx", "avx2", "fma3", "f16c", "bmi", "bmi2", "lzcnt"})
    monkeypatch.setattr(kernels, "cpu_features", lambda: features)
    monkeypatch.setattr(kernels, "_X86", True)
    kernels._once.cache_clear()
    kernels.reset()
    yield
    kernels._once.cache_clear()
    kernels.reset()


def test_native_is_the_best_level_the_cpu_runs(avx2_cpu, monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.executable() == ("avx2", "portable")
    assert kernels.requested() == "native" and kernels.level() == "avx2"


def test_a_level_the_cpu_cannot_run_falls_to_the_next_one_down_said_once(avx2_cpu, monkeypatch, caplog):
    monkeypatch.setenv(kernels.ENV, "AVX512")  # any case
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert kernels.level() == "avx2" and kernels.level() == "avx2"
    said = [r.getMessage() for r in caplog.records]
    assert said == ["draftapprox: DRAFTAPPROX_KERNEL_ISA=avx512: this CPU cannot run it; using avx2"]


def test_an_unknown_level_is_named_and_native_used(avx2_cpu, monkeypatch, caplog):
    monkeypatch.setenv(kernels.ENV, "sse9")
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert kernels.level() == "avx2"
    assert "'sse9' is not one of native, avx512bf16, avx512, avx2, portable" in caplog.text


def test_a_lower_level_hides_the_features_it_rules_out(monkeypatch):
    features = frozenset({"avx2", "fma3", "f16c", "bmi", "bmi2", "lzcnt", "avx512_f", "avx512_bw", "avx512_vl",
                          "avx512_dq", "avx512_cd", "avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(kernels, "cpu_features", lambda: features)
    monkeypatch.setattr(kernels, "_X86", True)
    seen = {}
    for level in kernels.LEVELS:
        monkeypatch.setattr(kernels, "built", lambda level=level: level)  # as if that level were loaded
        seen[level] = {f for f in ("amx_bf16", "avx512_bf16", "avx512_bw", "avx2", "sse4_2") if kernels.has(f)}
    assert seen == {"avx512bf16": {"amx_bf16", "avx512_bf16", "avx512_bw", "avx2"},
                    "avx512": {"avx512_bw", "avx2"}, "avx2": {"avx2"}, "portable": set()}
    assert not kernels.has("sse4_2")  # what this CPU does not report is never relied on


def test_the_features_follow_the_level_built_not_the_one_asked_for(monkeypatch):
    """A level that fails to build falls to the next one down: the engine's choices follow what runs."""
    monkeypatch.setenv(kernels.ENV, "avx512bf16")
    monkeypatch.setattr(kernels, "cpu_features", lambda: frozenset(kernels._NEEDS["avx512bf16"]))
    monkeypatch.setattr(kernels, "_X86", True)
    monkeypatch.setattr(kernels, "built", lambda: "avx2")
    assert kernels.level() == "avx512bf16" and not kernels.has("avx512_bf16") and kernels.has("avx2")


def test_builds_are_keyed_by_level(monkeypatch, tmp_path):
    monkeypatch.setenv("DRAFTAPPROX_CACHE", str(tmp_path))
    dirs = {level: kernels.build_dir(level) for level in kernels.LEVELS}
    assert len(set(dirs.values())) == len(kernels.LEVELS)
    assert all(path.parent == tmp_path / "kernels" and level in path.name for level, path in dirs.items())


def test_a_first_build_says_what_it_does_and_how_long_it_takes(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DRAFTAPPROX_CACHE", str(tmp_path))
    (tmp_path / "kernels").mkdir()
    with kernels._Progress("avx2"):
        pass
    err = capsys.readouterr().err
    assert "compiling the CPU kernels for avx2 once (typically 1-3 minutes on 2 cores)" in err and "built in" in err
    with kernels._Progress("avx2"):  # the next estimate is the last build's duration
        pass
    assert "(about 0 s, as last time)" in capsys.readouterr().err
    with pytest.raises(RuntimeError), kernels._Progress("portable"):
        raise RuntimeError("compiler missing")
    assert "failed in" in capsys.readouterr().err


def test_the_loaded_module_is_the_level_in_use():
    module = kernels.load()
    if module is None:
        pytest.skip("no level of the kernels builds here (no C++ compiler)")
    assert module.isa() == kernels.built()
    assert kernels.built() == kernels.level()  # every level this CPU runs builds here


def test_apple_clang_gets_openmp_from_libomp_or_runs_on_one_thread(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels.sys, "platform", "darwin")
    monkeypatch.setattr(kernels, "LIBOMP", (tmp_path / "absent", tmp_path / "libomp"))
    kernels._once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert kernels._openmp() == ([], [])  # no -fopenmp: Apple's clang would refuse it
    assert "brew install libomp" in caplog.text
    (tmp_path / "libomp" / "include").mkdir(parents=True)
    (tmp_path / "libomp" / "include" / "omp.h").write_text("")
    cflags, ldflags = kernels._openmp()
    assert cflags == ["-Xpreprocessor", "-fopenmp", f"-I{tmp_path / 'libomp' / 'include'}"]
    assert ldflags[-1] == "-lomp" and ldflags[0].startswith("-L")  # torch's own libomp where it ships one
    kernels._once.cache_clear()
