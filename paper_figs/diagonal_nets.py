"""Scatter plots of the diagonal-network study: sharpness vs test loss, one panel file per measure.

    python paper_figs/diagonal_nets.py results/diag [--out FIGDIR] [--rho 0.1]

Reads ``DIR/summary.json`` and ``DIR/models.csv`` (from ``experiments/diagonal_nets.py``) and
writes ``diag_<measure>.png`` and ``.pdf`` at the chosen radius (default: the headline ρ).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(study_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((study_dir / "summary.json").read_text())
    with (study_dir / "models.csv").open() as f:
        rows = list(csv.DictReader(f))
    return summary, rows


def scatter(rows: list[dict], measure: str, rho: str, tau: float, out: Path) -> list[Path]:
    """Sharpness (x) vs test loss (y), coloured by log10 α; log axes when all values are positive."""
    x = [float(r[f"{measure}@{rho}"]) for r in rows]
    y = [float(r["test_loss"]) for r in rows]
    alpha = [float(r["alpha"]) for r in rows]
    fig, ax = plt.subplots(figsize=(4, 3.2))
    points = ax.scatter(x, y, c=alpha, cmap="viridis", norm=matplotlib.colors.LogNorm(), s=22)
    fig.colorbar(points, ax=ax, label="init scale α")
    if min(x) > 0:
        ax.set_xscale("log")
    if min(y) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(f"{measure} sharpness (ρ = {rho})")
    ax.set_ylabel("test loss ‖u⊙v − β*‖²")
    ax.set_title(f"{measure}: τ = {tau:+.2f}")
    fig.tight_layout()
    paths = [out / f"diag_{measure}.{ext}" for ext in ("png", "pdf")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


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
    paths = []
    for measure, tau in summary["per_rho"][rho]["kendall_tau"].items():
        paths += scatter(rows, measure, rho, tau, out)
    print("\n".join(str(p) for p in paths))
    return paths


if __name__ == "__main__":
    main()
