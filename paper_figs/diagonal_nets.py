"""Scatter plots of the diagonal-network study: sharpness vs test loss, at paper size.

    python paper_figs/diagonal_nets.py results/diag_full [--out FIGDIR] [--rho 0.1]

Reads ``DIR/summary.json`` and ``DIR/models.csv`` (from ``experiments/diagonal_nets.py``) and
writes, at the chosen radius (default: the headline ρ),

* ``diag_overview.{png,pdf}``: every measure, one panel each, 6.8 in wide (a two-column figure);
* ``diag_<measure>.{png,pdf}``: one measure, 3.3 in wide (a one-column figure).

Points are coloured by the init scale α; each panel states τ and the paper's τ where the paper
has one. Every figure is checked before it is saved (:func:`readability_problems`: tick labels
that overlap, text under 7 pt) and the script fails rather than write an unreadable figure.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

MIN_FONT_PT = 7.0
FONTS = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 7}
LABELS = {
    "adaptive": "adaptive",
    "euclidean": "Euclidean",
    "geodesic_inv": "geodesic, inverse metric",
    "geodesic_inv_ode": "geodesic, inverse metric (RK4)",
    "geodesic_mix": "geodesic, mixed metric\n(metric-norm ball)",
    "geodesic_mix_bnorm": "geodesic, mixed metric\n(ball √2‖b‖ ≤ ρ)",
}
"""Human-readable panel titles of the study's measure keys."""
PAPER_COLUMN = {"adaptive": "adaptive", "geodesic_inv": "geodesic_inv", "geodesic_inv_ode": "geodesic_inv",
                "geodesic_mix": "geodesic_mix", "geodesic_mix_bnorm": "geodesic_mix"}
"""The paper's τ each measure is compared with (the paper's mixed value does not say which ball)."""
ORDER = ["adaptive", "geodesic_inv", "geodesic_mix_bnorm", "euclidean", "geodesic_inv_ode", "geodesic_mix"]


