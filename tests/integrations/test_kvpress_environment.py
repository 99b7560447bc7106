"""kvpress pins transformers < 5.3, older than this suite's environment may hold: the kvpress press's tests, and
the core they stand on (methods, generation, cache, capture, the transformers doors), run again in the
environment `draftapprox eval setup-peer kvpress` builds, with draftapprox installed there from this checkout."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from draftapprox.eval import peers

ROOT = Path(__file__).resolve().parents[2]
THERE = ["tests/integrations", "tests/methods", "tests/test_generation.py", "tests/test_cache.py",
         "tests/test_capture.py", "tests/test_forward.py"]


@pytest.mark.peer
@pytest.mark.real
def test_the_kvpress_press_and_the_core_pass_in_kvpress_environment():
    if importlib.util.find_spec("kvpress") is not None:
        pytest.skip("kvpress is installed here: test_kvpress.py runs in this environment")
    python = peers.python("kvpress")
    env = peers.peer_env("kvpress")  # this checkout's draftapprox first, whichever one set the environment up
    probe = subprocess.run([str(python), "-c", "import draftapprox, kvpress, pytest; print(draftapprox.__file__)"],
                           capture_output=True, text=True, env=env)
    if probe.returncode:
        pytest.skip("no kvpress environment with draftapprox: run `draftapprox eval setup-peer kvpress`")
    assert probe.stdout.strip().startswith(str(ROOT / "src")), probe.stdout  # the code under test, not another's
    out = subprocess.run([str(python), "-m", "pytest", "-v", "-p", "no:cacheprovider", *THERE,
                          "--deselect", "tests/integrations/test_kvpress_environment.py"],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    tail = "\n".join((out.stdout + out.stderr).splitlines()[-30:])
    assert out.returncode == 0, tail
    ran = "test_kvpress.py::test_kvpress_pipeline_on_the_real_pair_answers_the_example[SpecKVPress] PASSED"
    assert ran in out.stdout, tail  # the press's tests really ran there, not skipped
    version = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    assert tuple(int(x) for x in version.split(".")[:2]) < (5, 3), version  # what kvpress allows, not ours
