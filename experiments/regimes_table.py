"""The two regimes side by side: τ of every measure for the populations trained from scratch and
fine-tuned from one checkpoint, per task, with the paper's values (issue 13).

    python experiments/regimes_table.py            # prints it and writes benchmarks/results/regimes_table.md

Reads the committed summaries: ``benchmarks/results/{vit,text}_study_summary.json`` (from scratch)
and ``benchmarks/results/finetune/{vit,text,text_random}/summary.json`` (fine-tuned; text twice:
identical hyperparameters and seeds only, then random hyperparameters from the same checkpoint).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from quotientsharp.studies.finetune import regimes_table
from quotientsharp.studies.report import write_text_atomic
from quotientsharp.studies.transformers import GAPS

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SOURCES = {"vit": {"from scratch": RESULTS / "vit_study_summary.json",
                   "fine-tuned": RESULTS / "finetune" / "vit" / "summary.json"},
           "text": {"from scratch": RESULTS / "text_study_summary.json",
                    "fine-tuned, seeds": RESULTS / "finetune" / "text" / "summary.json",
                    "fine-tuned, random hparams": RESULTS / "finetune" / "text_random" / "summary.json"}}


def load_summaries() -> dict:
    """``{task: {regime: summary}}`` of the committed summaries; exits naming the missing ones."""
    missing = [str(p) for regimes in SOURCES.values() for p in regimes.values() if not p.exists()]
    if missing:
        raise SystemExit("error: missing summaries (finish the studies first): " + ", ".join(missing))
    return {task: {regime: json.loads(p.read_text()) for regime, p in regimes.items()}
            for task, regimes in SOURCES.items()}


def markdown(summaries: dict) -> str:
    """One :func:`~quotientsharp.studies.finetune.regimes_table` per gap, each under a line naming it."""
    return "\n\n".join(f"τ-a [95% CI] against {label}:\n\n{regimes_table(summaries, gap)}" for gap, label in GAPS.items())


def main(argv: Sequence[str] | None = None) -> str:
    """Print and write the markdown: one table per gap."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "regimes_table.md"), help="markdown file to write")
    args = parser.parse_args(argv)
    text = markdown(load_summaries())
    write_text_atomic(args.out, text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
