"""Whole-file writes that never leave half a file and never replace a file we did not write."""

import pytest

from draftapprox.errors import InputError
from draftapprox.safe_write import check_writable_folder, replace_generated, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")

    with pytest.raises(TypeError):
        write_atomic(path, 12345)  # not text or bytes: fails mid-write
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_only_a_file_we_generated_is_replaced(tmp_path):
    ours, theirs = tmp_path / "ours.csv", tmp_path / "theirs.csv"
    ours.write_text("method,score\nold\n")
    theirs.write_text("my,own,data\n")
    replace_generated(ours, "method,score\nnew\n", lambda text: text.startswith("method,score"))
    assert ours.read_text() == "method,score\nnew\n"
    with pytest.raises(InputError, match="left untouched"):
        replace_generated(theirs, "method,score\n", lambda text: text.startswith("method,score"))
    assert theirs.read_text() == "my,own,data\n"


def test_a_folder_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        check_writable_folder(tmp_path / "f" / "out", "--out")
    check_writable_folder(tmp_path / "new" / "deeper", "--out")  # can be made