def load(study_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((study_dir / "summary.json").read_text())
    with (study_dir / "models.csv").open() as f:
        rows = list(csv.DictReader(f))
    return summary, rows


def signed(x: float) -> str:
    """``+0.57`` / ``−0.86`` (a typographic minus)."""
    return f"{x:+.2f}".replace("-", "−")


def title(measure: str, tau: float, paper: dict) -> str:
    ref = paper.get(PAPER_COLUMN.get(measure, ""))
    ref_text = "" if ref is None else f" (paper {signed(ref)})"
    return f"{LABELS.get(measure, measure)}\nτ = {signed(tau)}{ref_text}"


def style_axis(axis, values: list[float]) -> None:
    """Log scale when the values are positive and span more than a decade (major ticks only,
    labelled as powers of ten); otherwise linear with at most 4 compact tick labels."""
    setter = axis.axes.set_xscale if axis is axis.axes.xaxis else axis.axes.set_yscale
    if min(values) > 0 and max(values) / min(values) > 10:
        setter("log")
        axis.set_major_locator(ticker.LogLocator(base=10, numticks=6))
        axis.set_minor_locator(ticker.LogLocator(base=10, subs=tuple(range(2, 10)), numticks=12))
        axis.set_minor_formatter(ticker.NullFormatter())
    else:
        setter("linear")
        axis.set_major_locator(ticker.MaxNLocator(nbins=4, min_n_ticks=3))
        axis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
        axis.set_minor_formatter(ticker.NullFormatter())


def scatter_panel(ax, rows: list[dict], measure: str, rho: str, tau: float, paper: dict):
    x = [float(r[f"{measure}@{rho}"]) for r in rows]
    y = [float(r["test_loss"]) for r in rows]
    alpha = [float(r["alpha"]) for r in rows]
    points = ax.scatter(x, y, c=alpha, cmap="viridis", norm=matplotlib.colors.LogNorm(vmin=1e-3, vmax=1),
                        s=12, linewidths=0)
    style_axis(ax.xaxis, x)
    style_axis(ax.yaxis, y)
    ax.set_title(title(measure, tau, paper))
    ax.set_xlabel(f"sharpness at ρ = {rho}")
    return points


def readability_problems(fig) -> list[str]:
    """Tick labels of one axis that overlap, and text smaller than :data:`MIN_FONT_PT`."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems = []
    for ax in fig.axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
            boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: (b.x0, b.y0))
            for a, b in zip(boxes, boxes[1:]):
                if a.overlaps(b):
                    problems.append(f"{ax.get_title()!r}: {name} tick labels overlap")
                    break
    for text in fig.findobj(matplotlib.text.Text):
        if text.get_visible() and text.get_text() and text.get_fontsize() < MIN_FONT_PT:
            problems.append(f"text {text.get_text()!r} at {text.get_fontsize():.1f} pt < {MIN_FONT_PT} pt")
    return problems


def _save(fig, paths: list[Path]) -> list[Path]:
    problems = readability_problems(fig)
    if problems:
        plt.close(fig)
        raise RuntimeError("unreadable figure " + str(paths[0]) + ": " + "; ".join(problems))
    for p in paths:
        fig.savefig(p, dpi=200)
    plt.close(fig)
    return paths


def overview(rows: list[dict], summary: dict, rho: str, out: Path) -> list[Path]:
    """Every measure at ρ, 3 columns, 6.8 in wide, one colour bar for α."""
    taus = summary["per_rho"][rho]["kendall_tau"]
    measures = [m for m in ORDER if m in taus] + [m for m in taus if m not in ORDER]
    ncols = 3
    nrows = math.ceil(len(measures) / ncols)
    with plt.rc_context(FONTS):
        fig, axes = plt.subplots(nrows, ncols, figsize=(6.8, 2.35 * nrows), squeeze=False, layout="constrained")
        for ax, measure in zip(axes.flat, measures):
            points = scatter_panel(ax, rows, measure, rho, taus[measure], summary["paper"])
        for ax in axes.flat[len(measures):]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel("test loss ‖u⊙v − β*‖²")
        fig.colorbar(points, ax=axes, label="init scale α", shrink=0.6)
        return _save(fig, [out / f"diag_overview.{ext}" for ext in ("png", "pdf")])


def single(rows: list[dict], summary: dict, measure: str, rho: str, out: Path) -> list[Path]:
    """One measure, 3.3 in wide."""
    with plt.rc_context(FONTS):
        fig, ax = plt.subplots(figsize=(3.3, 2.6), layout="constrained")
        points = scatter_panel(ax, rows, measure, rho, summary["per_rho"][rho]["kendall_tau"][measure],
                               summary["paper"])
        ax.set_ylabel("test loss ‖u⊙v − β*‖²")
        fig.colorbar(points, ax=ax, label="init scale α")
        return _save(fig, [out / f"diag_{measure}.{ext}" for ext in ("png", "pdf")])


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description="Scatter plots of the diagonal-network study")
    parser.add_argument("dir", type=Path, help="study output folder")
    parser.add_argument("--out", type=Path, help="figure folder (default: DIR)")
    parser.add_argument("--rho", help="radius to plot (default: the headline ρ)")
    args = parser.parse_args(argv)
    summary, rows = load(args.dir)
    rho = args.rho or str(summary["headline_rho"])
    if rho not in summary["per_rho"]:
        parser.error(f"rho {rho} not measured; available: {list(summary['per_rho'])}")
    out = args.out or args.dir
    out.mkdir(parents=True, exist_ok=True)
    paths = overview(rows, summary, rho, out)
    for measure in summary["per_rho"][rho]["kendall_tau"]:
        paths += single(rows, summary, measure, rho, out)
    print("\n".join(str(p) for p in paths))
    return paths


if __name__ == "__main__":
    main()
