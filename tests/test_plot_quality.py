"""examples/plot_quality.py: quality.py results merged by format and method, and plotted."""

import json

import pytest

import plot_quality


def _run(fmt, method, one_shot, recovered=None):
    run = {"format": fmt, "method": method,
           "one_shot": {"vs_dense": {"difference": one_shot, "standard_error": 0.001}}}
    if recovered is not None:
        run["recovered"] = {"vs_control": {"difference": recovered, "standard_error": 0.0005}}
    return run


def _write(path, runs):
    path.write_text(json.dumps({"runs": runs}))
    return str(path)


def test_rows_merge_later_files_win(tmp_path):
    a = _write(tmp_path / "a.json", [_run("2:4", "wanda", 0.05), _run("2:4", "sparsegpt", 0.01)])
    b = _write(tmp_path / "b.json", [_run("2:4", "wanda", 0.04, recovered=0.003)])
    rows = plot_quality.load_rows([a, b])
    assert set(rows) == {("2:4", "wanda"), ("2:4", "sparsegpt")}
    assert rows[("2:4", "wanda")]["one_shot"]["vs_dense"]["difference"] == 0.04


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no quality result at .*missing.json"):
        plot_quality.load_rows([str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match=r"bad.json is not an examples/quality.py result"):
        plot_quality.load_rows([str(bad)])
    empty = _write(tmp_path / "empty.json", [])
    with pytest.raises(ValueError, match="no runs in"):
        plot_quality.load_rows([empty])


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    src = _write(tmp_path / "q.json", [
        _run("samoyeds_shared", "magnitude", 1.08, recovered=0.014),
        _run("samoyeds_shared", "sparsegpt", 0.043, recovered=0.007),
        _run("unstructured75", "wanda", 0.2)])  # one-shot only: no recovered bar
    out = tmp_path / "q.png"
    assert plot_quality.main([src, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
