"""benchmarks/mutation.py's bookkeeping (issue 18): what a rerun keeps, how concurrent runs merge,
and how an interrupted screen resumes. Pure functions on hand-written records; no mutmut run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mutation  # noqa: E402

A, B = "quotientsharp.curvature.slq", "quotientsharp.curvature.trace"


def record(hashes: dict, statuses: dict) -> dict:
    return {"function_hashes": hashes, "mutants": {n: {"status": s} for n, s in statuses.items()}}


def test_carry_over_keeps_unchanged_functions_and_drops_kills_of_changed_ones():
    old = record({"x_f": "h1", "x_g": "h2"}, {f"{A}.x_f__mutmut_1": "survived", f"{A}.x_g__mutmut_1": "killed"})
    new = record({"x_f": "h1", "x_g": "CHANGED"},
                 {f"{A}.x_f__mutmut_1": "not checked", f"{A}.x_g__mutmut_1": "not checked"})
    rechecked = {f"{A}.x_f__mutmut_1": {"tests": ["t"]}, f"{A}.x_g__mutmut_1": {"tests": ["t"]}}
    assert mutation.carry_over(old, new, rechecked) == 1
    assert new["mutants"][f"{A}.x_f__mutmut_1"] == {"status": "survived"}  # carried
    assert new["mutants"][f"{A}.x_g__mutmut_1"] == {"status": "not checked"}  # another mutant now
    assert list(rechecked) == [f"{A}.x_f__mutmut_1"]


def test_merge_latest_keeps_what_other_runs_wrote_meanwhile(tmp_path, monkeypatch):
    out = tmp_path / "mutation.json"
    monkeypatch.setattr(mutation, "OUT", out)
    slq, trace = "quotientsharp/curvature/slq.py", "quotientsharp/curvature/trace.py"
    out.write_text(json.dumps({  # on disk: another run's newer trace record and its kill
        "modules": {slq: "slq on disk", trace: "trace on disk"},
        "rechecked": {f"{A}.x_f__mutmut_1": "slq kill on disk", f"{B}.x_h__mutmut_2": "trace kill on disk"}}))
    modules, rechecked = mutation.merge_latest(
        [slq], {slq: "slq of this run", trace: "trace when this run started"},
        {f"{A}.x_f__mutmut_3": "slq kill of this run", f"{B}.x_h__mutmut_9": "stale trace kill"})
    assert modules == {slq: "slq of this run", trace: "trace on disk"}
    assert rechecked == {f"{A}.x_f__mutmut_3": "slq kill of this run", f"{B}.x_h__mutmut_2": "trace kill on disk"}


def test_an_interrupted_screen_resumes_from_its_saved_verdicts(tmp_path, monkeypatch):
    progress = tmp_path / "screen-progress.jsonl"
    monkeypatch.setattr(mutation, "PROGRESS", progress)
    monkeypatch.setattr(mutation, "function_hashes", lambda ms: {m: "h" for m in ms})
    names = [f"{A}.x_f__mutmut_{i}" for i in range(1, 5)]
    key = mutation.screen_key(["tests/test_curvature_slq_mutants.py"], False)
    lines = [{"key": key, "mutant": names[0], "function_hash": "h", "code": "1"},
             {"key": key, "mutant": names[1], "function_hash": "h", "code": "0"},
             {"key": key, "mutant": names[2], "function_hash": "h", "code": "-9"},  # timed out: killed
             {"key": key, "mutant": names[3], "function_hash": "h", "code": "5"}]  # no test reached it
    progress.write_text("".join(json.dumps(e) + "\n" for e in lines))

    def no_screen(*args, **kwargs):
        raise AssertionError("every verdict is saved: nothing to run")

    monkeypatch.setattr(subprocess, "Popen", no_screen)
    monkeypatch.setattr(mutation, "covering_tests", lambda ms: {"known": [], "by_mutant": {}})  # no ./mutants
    assert mutation.killed_by(names, ["tests/test_curvature_slq_mutants.py"], 2) == {names[0], names[2]}
    # other tests, or a changed function, invalidate the saved verdicts
    assert mutation.screen_key(["tests/test_curvature_trace_mutants.py"], False) != key
    monkeypatch.setattr(mutation, "function_hashes", lambda ms: {m: "changed" for m in ms})
    with pytest.raises(AssertionError, match="nothing to run"):
        mutation.killed_by(names, ["tests/test_curvature_slq_mutants.py"], 2)
    mutation.forget_progress({names[0], names[1]})
    assert [json.loads(line)["mutant"] for line in progress.read_text().splitlines()] == names[2:]
