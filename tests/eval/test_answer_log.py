"""The resumable JSONL writer: it appends to its own files only, and a torn write of its own is all it cuts."""

import json

import pytest

from draftapprox.eval.answer_log import NotOurs, Results, read

ROW = {"key": "a|b", "score": 1}


@pytest.mark.parametrize("content", [b"hello", b"hello\n", b"\x00\xff binary", b'{"no key": 1}\n',
                                     b'[1, 2]\n', json.dumps(ROW).encode() + b"\nnot ours\n"],
                         ids=["one-line", "text", "binary", "keyless", "not-an-object", "mixed"])
def test_a_file_that_is_not_ours_is_refused_and_left_untouched(tmp_path, content):
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    with pytest.raises(NotOurs, match="left untouched"):
        Results(path)
    assert path.read_bytes() == content


def test_only_a_torn_last_line_of_ours_is_cut(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + '{"key": "c|d", "sco')
    assert Results(path).done == {"a|b"}
    assert path.read_text() == json.dumps(ROW) + "\n"


def test_an_unterminated_row_of_ours_is_kept_and_ended(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(ROW))
    results = Results(path)
    results.append({"key": "c|d"})
    assert [r["key"] for r in read(path)] == ["a|b", "c|d"]


def test_a_writer_can_ask_for_rows_of_its_own_kind(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps({"key": "x", "stage": "cold"}) + "\n")
    with pytest.raises(NotOurs, match="is not a answers file of ours"):
        Results(path, kind=lambda row: "score" in row, what="answers")
    assert Results(path, kind=lambda row: "stage" in row).done == {"x"}
