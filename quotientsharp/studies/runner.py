"""Resumable sweeps: one JSON file per finished unit of work, written atomically.

A *unit* has a key (its file name) and a JSON-serialisable ``config``. :func:`run_units` computes
the units that have no file yet, writing each as soon as it is done (temporary file +
``os.replace``), so a crash or SIGKILL loses at most the unit in flight, and a rerun skips the
finished ones. A stored unit whose config differs from the requested one is an error, not a
silent reuse. The units run one after the other, or through an *executor*
(:class:`~quotientsharp.studies.parallel.RayExecutor`) that calls ``on_done`` as each finishes.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .report import write_json_atomic  # one atomic writer for units and reports

INTERRUPTED_EXIT_STATUS = 130
"""Exit status of a study stopped by Ctrl-C (128 + SIGINT, as the shell reports it)."""


class UnitStore:
    """The folder of a sweep: ``<root>/<key>.json`` holds ``{"key", "config", "result"}``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """The file of unit ``key``: ``<root>/<key>.json``."""
        return self.root / f"{key}.json"

    def load(self, key: str, config: Mapping[str, Any] | None = None) -> dict | None:
        """The stored result of ``key``, or ``None`` if absent; raises if its config differs."""
        path = self.path(key)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if config is not None and record["config"] != _normalise(config):
            raise ValueError(f"{path} was computed with another configuration; use a fresh output "
                             f"folder or delete it.\n stored:    {record['config']}\n requested: "
                             f"{_normalise(config)}")
        return record["result"]

    def save(self, key: str, config: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """Write ``{"key", "config", "result"}`` for ``key`` atomically
        (:func:`~quotientsharp.studies.report.write_json_atomic`);
        a later :meth:`load` with another ``config`` raises.
        """
        write_json_atomic(self.path(key), {"key": key, "config": _normalise(config), "result": result})


def _normalise(config: Mapping[str, Any]) -> Any:
    """The config as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(config))


Executor = Callable[[Callable, Sequence[tuple], Callable[[tuple, Any], None]], None]
"""``executor(fn, calls, on_done)`` runs ``fn(*args)`` for every ``args`` in ``calls`` and calls
``on_done(args, result)`` as each one finishes (in any order)."""


def sequential(fn: Callable, calls: Sequence[tuple], on_done: Callable[[tuple, Any], None]) -> None:
    """The default executor: one call after the other, in this process."""
    for args in calls:
        on_done(args, fn(*args))


def run_units(
    store: UnitStore,
    units: Mapping[str, Mapping[str, Any]],
    compute: Callable[[str, Mapping[str, Any]], Mapping[str, Any]],
    progress: bool = True,
    desc: str = "units",
    executor: Executor = sequential,
) -> dict[str, dict]:
    """Results of every unit ``{key: config}``, computing (``compute(key, config)``, through
    ``executor``) and saving, as each finishes, only those not yet stored. Returns ``{key: result}``
    in the order of ``units``."""
    results = {key: store.load(key, cfg) for key, cfg in units.items()}
    todo = [(key, units[key]) for key, res in results.items() if res is None]
    with tqdm(total=len(units), initial=len(units) - len(todo), desc=desc, disable=not progress) as bar:
        def done(args: tuple, result: Mapping[str, Any]) -> None:
            store.save(args[0], args[1], result)
            results[args[0]] = store.load(args[0])
            bar.update()

        executor(compute, todo, done)
    return results


def out_argument(argv: Sequence[str]) -> str | None:
    """The value of ``--out`` in a command line (``--out DIR`` or ``--out=DIR``), else None."""
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


def interrupted_message(out: str | os.PathLike | None) -> str:
    """The one line a study prints on Ctrl-C."""
    where = f" in {out}" if out else ""
    return (f"interrupted: finished work is saved{where}; rerun the same command to resume "
            f"(finished units are skipped)")


def run_resumable(main: Callable[..., Any], *args: Any, default_out: str | os.PathLike | None = None,
                  **kwargs: Any) -> Any:
    """``main(*args, **kwargs)``; on Ctrl-C print :func:`interrupted_message` (the ``--out`` of
    ``sys.argv``, else ``default_out``) as one line on stderr and exit with status 130, instead
    of a traceback. Everything :func:`run_units` finished is on disk already."""
    try:
        return main(*args, **kwargs)
    except KeyboardInterrupt:
        out = out_argument(sys.argv[1:]) or default_out
        print("\n" + interrupted_message(out), file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_STATUS) from None
