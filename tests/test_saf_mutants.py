"""SAF against its documented loss, defaults and input checks (issue 18: tests written against
the surviving mutants of ``optim/saf.py``). The reference loss is written from the docstring and
spec training.md: CE(z, y; label smoothing) + λ·τ²·(1/|B|)·Σ_rows KL(softmax(z_past/τ) ‖ softmax(z/τ))
over the rows whose memory slot was written Ẽ epochs earlier."""
import math
import warnings

import pytest
import torch

from quotientsharp.optim import SAF

N, C = 6, 3


def make(**kw):
    torch.manual_seed(0)
    w = torch.randn(4, C, dtype=torch.float64, requires_grad=True)
    return w, SAF([w], torch.optim.SGD, num_samples=N, num_classes=C, lr=0.1, **kw)


def reference_loss(z, y, past, valid, lam, tau, smoothing):
    """The documented loss in float64 from explicit sums."""
    ce = torch.nn.functional.cross_entropy(z, y, label_smoothing=smoothing)
    total = 0.0
    for i in range(z.shape[0]):
        if not valid[i]:
            continue
        q = torch.softmax(past[i] / tau, dim=0)
        p = torch.softmax(z[i] / tau, dim=0)
        total += float((q * (q.log() - p.log())).sum())
    return float(ce) + lam * tau**2 * total / z.shape[0]


def test_loss_equals_the_documented_formula_with_stale_rows_dropped():
    w, opt = make(lam=0.7, tau=2.0, lag_epochs=2, start_epoch=3, label_smoothing=0.1)
    torch.manual_seed(1)
    x = torch.randn(N, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    recorded = {}
    for epoch in range(4):  # epoch 2 sees only samples 0..3: samples 4, 5 are stale at epoch 4
        opt.set_epoch(epoch)
        seen = torch.arange(4) if epoch == 2 else torch.arange(N)
        z = x[seen] @ w + 0.1 * epoch
        opt.loss(z, y[seen], seen)
        recorded[epoch] = (seen, z.detach().clone())
    opt.set_epoch(4)
    assert opt.active
    z = x @ w.detach() + 0.5
    got = opt.loss(z, y, torch.arange(N))
    past = torch.zeros(N, C, dtype=torch.float64)
    past[:4] = recorded[2][1]
    valid = [True] * 4 + [False] * 2
    assert float(got) == pytest.approx(reference_loss(z, y, past, valid, 0.7, 2.0, 0.1), rel=1e-6)
    assert opt.stats["stale_rows"] == 2


def test_documented_defaults():
    """τ = 5, Ẽ = 3 (memory of Ẽ + 1 slots), E_start = 5, λ = 0.3, τ² factor, buffer not saved."""
    w, opt = make()
    assert (opt.tau, opt.lag_epochs, opt.start_epoch, opt.lam, opt.kl_factor) == (5.0, 3, 5, 0.3, 25.0)
    assert opt.logit_memory.shape == (N, 4, C) and opt.logit_memory.dtype == torch.float32
    assert "logit_memory" not in opt.state_dict()["saf"]
    opt.set_epoch(5)
    assert not opt.active
    opt.set_epoch(6)
    assert opt.active


def test_buffer_options_are_honoured():
    w, opt = make(buffer_dtype=torch.float16, buffer_device="cpu", buffer_mode="per_rank_legacy", save_buffer=True)
    assert opt.logit_memory.dtype == torch.float16 and opt.logit_memory.device.type == "cpu"
    assert opt.memory_bytes == N * 4 * C * 2
    assert opt.buffer_mode == "per_rank_legacy" and "logit_memory" in opt.state_dict()["saf"]


@pytest.mark.parametrize("bad", [[0, N], [-1, 2]])
def test_sample_indices_outside_the_memory_are_refused(bad):
    w, opt = make()
    opt.set_epoch(0)
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        opt.loss(torch.zeros(2, C, dtype=torch.float64), torch.tensor([0, 1]), torch.tensor(bad))


def test_soft_targets_warn_once_and_hard_targets_never():
    w, opt = make()
    opt.set_epoch(0)
    z = torch.zeros(2, C, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.loss(z, torch.tensor([0, 1]), torch.tensor([0, 1]))
        assert not caught
        soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]], dtype=torch.float64)
        opt.loss(z, soft, torch.tensor([0, 1]))
        opt.loss(z, soft, torch.tensor([2, 3]))
    assert [str(c.message) for c in caught] == ["soft targets (mixup/cutmix?): SAF stores the logits of the mixed image"]


def test_step_without_a_closure_is_the_base_step():
    w, opt = make()
    opt.set_epoch(0)
    before = w.detach().clone()
    loss = opt.loss(torch.randn(N, 4, dtype=torch.float64) @ w, torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(N))
    loss.backward()
    grad = w.grad.clone()
    assert opt.step() is None
    torch.testing.assert_close(w.detach(), before - 0.1 * grad)
    assert math.isfinite(float(loss.detach()))


def test_half_precision_memory_is_read_back_in_the_logits_dtype():
    """A float16 memory stores rounded logits, but the KL is computed in the logits' dtype (float64
    here) from those rounded values, not in float16."""
    w, opt = make(lam=1.0, tau=2.0, lag_epochs=1, start_epoch=1, buffer_dtype=torch.float16)
    torch.manual_seed(2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    past = 3 * torch.randn(N, C, dtype=torch.float64)
    opt.set_epoch(0)
    opt.loss(past, y, torch.arange(N))
    opt.set_epoch(1)
    opt.loss(past, y, torch.arange(N))
    opt.set_epoch(2)
    z = torch.randn(N, C, dtype=torch.float64)
    got = opt.loss(z, y, torch.arange(N))
    rounded = past.to(torch.float16).to(torch.float64)
    assert float(got) == pytest.approx(reference_loss(z, y, rounded, [True] * N, 1.0, 2.0, 0.0), rel=1e-12)
