"""Ctrl-C during a study: one line saying that a rerun resumes (and where), exit status 130, no
traceback; the rerun then skips what was finished."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quotientsharp.studies.runner import INTERRUPTED_EXIT_STATUS, interrupted_message, out_argument

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

STUDY = '''
import os, sys, time
from quotientsharp.studies.runner import UnitStore, run_resumable, run_units

def main():
    out = sys.argv[sys.argv.index("--out") + 1]
    pause = float(os.environ["UNIT_SECONDS"])
    def compute(key, config):
        with open(os.path.join(out, "computed.log"), "a") as log:
            log.write(key + "\\n")
        time.sleep(pause if config["i"] >= 2 else 0.0)
        return {"square": config["i"] ** 2}
    os.makedirs(out, exist_ok=True)
    run_units(UnitStore(out), {f"u{i:02d}": {"i": i} for i in range(20)}, compute, progress=True)

run_resumable(main)
'''


def interrupt_when(cmd: list[str], ready: Path, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    """Start ``cmd``, send SIGINT once ``ready`` exists, and return the finished process."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"finished before {ready} appeared (status {proc.returncode}):\n{err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{ready} did not appear")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_one_line(proc: subprocess.CompletedProcess, out: Path) -> None:
    assert proc.returncode == INTERRUPTED_EXIT_STATUS, proc.stderr
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    last = proc.stderr.rstrip("\n").split("\n")[-1]  # after the progress bar's partial line
    assert last == interrupted_message(str(out))
    assert f"saved in {out}; rerun the same command to resume" in last


def test_interrupted_sweep_prints_one_line_and_rerun_resumes(tmp_path):
    script = tmp_path / "study.py"
    script.write_text(STUDY)
    out = tmp_path / "out"
    cmd = [sys.executable, str(script), "--out", str(out)]
    proc = interrupt_when(cmd, out / "u01.json", {**ENV, "UNIT_SECONDS": "30"})
    assert_one_line(proc, out)
    assert sorted(p.stem for p in out.glob("u*.json")) == ["u00", "u01"]  # u02 was in flight: not kept
    assert not list(out.glob(".*.tmp"))

    rerun = subprocess.run(cmd, cwd=ROOT, env={**ENV, "UNIT_SECONDS": "0"}, capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.stem for p in out.glob("u*.json")) == [f"u{i:02d}" for i in range(20)]
    computed = (out / "computed.log").read_text().split()
    assert computed.count("u00") == computed.count("u01") == 1  # finished units were not redone
    assert computed[-18:] == [f"u{i:02d}" for i in range(2, 20)]  # the rerun did the rest, from u02 (in flight)


def test_vit_study_ctrl_c(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "experiments/vit_study.py", "--quick", "--measures", "adaptive", "--out", str(out)]
    proc = interrupt_when(cmd, out / "config.json", ENV)
    assert_one_line(proc, out)


def test_every_study_script_handles_ctrl_c():
    """The scripts that write resumable output run their main through ``run_resumable`` (the
    diagonal study takes minutes to reach its first file on 2 cores, too long to interrupt here)."""
    scripts = [p for p in (ROOT / "experiments").glob("*.py") if "--out" in p.read_text()
               and "run_units" in p.read_text() + _study_module(p)]
    assert {p.name for p in scripts} >= {"diagonal_nets.py", "vit_study.py", "text_study.py"}
    for p in scripts + [ROOT / "experiments" / "train_compare.py"]:
        main_block = p.read_text().split('if __name__ == "__main__":')[1]
        assert "run_resumable(main" in main_block, p.name


def _study_module(script: Path) -> str:
    """The source of the quotientsharp.studies modules a script imports its study from, directly
    or through a module of experiments/ (``from study_cli import main``)."""
    text = script.read_text()
    modules = re.findall(r"quotientsharp\.studies\.(\w+) import", text)
    local = [m for m in re.findall(r"^from (\w+) import", text, re.M) if (script.parent / f"{m}.py").exists()]
    return "".join((ROOT / "quotientsharp" / "studies" / f"{m}.py").read_text() for m in modules
                   if m not in ("runner", "parallel")) + "".join(  # the machinery, not a study
        _study_module(script.parent / f"{m}.py") for m in local)


def test_out_argument_forms():
    assert out_argument(["--quick", "--out", "results/a"]) == "results/a"
    assert out_argument(["--out=results/b", "--quick"]) == "results/b"
    assert out_argument(["--quick"]) is None
