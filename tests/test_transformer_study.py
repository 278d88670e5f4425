"""The transformer-study pipeline end to end on 3 tiny ViTs and sklearn digits."""
import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from study_cases import TINY_ARCH, tiny_vit_config
from torch.utils.data import TensorDataset

from quotientsharp.data import ClassificationData, DatasetUnavailableError
from quotientsharp.studies import transformer_run, transformer_training
from quotientsharp.studies import transformers as study
from quotientsharp.train import evaluate

pytest.importorskip("sklearn")

def tiny_config():
    return tiny_vit_config(3, slq_m=4, slq_probes=2)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit_study")
    config = tiny_config()
    return out, config, study.run_study(out, config, progress=False)


def test_population_is_deterministic_and_varied():
    first, again = study.population("vit", 6, seed=3), study.population("vit", 6, seed=3)
    assert first == again
    assert study.population("vit", 4, seed=3) == first[:4]  # a larger population extends a smaller one
    assert study.population("vit", 6, seed=4) != first
    many = study.population("text", 24, seed=0)
    for key in ("lr", "weight_decay", "batch_size", "epochs", "optimizer", "augment", "dropout"):
        assert len({str(m[key]) for m in many}) > 1, key


def test_every_population_optimizer_trains():
    data = study.load_data({"name": "digits"})
    x, y = data.train.tensors
    small = ClassificationData(TensorDataset(x[:64], y[:64]), TensorDataset(x[64:96], y[64:96]), 10)
    hp = study.population("vit", 1)[0] | {"epochs": 2, "batch_size": 32}  # SAF/MESA act from epoch 2
    for optimizer in sorted(set(study.OPTIMIZERS)):
        _, record = study.train_model("vit", TINY_ARCH, small, hp | {"optimizer": optimizer})
        assert record["history"]["steps"] == 4 and math.isfinite(record["train_loss"]), optimizer


