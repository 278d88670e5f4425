"""Add measures to a finished transformer study from its committed summary: retrain the same
population from its seeds, measure the new units and a check measure the summary holds, and merge
(the retrained models must reproduce every model's accuracy and check value).

    python experiments/extend_study.py benchmarks/results/vit_study_summary.json \\
        --out benchmarks/results/scratch/vit --measures geodesic_mix_rel geodesic_mix_rel_avg --threads 1

Writes the extension's units to ``OUT`` (resumable) and the merged ``summary.json``, ``models.csv``
and ``tau_table.md`` to ``OUT/merged``; ``--write PATH`` also writes the merged summary to PATH
(e.g. over the base summary it extends).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from quotientsharp.studies import parallel
from quotientsharp.studies.extend import extend_study
from quotientsharp.studies.report import tau_table, write_json_atomic
from quotientsharp.studies.runner import run_resumable
from quotientsharp.studies.transformer_measures import MEASURES


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line, extend the study, print the merged τ table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="summary.json of the finished study to extend")
    parser.add_argument("--out", required=True, help="folder of the extension's units (reused to resume)")
    parser.add_argument("--measures", nargs="+", required=True, choices=list(MEASURES), help="measures to add")
    parser.add_argument("--check", nargs="+", default=["adaptive"], choices=list(MEASURES),
                        help="measures of the base summary remeasured to prove the models are the same (default adaptive)")
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="relative tolerance of the check values (default 1e-4: float32 retraining on other hardware "
                             "reproduced 94 of 96 models, their sharpness to < 4e-5)")
    parser.add_argument("--max-unreproduced", type=float, default=0.1,
                        help="largest fraction of models allowed to differ from the summary (they get no new values)")
    parser.add_argument("--write", help="also write the merged summary here")
    parallel.add_run_arguments(parser)
    args = parser.parse_args(argv)
    executor = parallel.run_setup(parser, args)
    try:
        merged = extend_study(args.base, args.out, args.measures, args.check, progress=not args.no_progress,
                              executor=executor, rtol=args.rtol, max_unreproduced=args.max_unreproduced)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if args.write:
        write_json_atomic(Path(args.write), merged)
    ext = merged["extension"]
    print(f"\nadded {', '.join(ext['measures'])} to {args.base}; check measures reproduced to relative "
          + ", ".join(f"{m} {d:.1e}" for m, d in ext["check_max_rel_diff"].items()))
    for model, why in ext["not_reproduced"].items():
        print(f"not reproduced, left without the new measures: {model}: {why}")
    print()
    print(tau_table(merged))
    return merged


if __name__ == "__main__":
    run_resumable(main)
