"""Scatter plots of the transformer studies: every measure against both generalization gaps.

    python paper_figs/transformer_studies.py results/vit [--out FIGDIR]
    python paper_figs/transformer_studies.py benchmarks/results/vit_study_summary.json --out paper_figs/out/vit_study

Reads a study's ``summary.json`` (its folder or the file itself) and writes
``FIGDIR/<measure>.{png,pdf}`` (default ``DIR/figs``): one double-column figure (6.8 in) per
measure, a panel per gap, Kendall τ-a [95% CI] (and the paper's τ where there is one) in each
title, points coloured by optimizer, models that never learned as black crosses; and
``FIGDIR/tau_overview.{png,pdf}`` (single column, 3.3 in): τ-a with its 95% interval for every
measure against each gap, the papers' τ as open diamonds; with per-layer Rényi values,
``FIGDIR/layer_renyi.{png,pdf}`` (τ of every layer and α, and the held-out choice) instead of a
scatter per layer. Axis labels name each measure with its
radius ρ from the summary's plan; every font is ≥ 7 pt at print size.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from quotientsharp.curvature.layerwise import parse_value_name, value_name  # noqa: E402

SINGLE_COLUMN, DOUBLE_COLUMN = 3.3, 6.8  # inches
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 7, "figure.titlesize": 8}
NOT_LEARNED = dict(marker="x", color="black", s=22, linewidths=1.0, zorder=3)
ANCHOR_MARKERS = ["D", "s", "^"]

SHARPNESS = {"geodesic_inv": ("geodesic sharpness, inverse metric", "geodesic inv"),
             "geodesic_mix": ("geodesic sharpness, mixed metric", "geodesic mix"),
             "geodesic_mix_rel": ("geodesic sharpness, mixed metric, relative ball", "geodesic mix rel"),
             "adaptive": ("adaptive sharpness", "adaptive"),
             "euclidean": ("Euclidean sharpness", "Euclidean")}
CURVATURE = {"hessian_max_eigenvalue": ("largest Hessian eigenvalue λmax(H)", "λmax(H)"),
             "hessian_trace": ("Hessian trace Tr H", "Tr H")}


def measure_label(name: str, plan: dict, short: bool = False) -> str:
    """Human-readable label of a study measure; sharpness measures carry their radius ρ from the
    study's ``plan`` (``rho`` worst case, ``rho_average`` average case)."""
    base, average = (name[:-4], True) if name.endswith("_avg") else (name, False)
    if base in SHARPNESS or base.split("_")[0] in ("geodesic", "adaptive", "euclidean"):
        long_, brief = SHARPNESS.get(base, (base.replace("_", " "), base.replace("_", " ")))
        rho = plan.get("rho_average" if average else "rho")
        rho_text = f"ρ = {rho:g}" if rho is not None else "ρ unknown"
        if short:
            return f"{brief}{', avg' if average else ''} ({rho_text})"
        return f"{long_}\n({'average' if average else 'worst'} case, {rho_text})"
    if name in CURVATURE:
        return CURVATURE[name][1 if short else 0]
    renyi = re.fullmatch(r"(quotient_)?renyi_([0-9.]+)", name)
    if renyi:
        if short:
            return f"{'quotient ' if renyi.group(1) else ''}Rényi α = {renyi.group(2)}"
        what = "quotient-Hessian Rényi" if renyi.group(1) else "Rényi"
        return f"{what} sharpness $-H_\\alpha$, α = {renyi.group(2)}"
    return name.replace("_", " ")


def group_of(row: dict) -> str:
    """The colour group of a model: its optimizer (from-scratch populations) or ``fine-tunes``."""
    return row.get("optimizer", "fine-tunes")


def whole_network_names(summary: dict) -> list[str]:
    """The measures of the summary but the per-layer Rényi values (drawn apart, :func:`plot_layer_renyi`)."""
    return [n for n in summary["kendall_tau"]["error_gap"] if parse_value_name(n) is None]


