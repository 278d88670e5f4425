"""Every ```python block of README.md runs as written: each in its own interpreter, in an empty
temporary folder. A block is skipped only when its first line is ``# not-run: <reason>``."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN = re.compile(r"#\s*not-run:\s*(\S.*)")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of the opening fence, code)`` of every ```python block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, i = i + 1, i + 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            if i == len(lines):
                raise ValueError(f"README.md:{start}: ```python block is never closed")
            blocks.append((start, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_blocks_are_found():
    assert len(BLOCKS) >= 3
    fenced = README.read_text().count("```python")
    assert fenced == len(BLOCKS)


def test_not_run_marks_are_few_and_give_a_reason():
    marks = [(line, code.splitlines()[0]) for line, code in BLOCKS if code.lstrip().startswith("# not-run")]
    for line, first in marks:
        assert NOT_RUN.fullmatch(first.strip()), f"README.md:{line}: '# not-run:' needs a reason"
    assert len(marks) <= 2, f"too many README blocks are not run: {marks}"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_block_runs(line, code, tmp_path):
    first = code.splitlines()[0].strip() if code.strip() else ""
    if NOT_RUN.fullmatch(first):
        pytest.skip(f"README.md:{line} marked {first}")
    script = tmp_path / f"readme_{line}.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stderr[-3000:]}"
