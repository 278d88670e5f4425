"""Run the same tests against many mutants of ``./mutants``, forking each run from one warm process.

    cd mutants && python ../benchmarks/mutation_screen.py NAMES_FILE WORKERS TIMEOUT -- PYTEST_ARGS

The parent imports torch, pytest and the package once (one thread, so forking is safe) and
collects the tests; each mutant then runs in a forked child with ``MUTANT_UNDER_TEST`` set (as
mutmut's trampolines read it), so no state a mutant leaves behind reaches the next run. Prints
``<exit code> <mutant>`` per line (first line: the run with no mutant, named ``-``); a child that
exceeds TIMEOUT seconds is killed (``-9``: a mutant that never ends counts as killed).
Used by ``benchmarks/mutation.py --recheck`` and ``--check``.
"""
from __future__ import annotations

import io
import os
import signal
import sys
import time

os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.getcwd())  # ./mutants: the mutated package wins over the installed one

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def child(name: str, pytest_args: list[str]) -> None:
    os.environ["MUTANT_UNDER_TEST"] = name
    sys.stdout = sys.stderr = io.StringIO()
    os._exit(int(pytest.main(["-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *pytest_args])))


def main() -> None:
    names_file, workers, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    pytest_args = sys.argv[sys.argv.index("--") + 1:]
    names = [line.strip() for line in open(names_file) if line.strip()]
    with open(os.devnull, "w") as null:  # warm up: import the test modules once
        out, err, sys.stdout, sys.stderr = sys.stdout, sys.stderr, null, null
        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *pytest_args])
        sys.stdout, sys.stderr = out, err

    queue, running = [("-", "")] + [(n, n) for n in names], {}
    first = True
    while queue or running:
        while queue and len(running) < (1 if first else workers):
            label, name = queue.pop(0)
            pid = os.fork()
            if pid == 0:
                child(name, pytest_args)
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
