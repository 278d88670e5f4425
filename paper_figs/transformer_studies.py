"""Scatter plots of the transformer studies: every measure against both generalization gaps.

    python paper_figs/transformer_studies.py results/vit [--out FIGDIR]

Reads ``DIR/summary.json`` (ViT or text study) and writes ``FIGDIR/<measure>.{png,pdf}``
(default ``DIR/figs``): one figure per measure, a panel per gap, Kendall τ-a [95% CI] in each
title, points coloured by optimizer; and ``FIGDIR/tau_overview.{png,pdf}``: τ-a with its 95%
interval for every measure against each gap.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from quotientsharp.studies.transformers import read_summary  # noqa: E402


def plot_measure(summary: dict, name: str):
    """One figure: ``name`` against each gap of the summary."""
    rows = [r for r in summary["models"] if r["values"].get(name) is not None]
    optimizers = sorted({r["optimizer"] for r in rows})
    fig, axes = plt.subplots(1, len(summary["gaps"]), figsize=(4.2 * len(summary["gaps"]), 3.4), squeeze=False)
    for ax, (gap, label) in zip(axes[0], summary["gaps"].items()):
        for opt in optimizers:
            pts = [r for r in rows if r["optimizer"] == opt]
            ax.scatter([r[gap] for r in pts], [r["values"][name] for r in pts], s=18, label=opt)
        tau, ci = summary["kendall_tau"][gap][name], summary["ci95"][gap][name]
        ax.set_title(f"τ = {tau:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if tau is not None else "τ undefined",
                     fontsize=10)
        values = [r["values"][name] for r in rows]
        if values and min(values) > 0 and max(values) > 20 * min(values):  # spans decades: log axis
            ax.set_yscale("log")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        else:
            ax.ticklabel_format(axis="both", style="sci", scilimits=(-3, 4))
        ax.set_xlabel(label)
        ax.set_ylabel(name)
    axes[0][-1].legend(fontsize=7, frameon=False)
    fig.suptitle(f"{summary['task']} study on {summary['dataset']} ({summary['n_models']} models)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_overview(summary: dict):
    """τ-a [95% CI] of every measure (rows) against each gap (one marker per gap)."""
    names = list(summary["kendall_tau"]["error_gap"])
    fig, ax = plt.subplots(figsize=(5.5, 0.32 * len(names) + 1.2))
    for k, (gap, label) in enumerate(summary["gaps"].items()):
        ys = [i + 0.18 * (k - 0.5) for i in range(len(names))]
        taus = [summary["kendall_tau"][gap][n] for n in names]
        cis = [summary["ci95"][gap][n] or [t, t] for n, t in zip(names, taus)]
        ax.errorbar(taus, ys, xerr=[[t - c[0] for t, c in zip(taus, cis)], [c[1] - t for t, c in zip(taus, cis)]],
                    fmt="o", ms=4, capsize=2, label=label)
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(-1, 1)
    ax.set_xlabel("Kendall τ-a with the generalization gap [95% bootstrap CI]")
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    ax.set_title(f"{summary['task']} study on {summary['dataset']} ({summary['n_models']} models)", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="output folder of experiments/vit_study.py or text_study.py")
    parser.add_argument("--out", help="figure folder (default DIR/figs)")
    args = parser.parse_args(argv)
    summary = read_summary(args.dir)
    out = Path(args.out or Path(args.dir) / "figs")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    figures = {name: lambda name=name: plot_measure(summary, name) for name in summary["kendall_tau"]["error_gap"]}
    figures["tau_overview"] = lambda: plot_overview(summary)
    for name, make in figures.items():
        fig = make()
        for ext in ("png", "pdf"):
            fig.savefig(out / f"{name}.{ext}", dpi=150)
            written.append(out / f"{name}.{ext}")
        plt.close(fig)
    print(f"{len(written)} files in {out}")
    return written


if __name__ == "__main__":
    main()
