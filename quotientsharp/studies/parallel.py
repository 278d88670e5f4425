"""Population sweeps on Ray: every model's work (train, then measure) as one Ray task.

    python experiments/diagonal_nets.py --out results/diag --ray                 # local Ray, all cores
    python experiments/vit_study.py --out results/vit --ray-address auto         # a running cluster

:class:`RayExecutor` is an executor of :func:`~quotientsharp.studies.runner.run_units`: the driver
submits one task per unfinished unit and saves each result as soon as its task returns, so the
output folder, the resuming and the summary are those of the sequential run, and finished units
are on disk whatever happens to the workers. A task whose worker dies (OOM kill, preempted node)
is retried ``max_retries`` times; an exception raised by the unit itself is not retried. The
cluster's nodes need ``quotientsharp`` importable (same environment, e.g. on a shared file system).
Ray is optional: ``pip install 'quotientsharp[ray]'``.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from .runner import Executor, sequential

INSTALL = "pip install ray  (or: pip install -e '.[ray]')"


def import_ray():
    """The ``ray`` module, or an ``ImportError`` naming the install command."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(f"Ray is not installed; --ray/--ray-address need it: {INSTALL}") from err
    return ray


class RayExecutor:
    """Run each call as a Ray task of ``num_cpus`` CPUs, retried ``max_retries`` times on worker death.

    Uses the running Ray instance if there is one; otherwise starts one with ``ray.init(address,
    **init_kwargs)`` (``address=None``: a local instance; ``"auto"`` or ``"ray://host:10001"``: a
    cluster) and shuts it down after the calls.
    """

    def __init__(self, address: str | None = None, num_cpus: float = 1, max_retries: int = 3, **init_kwargs):
        self.ray = import_ray()
        self.address, self.num_cpus, self.max_retries = address, num_cpus, max_retries
        self.init_kwargs = ({"include_dashboard": False} if address is None else {}) | init_kwargs

    def __call__(self, fn: Callable, calls: Sequence[tuple], on_done: Callable[[tuple, Any], None]) -> None:
        if not calls:
            return
        ray = self.ray
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, **self.init_kwargs)
        pending: dict = {}
        try:
            task = ray.remote(num_cpus=self.num_cpus, max_retries=self.max_retries)(fn)
            pending = {task.remote(*args): args for args in calls}
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                on_done(pending[ref], ray.get(ref))
                del pending[ref]
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if started:
                ray.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ray``, ``--ray-address``, ``--ray-cpus-per-task``, ``--ray-retries``."""
    group = parser.add_argument_group("Ray (optional: " + INSTALL + ")")
    group.add_argument("--ray", action="store_true", help="run the models as tasks on a local Ray instance")
    group.add_argument("--ray-address", help="join a running Ray cluster ('auto', 'ray://host:10001'); implies --ray")
    group.add_argument("--ray-cpus-per-task", type=float, default=1, help="CPUs per model task (default 1)")
    group.add_argument("--ray-retries", type=int, default=3, help="retries of a task whose worker died (default 3)")


def add_run_arguments(parser: argparse.ArgumentParser, threads: bool = True) -> None:
    """The options every study command shares: ``--threads`` (unless ``threads=False``),
    ``--no-progress`` and the Ray options of :func:`add_arguments`."""
    if threads:
        parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true")
    add_arguments(parser)


def run_setup(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Executor:
    """Apply ``--threads`` (when given) and return the executor of :func:`executor_from_args`."""
    executor = executor_from_args(parser, args)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return executor


def executor_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Executor:
    """:func:`~quotientsharp.studies.runner.sequential`, or a :class:`RayExecutor` for ``--ray``."""
    if not (args.ray or args.ray_address):
        return sequential
    try:
        return RayExecutor(args.ray_address, args.ray_cpus_per_task, args.ray_retries)
    except ImportError as err:
        parser.error(str(err))
