"""atomic.replace_file / write_json: a file is replaced whole or not at all."""

import json
import os

import pytest

from samoyeds_jax import atomic


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "r.json"
    atomic.write_json(str(path), {"a": 1})
    atomic.write_json(str(path), {"a": [1, 2.5]})
    assert json.loads(path.read_text()) == {"a": [1, 2.5]}
    assert os.listdir(path.parent) == ["r.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic.write_json(str(path), {"old": True})
    with pytest.raises(TypeError):  # not serializable: nothing written
        atomic.write_json(str(path), {"new": object()})
    with pytest.raises(ValueError, match="Out of range float"):
        atomic.write_json(str(path), {"new": float("nan")}, allow_nan=False)

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic.replace_file(str(path), b"new")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["r.json"]  # the temporary file is gone


def test_a_directory_in_the_way_is_named(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match=r"out: it is a directory"):
        atomic.write_json(str(tmp_path / "out"), {"x": 1})
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("path,error,match", [
    (None, TypeError, "must be a path .* got NoneType"), (123, TypeError, "got int"),
    ("", ValueError, "must be a path, got ''")])
def test_a_path_that_is_not_one_is_named(path, error, match):
    with pytest.raises(error, match=match):
        atomic.write_json(path, {})
    with pytest.raises(error, match=match):
        with atomic.replace_directory(path, markers=("x.json",), what="model"):
            pass
