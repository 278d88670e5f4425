"""The GPU path: every measure and optimizer gives on CUDA the number it gives on the CPU.

All random draws (restarts, probes, noise) come from CPU generators, so a float64 run on CUDA
must reproduce the CPU run up to the order of floating-point reductions. These tests need a CUDA
device and are skipped without one (CI has none); they were run on an H200 (README, "GPU").
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_sharpness_common import attention_quotient, attention_setup
from torch import nn

import quotientsharp as qs
from quotientsharp.optim import ASAM, MESA, RSAM, SAF, SAM, GeodesicSAM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
RTOL = 1e-9


def on(device, model, batches):
    """A copy of ``model`` and ``batches`` on ``device`` (float64)."""
    return (copy.deepcopy(model).to(device),
            [(x.to(device), y.to(device)) for x, y in batches])


def both(fn, model, batches):
    """``fn(model, batches)`` on the CPU and on CUDA."""
    return fn(*on("cpu", model, batches)), fn(*on("cuda", model, batches))


SHARPNESS = {
    "geodesic_mix": lambda m, b: qs.geodesic_sharpness(m, b, F.cross_entropy, rho=0.1, n_iter=8, metric="mix",
                                                       quotient=attention_quotient(m, "mix"), progress=False),
    "geodesic_inv": lambda m, b: qs.geodesic_sharpness(m, b, F.cross_entropy, rho=0.1, n_iter=8, metric="inv",
                                                       quotient=attention_quotient(m, "inv"), progress=False),
    "geodesic_avg": lambda m, b: qs.average_geodesic_sharpness(m, b, F.cross_entropy, rho=0.01, n_samples=4,
                                                               quotient=attention_quotient(m, "mix"), progress=False),
    "adaptive": lambda m, b: qs.adaptive_sharpness(m, b, F.cross_entropy, rho=0.1, n_iter=8, progress=False),
    "euclidean": lambda m, b: qs.euclidean_sharpness(m, b, F.cross_entropy, rho=0.1, n_iter=8, progress=False),
    "trace": lambda m, b: qs.hessian_trace(m, b, F.cross_entropy, n_probes=6, progress=False),
    "max_eigenvalue": lambda m, b: qs.hessian_max_eigenvalue(m, b, F.cross_entropy, progress=False),
    "renyi": lambda m, b: qs.renyi_sharpness(m, b, F.cross_entropy, progress=False).sharpness,
    "quotient_trace": lambda m, b: qs.quotient_hessian_trace(m, b, F.cross_entropy, n_probes=6,
                                                             quotient=attention_quotient(m, "mix"), progress=False),
}


@pytest.mark.parametrize("name", sorted(SHARPNESS))
def test_measure_on_cuda_equals_cpu(name):
    model, batches = attention_setup(n_layers=2)
    cpu, gpu = (getattr(r, "value", r) for r in both(SHARPNESS[name], model, batches))
    assert abs(cpu) > 1e-8, "a vanishing value would make the comparison empty"
    assert gpu == pytest.approx(cpu, rel=RTOL, abs=1e-12)


def mlp_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    return model, x, y


OPTIMIZERS = {
    "SAM": lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9),
    "ASAM": lambda m: ASAM(m.named_parameters(), torch.optim.SGD, rho=0.5, lr=0.1),
    "RSAM": lambda m: RSAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1),
    "GeodesicSAM": lambda m: GeodesicSAM(m.parameters(), torch.optim.SGD, rho=0.1, model=m, lr=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sam_family_steps_on_cuda_equal_cpu(name):
    model, x, y = mlp_and_batch()
    finals = []
    for device in ("cpu", "cuda"):
        m, (xd, yd) = copy.deepcopy(model).to(device), (x.to(device), y.to(device))
        opt = OPTIMIZERS[name](m)
        for _ in range(3):
            opt.step(lambda: _backward(F.cross_entropy(m(xd), yd)))
        finals.append(torch.cat([p.detach().reshape(-1).cpu() for p in m.parameters()]))
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (finals[0] - start).norm() > 1e-3, "the optimizer did not move the weights"
    torch.testing.assert_close(finals[1], finals[0], rtol=RTOL, atol=1e-12)


def _backward(loss):
    loss.backward()
    return loss


def test_saf_and_mesa_steps_on_cuda_equal_cpu():
    model, x, y = mlp_and_batch()
    idx = torch.arange(len(x))
    finals = {}
    for device in ("cpu", "cuda"):
        for kind in ("SAF", "MESA"):
            m = copy.deepcopy(model).to(device)
            xd, yd, id_ = x.to(device), y.to(device), idx.to(device)
            if kind == "SAF":
                opt = SAF(m.parameters(), torch.optim.SGD, num_samples=len(x), num_classes=3, lr=0.1,
                          lag_epochs=1, start_epoch=0)
                for epoch in range(3):
                    opt.set_epoch(epoch)
                    opt.step(lambda: _backward(opt.loss(m(xd), yd, id_)))
            else:
                opt = MESA(m.parameters(), torch.optim.SGD, model=m, decay=0.9, lr=0.1, start_epoch=0)
                for epoch in range(3):
                    opt.set_epoch(epoch)
                    opt.step(lambda: _backward(opt.loss(m(xd), yd, xd)))
            finals[device, kind] = torch.cat([p.detach().reshape(-1).cpu() for p in m.parameters()])
    for kind in ("SAF", "MESA"):
        torch.testing.assert_close(finals["cuda", kind], finals["cpu", kind], rtol=RTOL, atol=1e-12)


def test_huggingface_bert_geodesic_sharpness_on_cuda_equals_cpu():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 50, (4, 8), generator=g), torch.randint(0, 3, (4,), generator=g))
               for _ in range(2)]

    class Logits(nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, ids):
            return self.bert(input_ids=ids).logits

    def measure(m, b):
        return qs.geodesic_sharpness(m, b, F.cross_entropy, rho=0.01, n_iter=5, progress=False)

    cpu, gpu = both(measure, Logits(model), batches)
    assert cpu.value > 0
    assert gpu.value == pytest.approx(cpu.value, rel=1e-8)


def test_cli_measure_on_cuda_equals_cpu(tmp_path):
    import json

    from quotientsharp import cli
    from quotientsharp.models import MLP

    torch.manual_seed(0)
    torch.save(MLP([4, 6, 3]).double(), tmp_path / "m.pt")
    g = torch.Generator().manual_seed(1)
    torch.save((torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)),
               tmp_path / "d.pt")
    values = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        status = cli.main(["measure", str(tmp_path / "m.pt"), "--data", str(tmp_path / "d.pt"), "--measures",
                           "adaptive", "euclidean", "--batch-size", "8", "--n-batches", "2", "--out", str(out),
                           "--quiet", "--device", device])
        assert status == 0
        values[device] = json.loads(out.read_text())
    cpu, gpu = values["cpu"], values["cuda"]
    assert set(cpu["measures"]) == set(gpu["measures"]) == {"adaptive", "euclidean"}
    for name in cpu["measures"]:
        assert gpu["measures"][name]["value"] == pytest.approx(cpu["measures"][name]["value"], rel=RTOL)
