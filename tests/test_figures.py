"""The figure scripts run on a tiny synthetic study and produce figures readable at paper size:
labels name the measure with its ρ, never-learned models are marked, the paper's τ is shown,
legends sit outside the data, tick labels do not collide, minor log ticks carry no labels, and
every font is at least 7 pt."""
from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from quotientsharp.studies.transformers import summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"paper_figs_{name}", ROOT / "paper_figs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figs = load_script("transformer_studies")
spectrum = load_script("spectrum")

N_MODELS, CHANCE = 10, 0.4
NEVER_LEARNED = {"text001", "text006"}


def synthetic_summary() -> dict:
    """A text study of 10 models through the real ``summarize``: two never learned (training
    accuracy at the majority rate), geodesic sharpness spanning three decades (log axis)."""
    rng = np.random.default_rng(0)
    optimizers = ["adamw", "sgd", "sam"]
    models = [{"id": f"text{i:03d}", "index": i, "optimizer": optimizers[i % 3], "lr": 1e-3} for i in range(N_MODELS)]
    trained, measured = {}, {}
    for hp in models:
        dead = hp["id"] in NEVER_LEARNED
        train_acc = CHANCE if dead else 0.9 - 0.02 * hp["index"]
        test_acc = train_acc - (0.0 if dead else 0.01 * rng.uniform(1, 5))
        trained[hp["id"]] = {"train_loss": 0.3, "train_acc": train_acc, "test_loss": 0.5 + rng.uniform(0, 0.3),
                             "test_acc": test_acc, "error_gap": train_acc - test_acc,
                             "loss_gap": rng.uniform(0, 0.3), "history": {"wall_time": 1.0}}
        gap = trained[hp["id"]]["error_gap"]
        measured[f"{hp['id']}/geodesic_inv"] = {"values": {"geodesic_inv": 10 ** (-3 + 60 * gap + rng.uniform(0, 1))},
                                                "seconds": 1.0}
        measured[f"{hp['id']}/adaptive_avg"] = {"values": {"adaptive_avg": 0.1 + gap + rng.uniform(0, 0.01)},
                                                "seconds": 1.0}
        measured[f"{hp['id']}/hessian_slq"] = {"values": {"hessian_trace": rng.uniform(5, 9),
                                                          "renyi_0.5": -10 - rng.uniform(0, 1)}, "seconds": 1.0}
    config = {"task": "text", "data": {"name": "tweets"}, "models": models, "n_boot": 50, "seed": 0,
              "plan": {"rho": 0.1, "rho_average": 0.01, "alphas": [0.5],
                       "measures": ["geodesic_inv", "adaptive_avg", "hessian_slq"]}}
    return summarize(config, trained, measured, chance_acc=CHANCE)


@pytest.fixture(scope="module")
def summary() -> dict:
    s = synthetic_summary()
    assert set(s["learned"]["excluded"]) == NEVER_LEARNED
    return s


def all_texts(fig) -> list:
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]


