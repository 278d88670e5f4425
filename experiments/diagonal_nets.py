"""Diagonal-network study (spec part 2 §7): Kendall τ between sharpness and test loss.

    python experiments/diagonal_nets.py --quick --out results/diag     # ~1-2 min on 2 cores
    python experiments/diagonal_nets.py --out results/diag_full        # 50 models, all ρ (64 min on a busy 2-core machine)
    python experiments/diagonal_nets.py --out results/diag_full --ray  # models as Ray tasks

Writes ``DIR/models/<id>.json`` per finished model, ``DIR/summary.json``, ``DIR/models.csv`` and
prints the τ table. Rerunning with the same ``--out`` skips finished models.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from quotientsharp.studies import parallel
from quotientsharp.studies.diagonal import RHOS, run_study, study_config, tau_table

QUICK = dict(n_models=15, rhos=(0.01, 0.1), n_restarts=1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (reused to resume)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['n_models']} models, rho in {QUICK['rhos']}, 1 restart")
    parser.add_argument("--n-models", type=int, help="models, evenly spread over the 50-model grid")
    parser.add_argument("--rho", type=float, nargs="+", help=f"radii (default {RHOS})")
    parser.add_argument("--seed", type=int, default=0, help="data, solver and bootstrap seed")
    parser.add_argument("--noise", type=float, default=0.0, help="label noise sigma")
    parallel.add_run_arguments(parser, threads=False)
    args = parser.parse_args(argv)
    executor = parallel.executor_from_args(parser, args)

    kw = dict(QUICK) if args.quick else {}
    if args.n_models is not None:
        kw["n_models"] = args.n_models
    if args.rho is not None:
        kw["rhos"] = args.rho
    torch.set_num_threads(1)  # (M, 200) tensors: extra threads only add synchronisation overhead
    config = study_config(seed=args.seed, noise=args.noise, **kw)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # per-iterate solver notes; values are recorded
        summary = run_study(args.out, config, progress=not args.no_progress, executor=executor)
    print(f"\nKendall τ-a (sharpness vs {summary['generalization']}), {summary['n_models']} models, "
          f"95% bootstrap CI; headline ρ = {summary['headline_rho']}\n")
    print(tau_table(summary))
    ratio = summary["rk4_over_closed_form"]["range"]
    if ratio:
        print(f"\nRK4 / closed-form geodesic_inv (same solver budget), per model: {ratio[0]:.12f} .. {ratio[1]:.12f}")
    print(f"\nwall time {time.perf_counter() - t0:.1f} s; outputs in {args.out}")
    return summary


if __name__ == "__main__":
    from quotientsharp.studies.runner import run_resumable
    run_resumable(main)  # Ctrl-C: one line saying a rerun resumes, exit status 130
