"""The studies' report layer (issue 16 item 4): atomic writers, τ blocks with paired differences."""
import csv
import json
import math

import pytest

from quotientsharp.studies import report
from quotientsharp.studies.kendall import bootstrap_ci, bootstrap_difference_ci, kendall_tau
from quotientsharp.studies.runner import UnitStore


def test_atomic_writers_round_trip_and_leave_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "models.csv"
    report.write_csv_atomic(path, ["id", "x"], [["a", 1.5], ["b", None]])
    with path.open(newline="") as f:
        assert list(csv.reader(f)) == [["id", "x"], ["a", "1.5"], ["b", ""]]
    report.write_json_atomic(tmp_path / "s.json", {"tau": math.nan, "n": 3})
    back = json.loads((tmp_path / "s.json").read_text())
    assert back["n"] == 3 and math.isnan(back["tau"])
    report.write_text_atomic(tmp_path / "t.md", "| a |\n")
    assert (tmp_path / "t.md").read_text() == "| a |\n"
    assert oct((tmp_path / "t.md").stat().st_mode & 0o777) == "0o644"

    def failing(f):
        f.write("partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        report.write_atomic(tmp_path / "t.md", failing)
    assert (tmp_path / "t.md").read_text() == "| a |\n"  # the old file, whole
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_unit_store_writes_through_the_report_layer(tmp_path, monkeypatch):
    calls = []
    real = report.write_atomic
    monkeypatch.setattr(report, "write_atomic", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    UnitStore(tmp_path).save("u", {"x": 1}, {"y": 2})
    assert calls == [tmp_path / "u.json"] and UnitStore(tmp_path).load("u", {"x": 1}) == {"y": 2}


def test_tau_block_leaves_out_unmeasured_models_and_pairs_differences():
    gap = [0.1, 0.4, 0.2, 0.5, 0.3, 0.6]
    a = [1.0, 4.0, 2.0, 6.0, 3.0, 5.0]
    b = [2.0, 1.0, 3.0, 5.0, math.nan, 4.0]
    rows = [{"id": f"m{i}", "gap": g, "values": {"a": x, "b": y}} for i, (g, x, y) in enumerate(zip(gap, a, b))]
    block = report.tau_block(rows, n_boot=200, seed=1, gaps=["gap"], comparisons=[("a", "b")])
    keep = [i for i in range(6) if i != 4]
    assert block["n_models"] == 6 and block["missing"] == {"b": ["m4"]}
    assert block["kendall_tau"]["gap"]["a"] == kendall_tau(a, gap)
    assert block["kendall_tau"]["gap"]["b"] == kendall_tau([b[i] for i in keep], [gap[i] for i in keep])
    assert block["ci95"]["gap"]["a"] == list(bootstrap_ci(a, gap, 200, seed=1))
    expected = bootstrap_difference_ci([a[i] for i in keep], [b[i] for i in keep], [gap[i] for i in keep], 200, seed=1)
    assert block["tau_difference"]["gap"]["a - b"] == list(expected)
    assert report.measured_rows(rows, "a", "b") == [rows[i] for i in keep]
    assert report.tau_cell(block, "gap", "b").endswith("(n=5)")
    d = block["tau_difference"]["gap"]["a - b"]
    assert report.difference_text(d) == f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]" and report.difference_text(None) == "—"
