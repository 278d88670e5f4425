"""The command line of the transformer studies trained from scratch, shared by
``experiments/vit_study.py`` and ``experiments/text_study.py`` (which run it through
:func:`~quotientsharp.studies.runner.run_resumable`: Ctrl-C prints one line and exits 130).

    python experiments/study_cli.py vit --quick --out results/vit_quick   # the same as vit_study.py

The study itself is :mod:`quotientsharp.studies.transformers`.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from quotientsharp.data import DatasetUnavailableError
from quotientsharp.studies import parallel
from quotientsharp.studies.report import tau_table
from quotientsharp.studies.transformer_measures import MEASURES, OPT_IN_MEASURES
from quotientsharp.studies.transformer_population import DEFAULT_DATASET, TASKS
from quotientsharp.studies.transformer_run import require_learned, run_study, study_config


def main(task: str, argv: Sequence[str] | None = None, description: str = "") -> dict:
    """The shared command line of ``experiments/vit_study.py`` and ``experiments/text_study.py``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="output folder (reused to resume)")
    parser.add_argument("--quick", action="store_true", help="tiny data, 4 models, cheap settings (minutes)")
    parser.add_argument("--n-models", type=int, help="population size (default 24; quick 4)")
    parser.add_argument("--dataset", help=f"dataset name (default {DEFAULT_DATASET[task]}; "
                                          f"{'digits' if task == 'vit' else 'tweets'} with --quick)")
    parser.add_argument("--rho", type=float, help="worst-case radius (default 0.1)")
    parser.add_argument("--rho-average", type=float, help="average-case radius (default 0.01)")
    parser.add_argument("--slq-probes", type=int, help="SLQ probes for Tr H and Rényi (default 8)")
    parser.add_argument("--measures", nargs="+", choices=list(MEASURES),
                        help=f"measurement units (default: all but {', '.join(OPT_IN_MEASURES)})")
    parser.add_argument("--seed", type=int, default=0, help="population, subset, solver and bootstrap seed")
    parallel.add_run_arguments(parser)
    args = parser.parse_args(argv)
    executor = parallel.run_setup(parser, args)
    overrides = {k: v for k, v in (("rho", args.rho), ("rho_average", args.rho_average),
                                   ("slq_probes", args.slq_probes), ("measures", args.measures)) if v is not None}
    config = study_config(task, quick=args.quick, n_models=args.n_models, dataset=args.dataset, seed=args.seed,
                          **overrides)
    t0 = time.perf_counter()
    try:
        summary = run_study(args.out, config, progress=not args.no_progress, executor=executor)
    except DatasetUnavailableError as err:
        hint = "\n(the small offline fallback: --dataset digits)" if task == "vit" else ""
        sys.exit(f"error: {err}{hint}")
    print(f"\n{task} study on {summary['dataset']}: Kendall τ-a of sharpness vs generalization gap, "
          f"{summary['n_models']} models, 95% bootstrap CI\n")
    print(tau_table(summary))
    print(f"\nwall time {time.perf_counter() - t0:.1f} s; outputs in {args.out}")
    if args.quick:
        require_learned(summary)
    return summary


if __name__ == "__main__":
    from quotientsharp.studies.runner import run_resumable

    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TASKS)}}} --out DIR [options]")
    run_resumable(main, sys.argv[1], sys.argv[2:], description=f"{sys.argv[1]} transformer study")