def test_outputs_exist(finished):
    out, config, summary = finished
    ids = [m["id"] for m in config["models"]]
    for i in ids:
        assert (out / "models" / f"{i}.pt").exists()
        record = json.loads((out / "models" / f"{i}.json").read_text())["result"]
        assert record["error_gap"] == pytest.approx((1 - record["test_acc"]) - (1 - record["train_acc"]))
        for name in config["plan"]["measures"]:
            unit = json.loads((out / "measures" / i / f"{name}.json").read_text())
            assert unit["config"]["measure"] == name and unit["result"]["values"]
    assert {"kendall_tau", "ci95", "models", "paper", "gaps", "n_models", "seconds"} <= set(summary)
    assert summary["n_models"] == 3
    expected = {"geodesic_inv", "geodesic_mix", "geodesic_inv_avg", "geodesic_mix_avg", "adaptive",
                "euclidean", "hessian_max_eigenvalue", "hessian_trace", "renyi_0.5", "renyi_1.5"}
    for gap in ("error_gap", "loss_gap"):
        assert expected <= set(summary["kendall_tau"][gap])
    # τ-a recomputed from the per-model files on disk: 2/(M(M−1)) Σ_{i<j} sign(Δ measure) sign(Δ gap)
    values = {i: {} for i in ids}
    gaps = {i: json.loads((out / "models" / f"{i}.json").read_text())["result"] for i in ids}
    for i in ids:
        for name in config["plan"]["measures"]:
            values[i].update(json.loads((out / "measures" / i / f"{name}.json").read_text())["result"]["values"])
    checked = 0
    for gap in ("error_gap", "loss_gap"):
        for name in expected:
            s = [values[i][name] for i in ids]
            if not all(v is not None and math.isfinite(v) for v in s):
                continue
            g = [gaps[i][gap] for i in ids]
            pairs = [(a, b) for a in range(len(ids)) for b in range(a + 1, len(ids))]
            tau_a = sum(math.copysign(1, s[a] - s[b]) * math.copysign(1, g[a] - g[b]) * (s[a] != s[b]) * (g[a] != g[b])
                        for a, b in pairs) / len(pairs)
            assert summary["kendall_tau"][gap][name] == pytest.approx(tau_a, abs=1e-12), (gap, name)
            checked += 1
    assert checked == 2 * len(expected)
    assert json.loads((out / "summary.json").read_text())["n_models"] == 3
    with open(out / "models.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ids and "geodesic_mix" in rows[0]
    assert (out / "tau_table.md").read_text() == study.tau_table(summary) + "\n"
    assert "geodesic_inv" in study.tau_table(summary) and summary["errors"] == {}


def test_resume_skips_finished_work(finished, monkeypatch):
    out, config, _ = finished
    units = sorted(out.glob("models/*")) + sorted(out.glob("measures/*/*.json"))
    mtimes = {p: p.stat().st_mtime_ns for p in units}

    def refuse(*args, **kwargs):
        raise AssertionError("finished work was redone")
    monkeypatch.setattr(transformer_training, "train_model", refuse)
    monkeypatch.setattr(transformer_run, "measure_unit", refuse)
    study.run_study(out, config, progress=False)
    assert {p: p.stat().st_mtime_ns for p in units} == mtimes

    # a lost measurement (killed in flight) is recomputed alone
    lost = out / "measures" / config["models"][1]["id"] / "adaptive.json"
    lost.unlink()
    calls = []
    monkeypatch.undo()
    real = study.measure_unit
    monkeypatch.setattr(transformer_training, "train_model", refuse)
    monkeypatch.setattr(transformer_run, "measure_unit", lambda name, *a: calls.append(name) or real(name, *a))
    study.run_study(out, config, progress=False)
    assert calls == ["adaptive"] and lost.exists()


def test_state_dict_reloads_to_identical_predictions(finished):
    out, config, _ = finished
    data = study.load_data(config["data"])
    hp = config["models"][0]
    record = json.loads((out / "models" / f"{hp['id']}.json").read_text())["result"]
    first = study.load_trained("vit", config["arch"], data, hp, out / "models" / f"{hp['id']}.pt")
    saved = torch.load(out / "models" / f"{hp['id']}.pt", weights_only=True)
    assert saved.keys() == first.state_dict().keys()
    assert all(torch.equal(first.state_dict()[k], v) for k, v in saved.items())
    # the reloaded model reproduces the metrics recorded right after training
    metrics = evaluate(first, data.test)
    assert metrics["acc"] == record["test_acc"]
    assert metrics["loss"] == pytest.approx(record["test_loss"], rel=1e-6)


def test_missing_dataset_is_reported_cleanly(tmp_path, monkeypatch):
    def missing(spec):
        raise DatasetUnavailableError("Fashion-MNIST", "missing file", "apt-get install -y dataset-fashion-mnist")
    monkeypatch.setattr(transformer_training, "load_data", missing)
    spec = importlib.util.spec_from_file_location("study_cli", Path(__file__).parent.parent / "experiments" / "study_cli.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as exit_info:
        cli.main("vit", ["--out", str(tmp_path), "--no-progress"])
    assert "apt-get install -y dataset-fashion-mnist" in str(exit_info.value.code)
    assert "--dataset digits" in str(exit_info.value.code)


def test_summary_tau_b_matches_scipy(finished):
    """τ-b is scipy's; τ-a equals it wherever neither the measure nor the gap has ties."""
    from scipy.stats import kendalltau

    _, _, summary = finished
    rows = summary["models"]
    for gap in summary["gaps"]:
        for name, b in summary["kendall_tau_b"][gap].items():
            s = [r["values"][name] for r in rows]
            assert b == pytest.approx(kendalltau(s, [r[gap] for r in rows]).statistic)
            if not summary["ties"][name] and not summary["gap_has_ties"][gap]:
                assert summary["kendall_tau"][gap][name] == pytest.approx(b)


def test_figures_are_written(finished, tmp_path):
    """paper_figs/transformer_studies.py: a PNG and a PDF per measure plus the τ overview."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "paper_figs" / "transformer_studies.py"
    spec = importlib.util.spec_from_file_location("transformer_figs", script)
    figs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figs)
    out, _, summary = finished
    written = figs.main([str(out), "--out", str(tmp_path)])
    names = set(summary["kendall_tau"]["error_gap"]) | {"tau_overview"}
    assert {p.name for p in written} == {f"{n}.{ext}" for n in names for ext in ("png", "pdf")}
    assert all(p.stat().st_size > 1000 for p in written)


def test_models_that_never_learned_are_reported_apart():
    """A model at the majority-class rate is excluded from the "learned" τ block only; with it
    every measure gains concordant pairs, without it τ is that of the others."""
    def row(i, acc, gap, value):
        return {"id": f"m{i}", "train_acc": acc, "error_gap": gap, "loss_gap": gap, "values": {"s": value}}

    rows = [row(0, 0.10, 0.0, 1e-6), row(1, 0.8, 0.03, 2.0), row(2, 0.9, 0.02, 1.0), row(3, 0.85, 0.01, 3.0)]
    config = {"task": "vit", "data": {"name": "digits"}, "plan": {"measures": ["s"]}, "n_boot": 50, "seed": 0,
              "models": [{"id": r["id"]} for r in rows]}
    trained = {r["id"]: {k: r[k] for k in ("train_acc", "error_gap", "loss_gap")}
               | {"train_loss": 0.0, "test_loss": 0.0, "test_acc": 0.5, "history": {"wall_time": 1.0}} for r in rows}
    measured = {f"{r['id']}/s": {"values": r["values"], "seconds": 0.1} for r in rows}
    summary = study.summarize(config, trained, measured, chance_acc=0.1)
    assert summary["learned"]["excluded"] == ["m0"] and summary["learned"]["n_models"] == 3
    assert summary["kendall_tau"]["error_gap"]["s"] == pytest.approx(1 / 3)  # (4 concordant − 2 discordant)/6
    assert summary["learned"]["kendall_tau"]["error_gap"]["s"] == pytest.approx(-1 / 3)
    table = study.tau_table(summary)
    assert "3 that learned" in table and "-0.33" in table


def test_a_measure_undefined_at_a_model_is_stored_with_its_error_and_named_in_the_summary(monkeypatch):
    """The measure raises ValueError at one model: its unit keeps the error and no value, the
    others are unaffected, τ runs over the models that have a value and the summary and table
    say which model is missing."""
    def flaky(model, batches, plan, seed):
        if seed == 1:
            raise ValueError("average-case loss is not finite at sample 0")
        return float(seed), {}

    monkeypatch.setitem(study.MEASURES, "s", flaky)
    units = {i: study.measure_unit("s", None, [], {}, seed=i) for i in range(4)}
    assert units[1]["values"] == {} and "not finite" in units[1]["error"]
    assert units[2]["values"] == {"s": 2.0} and "error" not in units[2]
    gaps = [0.01, 0.05, 0.02, 0.03]
    config = {"task": "vit", "data": {"name": "digits"}, "plan": {"measures": ["s"]}, "n_boot": 50, "seed": 0,
              "models": [{"id": f"m{i}"} for i in range(4)]}
    trained = {f"m{i}": {"train_acc": 0.9, "error_gap": g, "loss_gap": g, "train_loss": 0.0, "test_loss": 0.0,
                         "test_acc": 0.5, "history": {"wall_time": 1.0}} for i, g in enumerate(gaps)}
    summary = study.summarize(config, trained, {f"m{i}/s": u for i, u in units.items()})
    assert summary["missing"] == {"s": ["m1"]} and list(summary["errors"]) == ["m1/s"]
    assert summary["kendall_tau"]["error_gap"]["s"] == pytest.approx(1.0)  # 0, 2, 3 vs gaps .01, .02, .03
    assert "(n=3)" in study.tau_table(summary)


def test_tau_differences_are_paired_over_models_with_both_values(finished):
    """Geodesic − adaptive τ in the summary equals the difference of the two τ's, its paired CI
    brackets it, and the table shows it."""
    _, _, summary = finished
    for gap in ("error_gap", "loss_gap"):
        d = summary["tau_difference"][gap]["geodesic_inv - adaptive"]
        tau = summary["kendall_tau"][gap]
        assert d[0] == pytest.approx(tau["geodesic_inv"] - tau["adaptive"])
        assert d[1] <= d[0] <= d[2]
    assert "Δτ geodesic_inv − adaptive (paired)" in study.tau_table(summary)


def test_stale_measures_of_a_retrained_model_are_refused(finished, tmp_path):
    """Change a model's hyperparameters and delete only its trained files: its stored measures
    belong to the old model, so the rerun must refuse them rather than reuse them."""
    import copy
    import shutil

    out, config, _ = finished
    copy_out = tmp_path / "study"
    shutil.copytree(out, copy_out)
    changed = copy.deepcopy(config)
    hp = changed["models"][0]
    hp["weight_decay"] = 0.123
    for suffix in (".json", ".pt"):
        (copy_out / "models" / f"{hp['id']}{suffix}").unlink()
    with pytest.raises(ValueError, match="another configuration"):
        study.run_study(copy_out, changed, progress=False)


def test_sgd_weight_decay_is_on_the_coupled_scale():
    """Plain SGD couples weight decay to the gradient at a 30-300x larger lr than AdamW: its
    per-step shrinkage lr·wd must stay at most AdamW's, or the network decays to zero."""
    for task in ("vit", "text"):
        pop = study.population(task, 300)
        sgd = [m["lr"] * m["weight_decay"] for m in pop if m["optimizer"] == "sgd"]
        adamw = [m["lr"] * m["weight_decay"] for m in pop if m["optimizer"] != "sgd"]
        assert len(sgd) > 10 and max(sgd) > 0 and max(sgd) <= max(adamw)