def plot_layer_renyi(summary: dict):
    """Per-layer Rényi sharpness: τ-a [95% CI] of each weight tensor's value (rows) for each α
    against each gap (panels); the layer and α chosen on half of the models, with its τ on the
    other half, in each panel's title."""
    parsed = [parse_value_name(n) for n in summary["kendall_tau"]["error_gap"]]
    alphas = list(dict.fromkeys(p[0] for p in parsed if p))
    layers = list(dict.fromkeys(p[1] for p in parsed if p))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(summary["gaps"]), figsize=(DOUBLE_COLUMN, 0.16 * len(layers) + 1.6),
                                 squeeze=False, sharey=True)
        for ax, (gap, label) in zip(axes[0], summary["gaps"].items()):
            for k, alpha in enumerate(alphas):
                ys, taus, lo, hi = [], [], [], []
                for i, layer in enumerate(layers):
                    name = value_name(alpha, layer)
                    tau, ci = summary["kendall_tau"][gap].get(name), summary["ci95"][gap].get(name)
                    if tau is not None:
                        ys.append(i + 0.25 * (k - (len(alphas) - 1) / 2))
                        taus.append(tau)
                        lo.append(tau - ci[0])
                        hi.append(ci[1] - tau)
                ax.errorbar(taus, ys, xerr=[lo, hi], fmt="o", ms=3, capsize=1.5, lw=0.8, label=f"α = {alpha}")
            ax.axvline(0, color="0.6", lw=0.6)
            ax.set_xlim(-1, 1)
            ax.set_xlabel(f"Kendall τ-a with {label}")
            chosen = summary.get("layer_renyi_selection", {}).get(gap)
            if chosen:
                c = chosen["choice"]
                ax.set_title(f"chosen on half: {c['layer']}, α = {c['alpha']}\nτ on the other half "
                             f"{chosen['tau_evaluation']:+.2f} [{chosen['ci95_evaluation'][0]:+.2f}, "
                             f"{chosen['ci95_evaluation'][1]:+.2f}]".replace("-", "−"))
        axes[0][0].set_yticks(range(len(layers)), layers)
        axes[0][0].invert_yaxis()
        axes[0][0].legend(loc="lower left", frameon=False)
        fig.suptitle(f"per-layer Rényi sharpness, {summary['task']} study on {summary['dataset']} "
                     f"({summary['n_models']} models)")
        fig.tight_layout()
    return fig


def not_learned(summary: dict) -> set[str]:
    """Ids of the models that never learned (training accuracy within a point of the majority rate)."""
    return set(summary.get("learned", {}).get("excluded", []))


def paper_taus(summary: dict, name: str) -> dict[str, float]:
    """``{source: τ}`` published for this measure (spec anchors in the summary)."""
    return {src: taus[name] for src, taus in summary.get("paper", {}).items() if name in taus}


