"""Run the same tests against many mutants of ``./mutants``, forking each run from one warm process.

    cd mutants && python ../benchmarks/mutation_screen.py NAMES_FILE WORKERS TIMEOUT [COVERING_JSON] -- PYTEST_ARGS

The parent imports torch, pytest and the package once (one thread, so forking is safe) and
collects the tests; each mutant then runs in a forked child with ``MUTANT_UNDER_TEST`` set (as
mutmut's trampolines read it), so no state a mutant leaves behind reaches the next run. Prints
``<exit code> <mutant>`` per line (the run with no mutant, named ``-``, comes before every run
that forks); a child that exceeds TIMEOUT seconds is killed (``-9``: a mutant that never ends
counts as killed).

With ``COVERING_JSON`` (``{"known": [test ids], "by_mutant": {mutant: [test ids]}}``, mutmut's
record of which tests reach each function) a mutant runs only the collected tests that reach its
function, plus the collected tests mutmut has not recorded (written since); a mutant that none of
them reaches is not run and prints ``5`` (pytest's "no tests").
Used by ``benchmarks/mutation.py --recheck`` and ``--check``.
"""
from __future__ import annotations

import io
import json
import os
import signal
import sys
import time

os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.getcwd())  # ./mutants: the mutated package wins over the installed one

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


class Collected:
    """pytest plugin: the node ids left after collection and deselection (``-k``)."""

    def __init__(self):
        self.ids: list[str] = []

    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]


def child(name: str, pytest_args: list[str]) -> None:
    os.environ["MUTANT_UNDER_TEST"] = name
    sys.stdout = sys.stderr = io.StringIO()
    os._exit(int(pytest.main(["-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *pytest_args])))


def selections(names: list[str], pytest_args: list[str], covering: str | None) -> dict[str, list[str] | None]:
    """Per mutant, the pytest arguments of its run (``None``: no test reaches it)."""
    collected = Collected()
    with open(os.devnull, "w") as null:  # warm up: import the test modules once
        out, err, sys.stdout, sys.stderr = sys.stdout, sys.stderr, null, null
        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *pytest_args], plugins=[collected])
        sys.stdout, sys.stderr = out, err
    if covering is None:
        return {name: pytest_args for name in names}
    with open(covering) as fh:
        cover = json.load(fh)
    known = set(cover["known"])
    root = os.path.dirname(os.getcwd())  # node ids are relative to the repository root
    options = [a for a in pytest_args if not os.path.exists(a.split("::")[0])]
    runs = {}
    for name in names:
        reach = set(cover["by_mutant"].get(name, ()))
        ids = [os.path.join(root, i) for i in collected.ids if i in reach or i not in known]
        runs[name] = options + ids if ids else None
    return runs


def main() -> None:
    dash = sys.argv.index("--")
    names_file, workers, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    covering = sys.argv[4] if dash > 4 else None
    pytest_args = sys.argv[dash + 1:]
    names = [line.strip() for line in open(names_file) if line.strip()]
    runs = selections(names, pytest_args, covering)

    queue, running = [("-", "", pytest_args)], {}
    for name in names:
        if runs[name] is None:
            print(5, name, flush=True)  # no test reaches it
        else:
            queue.append((name, name, runs[name]))
    first = True
    while queue or running:
        while queue and len(running) < (1 if first else workers):
            label, name, args = queue.pop(0)
            pid = os.fork()
            if pid == 0:
                child(name, args)
            running[pid] = (label, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for p, (label, started) in list(running.items()):
                if time.monotonic() - started > timeout:
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.05)
            continue
        label, _ = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        print(code, label, flush=True)
        if first and code != 0:
            sys.exit(1)  # the tests fail without a mutant
        first = False


if __name__ == "__main__":
    main()