def overlaps(boxes) -> list:
    return [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


def test_measure_labels_carry_rho():
    plan = {"rho": 0.1, "rho_average": 0.02}
    assert "ρ = 0.1" in figs.measure_label("geodesic_mix", plan) and "worst case" in figs.measure_label("geodesic_mix", plan)
    assert "ρ = 0.02" in figs.measure_label("adaptive_avg", plan) and "average case" in figs.measure_label("adaptive_avg", plan)
    assert "ρ = 0.1" in figs.measure_label("geodesic_mix_rel", plan, short=True)  # a measure added later
    assert "ρ" not in figs.measure_label("hessian_trace", plan) and "α = 1.5" in figs.measure_label("renyi_1.5", plan)
    assert "_" not in figs.measure_label("quotient_renyi_0.5", plan, short=True)


def test_scatter_marks_never_learned_and_paper_tau(summary):
    fig = figs.plot_measure(summary, "geodesic_inv")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    assert len(axes) == 2
    assert "ρ = 0.1" in axes[0].get_ylabel() and "geodesic sharpness, inverse metric" in axes[0].get_ylabel()
    for ax in axes:
        crosses = [c for c in ax.collections if c.get_label().startswith("never learned")]
        assert len(crosses) == 1 and len(crosses[0].get_offsets()) == len(NEVER_LEARNED)
        assert "paper: +0.28 (MNLI BERT)" in ax.get_title()  # the paper's τ for this measure
        assert ax.get_yscale() == "log"
        assert all(t.get_text() == "" for t in ax.yaxis.get_minorticklabels())
        assert not overlaps([t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()])
    assert len([t for t in axes[0].yaxis.get_majorticklabels() if t.get_text()]) >= 2  # shared y axis
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert any(lab.startswith("never learned") for lab in labels) and {"adamw", "sgd", "sam"} <= set(labels)
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in axes)  # outside the data
    assert fig.get_figwidth() <= figs.DOUBLE_COLUMN
    assert min(t.get_fontsize() for t in all_texts(fig)) >= 7
    plt.close(fig)


def test_tau_overview_readable(summary):
    fig = figs.plot_overview(summary)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    xlabels = [t for t in ax.get_xticklabels() if t.get_text()]
    assert len(xlabels) >= 3 and not overlaps([t.get_window_extent(renderer) for t in xlabels])
    ylabels = [t.get_text() for t in ax.get_yticklabels()]
    assert not overlaps([t.get_window_extent(renderer) for t in ax.get_yticklabels()])
    assert "geodesic inv (ρ = 0.1)" in ylabels and "adaptive, avg (ρ = 0.01)" in ylabels
    paper = [c for c in ax.collections if c.get_label() == "paper: MNLI BERT"]
    assert len(paper) == 1 and len(paper[0].get_offsets()) == 1  # geodesic_inv's +0.28 (adaptive_avg has none)
    assert "2 never learned" in ax.get_title()
    legend_box = ax.get_legend().get_window_extent(renderer)
    assert not legend_box.overlaps(ax.get_window_extent(renderer))
    assert fig.get_figwidth() <= figs.SINGLE_COLUMN
    assert min(t.get_fontsize() for t in all_texts(fig)) >= 7
    plt.close(fig)


def test_transformer_script_writes_png_and_pdf(summary, tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "summary.json").write_text(json.dumps(summary))
    written = figs.main([str(study), "--out", str(tmp_path / "figs")])
    names = {"geodesic_inv", "adaptive_avg", "hessian_trace", "renyi_0.5", "tau_overview"}
    assert {p.name for p in written} == {f"{n}.{ext}" for n in names for ext in ("png", "pdf")}
    for path in written:
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else head.startswith(b"%PDF")
    assert figs.load_summary(study / "summary.json") == figs.load_summary(study)  # the JSON file itself


def finetune_summary() -> dict:
    """A fine-tune population (no optimizer per model) with per-layer Rényi values of 3 layers at
    2 α, through the real ``summarize`` (which adds the held-out layer selection)."""
    rng = np.random.default_rng(1)
    models = [{"id": f"ft{i:03d}", "index": i, "lr": 1e-4} for i in range(12)]
    layers = ["blocks.0.attn.q.weight", "blocks.0.mlp.fc1.weight", "head.weight"]
    trained, measured = {}, {}
    for hp in models:
        gap = rng.uniform(0, 0.05)
        trained[hp["id"]] = {"train_loss": 0.1, "train_acc": 0.95, "test_loss": 0.2, "test_acc": 0.95 - gap,
                             "error_gap": gap, "loss_gap": gap + rng.uniform(0, 0.01), "history": {"wall_time": 1.0}}
        measured[f"{hp['id']}/adaptive"] = {"values": {"adaptive": gap + rng.uniform(0, 0.02)}, "seconds": 1.0}
        measured[f"{hp['id']}/layer_renyi"] = {"values": {f"layer_renyi_{a}@{layer}": -rng.uniform(5, 10)
                                                          for a in ("0.5", "1.5") for layer in layers}, "seconds": 1.0}
    config = {"task": "vit", "data": {"name": "mnist5k"}, "models": models, "n_boot": 50, "seed": 0,
              "plan": {"rho": 0.1, "alphas": [0.5, 1.5], "measures": ["adaptive", "layer_renyi"]}}
    return summarize(config, trained, measured, chance_acc=0.1), layers


