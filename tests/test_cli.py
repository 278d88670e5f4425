"""The command line (``python -m quotientsharp measure``) end to end on models the tests save
themselves: its JSON must equal the library's direct call on the same batches."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quotientsharp import cli
from quotientsharp.curvature import hessian_trace
from quotientsharp.measures import adaptive_sharpness, euclidean_sharpness, geodesic_sharpness
from quotientsharp.models import MLP, TinyViT

ROOT = Path(__file__).resolve().parents[1]
SOLVER = ["--n-iter", "3", "--batch-size", "8", "--n-batches", "2", "--seed", "3"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "quotientsharp", "measure", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def first_batches(examples, batch_size=8, n_batches=2):
    if isinstance(examples, dict):
        return [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in examples.items()} for i in range(n_batches)]
    return [(examples[0][i * batch_size:(i + 1) * batch_size], examples[1][i * batch_size:(i + 1) * batch_size])
            for i in range(n_batches)]


def test_torch_saved_vit_matches_direct_calls(tmp_path):
    torch.manual_seed(0)
    model = TinyViT(image_size=8, patch_size=4, n_classes=3, d_model=16, depth=1, n_heads=2)
    torch.save(model, tmp_path / "vit.pt")
    inputs, targets = torch.randn(20, 1, 8, 8), torch.randint(0, 3, (20,))
    torch.save((inputs, targets), tmp_path / "data.pt")

    proc = run_cli("vit.pt", "--data", "data.pt", "--measures", "geodesic_mix", "adaptive", "hessian_trace",
                   "--rho", "0.05", "--n-probes", "4", *SOLVER, "--out", "res/out.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "res" / "out.json").read_text())
    assert result["model_type"] == "torch" and result["model_class"] == "TinyViT"
    rows = result["measures"]

    batches = first_batches((inputs, targets))
    options = dict(n_iter=3, seed=3, progress=False)
    geo = geodesic_sharpness(model, batches, F.cross_entropy, 0.05, metric="mix", **options)
    ada = adaptive_sharpness(model, batches, F.cross_entropy, 0.05, **options)
    trace = hessian_trace(model, loader=batches, loss_fn=F.cross_entropy, n_probes=4, seed=3, progress=False)
    assert rows["geodesic_mix"]["value"] == pytest.approx(geo.value, rel=1e-9, abs=1e-12)
    assert rows["geodesic_mix"]["details"]["per_batch"] == pytest.approx(geo.per_batch, rel=1e-9, abs=1e-12)
    assert rows["adaptive"]["value"] == pytest.approx(ada.value, rel=1e-9, abs=1e-12)
    assert rows["hessian_trace"]["value"] == pytest.approx(trace.value, rel=1e-9)
    assert geo.value != ada.value  # the two rows are distinct measures, not one number twice
    # the printed table names every measure with its value
    for name in ("geodesic_mix", "adaptive", "hessian_trace"):
        line = next(line for line in proc.stdout.splitlines() if line.startswith(name + " "))
        assert float(line.split()[1]) == pytest.approx(rows[name]["value"], rel=1e-5)
    assert "measures" in proc.stderr  # the progress bar


def test_huggingface_checkpoint_matches_direct_calls(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    ids = torch.randint(1, 30, (16, 6))
    ids[:, 4:] = 0  # padding, masked out
    examples = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.randint(0, 3, (16,))}
    np.savez(tmp_path / "text.npz", **{k: v.numpy() for k, v in examples.items()})

    proc = run_cli("bert", "--data", "text.npz", "--measures", "geodesic_inv", "euclidean", "--quiet", *SOLVER,
                   "--out", "bert.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "bert.json").read_text())
    assert result["model_type"] == "huggingface" and result["model_class"] == "BertForSequenceClassification"
    assert "measures:" not in proc.stderr  # --quiet silences the progress bar

    model = BertForSequenceClassification.from_pretrained(tmp_path / "bert")
    batches = first_batches(examples)
    geo = geodesic_sharpness(model, batches, F.cross_entropy, 0.1, metric="inv", n_iter=3, seed=3, progress=False)
    euc = euclidean_sharpness(model, batches, F.cross_entropy, 0.1, n_iter=3, seed=3, progress=False)
    rows = result["measures"]
    assert rows["geodesic_inv"]["value"] == pytest.approx(geo.value, rel=1e-9, abs=1e-12)
    assert rows["euclidean"]["value"] == pytest.approx(euc.value, rel=1e-9, abs=1e-12)
    assert rows["geodesic_inv"]["details"]["config"]["metrics"] == geo.config["metrics"]


def test_named_dataset_and_shuffled_subset(tmp_path, capsys):
    """In process: ``--dataset blobs --shuffle`` measures the seeded random subset of the split."""
    from quotientsharp.data import blobs

    torch.manual_seed(2)
    model = MLP([4, 8, 3]).double()
    torch.save(model, tmp_path / "mlp.pt")
    out = tmp_path / "m.json"
    status = cli.main(["measure", str(tmp_path / "mlp.pt"), "--dataset", "blobs", "--measures", "adaptive",
                       "--shuffle", "--seed", "5", "--batch-size", "16", "--n-batches", "3", "--n-iter", "4",
                       "--out", str(out), "--quiet"])
    assert status == 0
    inputs, labels = blobs().train.tensors
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(5))[:48].split(16)
    batches = [(inputs[i], labels[i]) for i in idx]
    expected = adaptive_sharpness(model, batches, F.cross_entropy, 0.1, n_iter=4, seed=5, progress=False)
    assert json.loads(out.read_text())["measures"]["adaptive"]["value"] == pytest.approx(expected.value, rel=1e-12)
    assert "adaptive" in capsys.readouterr().out


def test_measure_that_raises_is_recorded_and_sets_exit_status(tmp_path, capsys):
    """An MLP has no attention: geodesic sharpness raises; the row stores the error, others still run."""
    torch.manual_seed(3)
    torch.save(MLP([4, 6, 3]), tmp_path / "mlp.pt")
    torch.save((torch.randn(8, 4), torch.randint(0, 3, (8,))), tmp_path / "d.pt")
    out = tmp_path / "r.json"
    status = cli.main(["measure", str(tmp_path / "mlp.pt"), "--data", str(tmp_path / "d.pt"), "--measures",
                       "geodesic_mix", "euclidean", "--batch-size", "4", "--n-batches", "2", "--n-iter", "2",
                       "--out", str(out), "--quiet"])
    rows = json.loads(out.read_text())["measures"]
    assert status == 1
    assert "no symmetry group found" in rows["geodesic_mix"]["error"]
    x, y = torch.load(tmp_path / "d.pt")
    expected = euclidean_sharpness(torch.load(tmp_path / "mlp.pt", weights_only=False), [(x[:4], y[:4]), (x[4:], y[4:])],
                                   F.cross_entropy, 0.1, n_iter=2, progress=False)
    assert rows["euclidean"]["value"] == pytest.approx(expected.value, rel=1e-6)  # the other row still ran
    assert "error: ValueError: no symmetry group found" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("state_dict", "holds a state dict, not a module"),
    ("too_few", "2 batches of 8 need 16 examples; the data has 5"),
    ("bad_dict", "needs its targets under 'labels'"),
    ("suffix", "unsupported data file type '.csv'"),
    ("device", "--device cuda: this torch build has no CUDA device available"),
])
def test_bad_input_is_named(tmp_path, capsys, case, message):
    model = MLP([4, 3])
    model_path = tmp_path / "m.pt"
    torch.save(model.state_dict() if case == "state_dict" else model, model_path)
    data_path = tmp_path / ("d.csv" if case == "suffix" else "d.pt")
    n = 5 if case == "too_few" else 16
    data = {"x": torch.randn(n, 4)} if case == "bad_dict" else (torch.randn(n, 4), torch.randint(0, 3, (n,)))
    torch.save(data, data_path)
    if case == "device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    device = ["--device", "cuda"] if case == "device" else []
    status = cli.main(["measure", str(model_path), "--data", str(data_path), "--measures", "euclidean",
                       "--batch-size", "8", "--n-batches", "2", "--out", str(tmp_path / "o.json"), "--quiet", *device])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_console_script_is_declared():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert [e.value for e in scripts if e.name == "quotientsharp"] == ["quotientsharp.cli:main"]