def _log_axis(ax, values: list[float]) -> None:
    """Log y axis with labels on major ticks only (1, 2, 5 per decade when it spans < 2 decades)."""
    ax.set_yscale("log")
    decades = max(values) / min(values)
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0,) if decades >= 100 else (1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def plot_measure(summary: dict, name: str):
    """One figure: ``name`` against each gap, coloured by optimizer, never-learned models marked."""
    plan = summary.get("config", {}).get("plan", {})
    rows = [r for r in summary["models"] if r["values"].get(name) is not None]
    failed = not_learned(summary)
    optimizers = sorted({group_of(r) for r in rows})
    colours = dict(zip(optimizers, plt.get_cmap("tab10").colors))
    anchors = paper_taus(summary, name)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(summary["gaps"]), figsize=(DOUBLE_COLUMN, 3.0), squeeze=False, sharey=True)
        for ax, (gap, label) in zip(axes[0], summary["gaps"].items()):
            for opt in optimizers:
                pts = [r for r in rows if group_of(r) == opt and r["id"] not in failed]
                ax.scatter([r[gap] for r in pts], [r["values"][name] for r in pts], s=12, label=opt,
                           color=colours[opt], linewidths=0)
            dead = [r for r in rows if r["id"] in failed]
            ax.scatter([r[gap] for r in dead], [r["values"][name] for r in dead],
                       label="never learned (train acc ≤ majority rate + 1 pt)", **NOT_LEARNED)
            tau, ci = summary["kendall_tau"][gap].get(name), summary["ci95"][gap].get(name)
            title = f"τ = {tau:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if tau is not None else "τ undefined"
            if anchors:
                title += "\npaper: " + ", ".join(f"{t:+.2f} ({src.split(' (')[0]})" for src, t in anchors.items())
            ax.set_title(title.replace("-", "−"))
            values = [r["values"][name] for r in rows]
            if values and min(values) > 0 and max(values) > 20 * min(values):  # spans decades: log axis
                _log_axis(ax, values)
            else:
                ax.yaxis.set_major_locator(ticker.MaxNLocator(5))
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
            ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
            ax.set_xlabel(label)
        axes[0][0].set_ylabel(measure_label(name, plan))
        handles, labels = axes[0][0].get_legend_handles_labels()
        keep = [(h, lab) for h, lab in zip(handles, labels) if not (lab.startswith("never") and not failed)]
        fig.legend(*zip(*keep), loc="lower center", ncol=min(len(keep), 5), frameon=False,
                   bbox_to_anchor=(0.5, 0.0), handletextpad=0.2, columnspacing=1.0)
        fig.suptitle(f"{summary['task']} study on {summary['dataset']} ({summary['n_models']} models)")
        n_rows_legend = -(-len(keep) // 5)
        fig.tight_layout(rect=(0, 0.07 * n_rows_legend, 1, 1))
    return fig


def plot_overview(summary: dict):
    """τ-a [95% CI] of every measure (rows) against each gap, with the papers' τ where published."""
    plan = summary.get("config", {}).get("plan", {})
    names = whole_network_names(summary)
    failed = not_learned(summary)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(SINGLE_COLUMN, 0.2 * len(names) + 1.5))
        n_gaps = len(summary["gaps"])
        for k, (gap, label) in enumerate(summary["gaps"].items()):
            ys = [i + 0.22 * (k - (n_gaps - 1) / 2) for i in range(len(names))]
            taus = [summary["kendall_tau"][gap][n] for n in names]
            cis = [summary["ci95"][gap][n] or [t, t] for n, t in zip(names, taus)]
            ax.errorbar(taus, ys, xerr=[[t - c[0] for t, c in zip(taus, cis)], [c[1] - t for t, c in zip(taus, cis)]],
                        fmt="o", ms=3, capsize=1.5, lw=0.8, label=f"vs {label}")
        for marker, (src, published) in zip(ANCHOR_MARKERS, summary.get("paper", {}).items()):
            pts = [(t, names.index(n)) for n, t in published.items() if n in names]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=18, facecolors="none", edgecolors="black", lw=0.8,
                           zorder=3, label=f"paper: {src}")
        ax.axvline(0, color="0.6", lw=0.6)
        ax.set_yticks(range(len(names)), [measure_label(n, plan, short=True) for n in names])
        ax.invert_yaxis()
        ax.set_xlim(-1, 1)
        ax.xaxis.set_major_locator(ticker.MultipleLocator(0.5))
        ax.xaxis.set_minor_locator(ticker.MultipleLocator(0.25))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: "0" if v == 0 else f"{v:+.1f}".replace("-", "−")))
        ax.set_xlabel("Kendall τ-a with the generalization gap\n[95% bootstrap CI]")
        note = f"; {len(failed)} never learned (included)" if failed else ""
        ax.set_title(f"{summary['task']} study on {summary['dataset']}\n({summary['n_models']} models{note})")
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("paper"))  # data first
        ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper center",
                  bbox_to_anchor=(0.35, -0.3), ncol=1, frameon=False)
        fig.tight_layout()
    return fig


def load_summary(path: str | Path) -> dict:
    """A study summary from its output folder (``summary.json`` inside) or from the JSON file."""
    path = Path(path)
    return json.loads((path / "summary.json" if path.is_dir() else path).read_text())


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="output folder of experiments/vit_study.py or text_study.py, or a summary JSON")
    parser.add_argument("--out", help="figure folder (default DIR/figs)")
    args = parser.parse_args(argv)
    summary = load_summary(args.dir)
    out = Path(args.out or Path(args.dir) / "figs")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    figures = {name: lambda name=name: plot_measure(summary, name) for name in whole_network_names(summary)}
    figures["tau_overview"] = lambda: plot_overview(summary)
    if len(whole_network_names(summary)) < len(summary["kendall_tau"]["error_gap"]):
        figures["layer_renyi"] = lambda: plot_layer_renyi(summary)
    for name, make in figures.items():
        fig = make()
        for ext in ("png", "pdf"):
            fig.savefig(out / f"{name}.{ext}", dpi=200, bbox_inches="tight")
            written.append(out / f"{name}.{ext}")
        plt.close(fig)
    print(f"{len(written)} files in {out}")
    return written


if __name__ == "__main__":
    main()