def test_per_layer_renyi_is_one_figure_not_one_scatter_per_layer(tmp_path):
    summary, layers = finetune_summary()
    written = figs.main([str(_write(summary, tmp_path)), "--out", str(tmp_path / "figs")])
    assert {p.name for p in written} == {f"{n}.{ext}" for n in ("adaptive", "tau_overview", "layer_renyi")
                                         for ext in ("png", "pdf")}
    fig = figs.plot_layer_renyi(summary)
    left, right = fig.axes
    assert [t.get_text() for t in left.get_yticklabels()] == layers
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["α = 0.5", "α = 1.5"]
    chosen = summary["layer_renyi_selection"]["error_gap"]
    assert chosen["choice"]["layer"] in left.get_title() and f"{abs(chosen['tau_evaluation']):.2f}" in left.get_title()
    for ax, gap in ((left, "error_gap"), (right, "loss_gap")):  # every drawn point is a τ of the summary
        drawn = sorted(x for bars in ax.containers for x in bars.lines[0].get_xdata())
        expected = sorted(t for n, t in summary["kendall_tau"][gap].items() if n.startswith("layer_renyi_"))
        assert drawn == pytest.approx(expected)
    assert min(t.get_fontsize() for t in all_texts(fig)) >= 7 and fig.get_figwidth() <= figs.DOUBLE_COLUMN
    overview = figs.plot_overview(summary)
    assert [t.get_text() for t in overview.axes[0].get_yticklabels()] == ["adaptive (ρ = 0.1)"]
    scatter = figs.plot_measure(summary, "adaptive")
    assert [t.get_text() for t in scatter.legends[0].get_texts()] == ["fine-tunes"]
    for f in (fig, overview, scatter):
        plt.close(f)


def _write(summary: dict, tmp_path: Path) -> Path:
    study = tmp_path / "study"
    study.mkdir()
    (study / "summary.json").write_text(json.dumps(summary))
    return study


def test_spectrum_plot_readable():
    from quotientsharp.curvature import SpectralDensity

    grid = torch.linspace(-2, 40, 2000, dtype=torch.float64)
    density = torch.exp(-grid**2 / 0.01) + 1e-3 * torch.exp(-(grid - 35) ** 2 / 0.01)
    d = SpectralDensity(grid, density / density.sum() / (grid[1] - grid[0]), 1e-5, 1.0, {})
    fig = spectrum.plot([d, d], ["Hessian H", "quotient Hessian"], ["eigenvalue of H", "eigenvalue (metric units)"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        assert all(t.get_text() == "" for t in ax.yaxis.get_minorticklabels())
        shown = [t for t in ax.yaxis.get_majorticklabels() if t.get_text()]
        assert 2 <= len(shown) <= 6  # every other decade over the 1e-7 floor's span
        for axis_labels in (ax.get_xticklabels(), shown):
            assert not overlaps([t.get_window_extent(renderer) for t in axis_labels if t.get_text()])
    assert fig.axes[1].get_xlabel() == "eigenvalue (metric units)"
    assert fig.get_figwidth() <= spectrum.DOUBLE_COLUMN
    assert min(t.get_fontsize() for t in all_texts(fig)) >= 7
    plt.close(fig)


def test_spectrum_script_writes_png_and_pdf(tmp_path):
    written = spectrum.main(["--quick", "--out", str(tmp_path)])
    assert sorted(p.name for p in written) == ["spectrum.pdf", "spectrum.png"]
    assert all(p.stat().st_size > 1000 for p in written)
