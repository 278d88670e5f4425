"""Spectral density of the plain Hessian next to the quotient Hessian of a small TinyViT on digits.

    python paper_figs/spectrum.py [--checkpoint CKPT] [--out DIR] [--metric mix|inv] [--quick]

Trains the TinyViT (AdamW, a few epochs on CPU) unless ``--checkpoint`` exists (a missing one is
written after training), then runs SLQ (spec §5: m Lanczos steps, P probes, Gaussian kernel of
variance 1e-5·max(1, range), log y-axis with a 1e-7 floor) on a fixed training subset in eval
mode for both operators, and writes ``DIR/spectrum.{png,pdf}`` (default ``paper_figs/out``).
The quotient Hessian's density is over the n_h = n − dim V horizontal directions (no vertical
spike at 0); its eigenvalues carry the metric's units (the mixed metric scales like |w|⁴), so
each panel has its own x-axis.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from quotientsharp.curvature import QuotientHessianOperator, slq  # noqa: E402
from quotientsharp.data import load_digits_dataset  # noqa: E402
from quotientsharp.models import TinyViT  # noqa: E402
from quotientsharp.train import evaluate, train_classifier  # noqa: E402

FULL = dict(model=dict(d_model=32, depth=1, n_heads=4, mlp_dim=64), epochs=30, n_hessian=256, m=80, probes=3)
QUICK = dict(model=dict(d_model=16, depth=1, n_heads=2, mlp_dim=32), epochs=3, n_hessian=64, m=30, probes=1)


def trained_model(data, cfg: dict, checkpoint: str | None, seed: int) -> TinyViT:
    """The TinyViT of ``cfg``, loaded from ``checkpoint`` if it exists, else trained (and saved)."""
    torch.manual_seed(seed)
    model = TinyViT(**cfg["model"])
    if checkpoint and Path(checkpoint).exists():
        model.load_state_dict(torch.load(checkpoint)["state_dict"])
        return model
    train_classifier(model, data.train, epochs=cfg["epochs"], batch_size=64, lr=3e-3, weight_decay=1e-4,
                     seed=seed, progress=False)
    if checkpoint:
        Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": cfg["model"], "state_dict": model.state_dict()}, checkpoint)
    return model


def hessian_subset(data, n: int, seed: int, batch_size: int = 256) -> list:
    """A fixed, non-augmented subset of ``n`` training samples as a list of batches."""
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:n]
    x, y = data.train.tensors[0][idx], data.train.tensors[1][idx]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "figure.titlesize": 8}
DOUBLE_COLUMN = 6.8  # inches: readable at the paper's double-column width, every font >= 7 pt
FLOOR = 1e-7


def plot(densities: list, titles: list[str], xlabels: list[str] | None = None):
    """Side-by-side log-scale density panels (double column): labels on the decades only, every
    other decade when the axis spans more than six; no labels on minor ticks."""
    xlabels = xlabels or ["eigenvalue"] * len(densities)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(densities), figsize=(DOUBLE_COLUMN, 2.6), squeeze=False)
        for ax, d, title, xlabel in zip(axes[0], densities, titles, xlabels):
            ax.semilogy(d.grid.numpy(), d.density.clamp_min(FLOOR).numpy(), lw=0.8)
            ax.set_ylim(FLOOR, None)
            top = float(d.density.max())
            step = 2 if top / FLOOR > 1e6 else 1
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10 ** step, numticks=12))
            ax.yaxis.set_minor_locator(ticker.LogLocator(base=10, subs=(1.0,), numticks=20) if step > 1
                                       else ticker.LogLocator(base=10, subs=tuple(range(2, 10)), numticks=20))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.xaxis.set_major_locator(ticker.MaxNLocator(6))
            ax.set_xlabel(xlabel)
            ax.set_title(title)
        axes[0][0].set_ylabel("spectral density (SLQ)")
        fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="TinyViT checkpoint to load (trained and written if missing)")
    parser.add_argument("--out", default="paper_figs/out", help="figure folder")
    parser.add_argument("--metric", default="mix", choices=["mix", "inv"], help="metric on the GL blocks")
    parser.add_argument("--quick", action="store_true", help="tiny model and SLQ run (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    torch.set_num_threads(1)

    data = load_digits_dataset()
    model = trained_model(data, cfg, args.checkpoint, args.seed)
    test = evaluate(model, data.test)
    loader = hessian_subset(data, cfg["n_hessian"], args.seed)
    op = QuotientHessianOperator(model, loader, F.cross_entropy, metric=args.metric)
    plain = slq(op.hessian, cfg["m"], cfg["probes"], seed=args.seed, progress=False)
    quotient = op.slq(cfg["m"], cfg["probes"], seed=args.seed, progress=False)
    titles = [
        f"Hessian H\nn = {op.n}, Tr ≈ {plain.trace().value:.3g}",
        f"quotient Hessian ({args.metric} metric, adaptive rest)\n"
        f"n_h = n − dim V = {op.n_horizontal}, Tr ≈ {quotient.trace().value:.3g}",
    ]
    xlabels = ["eigenvalue of H", f"eigenvalue of the quotient Hessian ({args.metric}-metric units)"]
    fig = plot([plain.density(), quotient.density()], titles, xlabels)
    with plt.rc_context(STYLE):
        fig.suptitle(f"TinyViT on digits (test acc {test['acc']:.3f}); SLQ m = {cfg['m']}, P = {cfg['probes']}, "
                     f"{cfg['n_hessian']} training samples")
        fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"spectrum.{ext}" for ext in ("png", "pdf")]
    for path in written:
        fig.savefig(path, dpi=200)
    plt.close(fig)
    print("\n".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
