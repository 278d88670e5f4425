"""SAF (stored-logit KL, ring buffer, epoch stamps) and MESA (EMA teacher)."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quotientsharp.optim import MESA, SAF, IndexedDataset


def saf(num_samples=6, num_classes=4, **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(3, num_classes)
    opts = dict(num_samples=num_samples, num_classes=num_classes, lr=0.1)
    opts.update(kwargs)
    return model, SAF(model.parameters(), torch.optim.SGD, **opts)


def kl_by_hand(z, z_past, tau):
    p_past = torch.softmax(z_past / tau, -1)
    return tau**2 * (p_past * (torch.log_softmax(z_past / tau, -1) - torch.log_softmax(z / tau, -1))).sum(-1).mean()


def test_indexed_dataset_yields_index_first():
    ds = IndexedDataset(torch.utils.data.TensorDataset(torch.arange(5.0), torch.arange(5) * 10))
    assert len(ds) == 5
    i, x, y = ds[3]
    assert (i, x.item(), y.item()) == (3, 3.0, 30)


def test_saf_loss_equals_formula_and_kl_div_and_is_inactive_before_start():
    _, opt = saf(lag_epochs=1, start_epoch=1, lam=0.3, tau=2.0)
    idx = torch.tensor([0, 2, 5])
    y = torch.tensor([1, 0, 3])
    z_past = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 0.0, 1.0, -1.0], [2.0, 1.0, -1.0, 0.0]])
    z = torch.tensor([[0.5, -1.0, 1.5, 2.0], [1.0, -0.5, 0.0, 0.5], [-1.0, 2.0, 0.0, 1.0]], requires_grad=True)
    for epoch in (0, 1):  # epoch 1 = start_epoch: still inactive (E_start < e)
        opt.set_epoch(epoch)
        assert not opt.active
        loss = opt.loss(z_past if epoch == 1 else z.detach(), y, idx)
        torch.testing.assert_close(loss, F.cross_entropy(z_past if epoch == 1 else z.detach(), y))
    opt.set_epoch(2)  # reads slot written at epoch 1 (z_past)
    loss = opt.loss(z, y, idx)
    kl = kl_by_hand(z, z_past, 2.0)
    torch.testing.assert_close(loss, F.cross_entropy(z, y) + 0.3 * kl)
    kl_div = 4.0 * F.kl_div(torch.log_softmax(z / 2, -1), torch.log_softmax(z_past / 2, -1),
                            log_target=True, reduction="batchmean")
    torch.testing.assert_close(kl, kl_div)
    # gradient of the KL term: lam * tau * (softmax(z/tau) - softmax(z_past/tau)) / |B|
    (grad,) = torch.autograd.grad(loss - F.cross_entropy(z, y), z)
    expected = 0.3 * 2.0 * (torch.softmax(z / 2, -1) - torch.softmax(z_past / 2, -1)) / 3
    torch.testing.assert_close(grad, expected.detach())


def test_saf_kl_of_identical_logits_is_zero_and_tau_squared_flag():
    for tau_squared, factor in ((True, 25.0), (False, 1.0)):
        _, opt = saf(lag_epochs=1, start_epoch=0, tau=5.0, tau_squared=tau_squared)
        idx, y = torch.tensor([1, 3]), torch.tensor([0, 1])
        z0, z1 = torch.randn(2, 4), torch.randn(2, 4)
        opt.set_epoch(0)
        opt.loss(z0, y, idx)
        opt.set_epoch(1)
        term = opt.sharpness_term(z1, idx)
        torch.testing.assert_close(term, factor / 25.0 * kl_by_hand(z1, z0, 5.0))
        opt.set_epoch(1)
        assert opt.sharpness_term(z0, idx).abs().item() < 1e-6


def test_saf_reads_slot_written_lag_epochs_earlier_and_masks_stale_rows():
    _, opt = saf(num_samples=4, num_classes=3, lag_epochs=2, start_epoch=2, lam=1.0, tau=1.0)
    y = torch.zeros(2, dtype=torch.long)
    logits = {e: torch.full((4, 3), float(e)) + torch.arange(3.0) * (e + 1) for e in range(5)}
    seen = {0: [0, 1], 1: [0, 1], 2: [0, 2], 3: [0, 2], 4: [0, 1]}
    for epoch in range(5):
        opt.set_epoch(epoch)
        idx = torch.tensor(seen[epoch])
        if opt.active:  # epochs 3 and 4 read the slots written at epochs 1 and 2 (row 0 seen there)
            torch.testing.assert_close(opt.logit_memory[0, (epoch - 2) % 3], logits[epoch - 2][0])
        opt.loss(logits[epoch][idx].clone().requires_grad_(), y, idx)
        assert torch.equal(opt.epoch_stamps[idx, epoch % 3], torch.full((2,), epoch, dtype=torch.int32))
    assert opt.stats["stale_rows"] == 2  # sample 2 at epoch 3, sample 1 at epoch 4
    # epoch 5 reads epoch 3's slot 0: sample 1's row there holds epoch-0 logits (stamp 0): dropped
    opt.set_epoch(5)
    assert torch.equal(opt.logit_memory[1, 0], logits[0][1])
    z = torch.randn(2, 3)
    expected = kl_by_hand(z[:1], logits[3][:1], 1.0) / 2  # batch mean over both rows
    torch.testing.assert_close(opt.sharpness_term(z, torch.tensor([0, 1])), expected)


def test_saf_memory_size_validation_and_index_errors():
    _, opt = saf(num_samples=100, num_classes=10, lag_epochs=3)
    assert opt.memory_bytes == 100 * 10 * 4 * 4
    assert opt.logit_memory.device == next(iter(opt.param_groups[0]["params"])).device
    with pytest.raises(ValueError, match="start_epoch"):
        saf(lag_epochs=3, start_epoch=1)
    opt.set_epoch(0)
    with pytest.raises(IndexError):
        opt.loss(torch.randn(1, 10), torch.tensor([0]), torch.tensor([100]))
    _, fresh = saf()
    with pytest.raises(RuntimeError, match="set_epoch"):
        fresh.loss(torch.randn(1, 4), torch.tensor([0]), torch.tensor([0]))


def test_saf_training_loop_one_backward_and_state_dict():
    model, opt = saf(num_samples=8, lag_epochs=1, start_epoch=0, save_buffer=True)
    x, y = torch.randn(8, 3), torch.randint(0, 4, (8,))
    idx = torch.arange(8)
    for epoch in range(3):
        opt.set_epoch(epoch)
        loss = opt.step(lambda: _backward(opt.loss(model(x), y, idx)))
        assert torch.isfinite(loss)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2, opt2 = saf(num_samples=8, lag_epochs=1, start_epoch=0, save_buffer=True)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.epoch == 2 and torch.equal(opt2.logit_memory, opt.logit_memory)
    assert torch.equal(opt2.epoch_stamps, opt.epoch_stamps)


def _backward(loss):
    loss.backward()
    return loss


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))


def test_mesa_teacher_follows_its_decay_exactly():
    model = bn_model().double()
    opt = MESA(model.parameters(), torch.optim.SGD, model=model, decay=0.9, lr=0.1, start_epoch=0)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    opt.set_epoch(0)
    for _ in range(3):
        loss = opt.loss(model(x), y, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for k, v in model.state_dict().items():
            expected[k] = v.clone() if not v.is_floating_point() else expected[k] * 0.9 + v * (1 - 0.9)
    for k, v in opt.teacher.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-14, atol=1e-15, msg=k)
    assert opt.teacher.state_dict()["1.num_batches_tracked"].item() == 3
    assert not opt.teacher.training and not any(p.requires_grad for p in opt.teacher.parameters())


def test_mesa_loss_uses_teacher_logits_when_active():
    model = bn_model()
    opt = MESA(model.parameters(), torch.optim.SGD, model=model, lr=0.1, lam=0.8, tau=5.0, start_epoch=1)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    z = model(x)
    opt.set_epoch(1)
    torch.testing.assert_close(opt.loss(z, y, x), F.cross_entropy(z, y))
    opt.set_epoch(2)
    with torch.no_grad():
        z_teacher = opt.teacher(x)
    torch.testing.assert_close(opt.loss(z, y, x), F.cross_entropy(z, y) + 0.8 * kl_by_hand(z, z_teacher, 5.0))


def test_mesa_ema_horizon_and_state_dict_round_trip():
    model = bn_model()
    opt = MESA(model.parameters(), torch.optim.SGD, model=model, ema_horizon_epochs=2, steps_per_epoch=50, lr=0.1)
    assert opt.decay == pytest.approx(1 - 1 / 100)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    opt.set_epoch(0)
    opt.step(lambda: _backward(opt.loss(model(x), y, x)))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2 = bn_model()
    opt2 = MESA(model2.parameters(), torch.optim.SGD, model=model2, decay=0.5, lr=0.1)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.epoch == 0
    for a, b in zip(opt.teacher.state_dict().values(), opt2.teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_mesa_steps_equal_a_reference_implementation_of_the_spec():
    """Spec §5 written out: z_T from a no-grad eval-mode deep copy, loss = CE + λ·τ²·KL when
    E_start < e, base step, then v ← β·v + (1−β)·θ on floating state (integer buffers copied)."""
    import copy

    decay, lam, tau, start = 0.7, 0.8, 2.0, 0
    model = bn_model().double()
    ref_model = copy.deepcopy(model)
    ref_teacher = copy.deepcopy(ref_model).eval()
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = MESA(model.parameters(), torch.optim.SGD, model=model, decay=decay, lam=lam, tau=tau, start_epoch=start, **sgd)
    ref_opt = torch.optim.SGD(ref_model.parameters(), **sgd)
    gen = torch.Generator().manual_seed(1)
    kls = []
    for epoch in range(3):  # epoch 0: CE only; epochs 1, 2: CE + λ·KL
        opt.set_epoch(epoch)
        for i in range(2):
            x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 2, (8,), generator=gen)
            z_ref = ref_model(x)
            ref_loss = F.cross_entropy(z_ref, y)
            if start < epoch:
                with torch.no_grad():
                    z_teacher = ref_teacher(x)
                kl = kl_by_hand(z_ref, z_teacher, tau)
                kls.append(kl.item())
                ref_loss = ref_loss + lam * kl
            ref_opt.zero_grad()
            ref_loss.backward()
            ref_opt.step()
            with torch.no_grad():
                student_state = ref_model.state_dict()
                for k, v in ref_teacher.state_dict().items():
                    v.copy_(decay * v + (1 - decay) * student_state[k] if v.is_floating_point() else student_state[k])

            if i == 0:
                loss = opt.loss(model(x), y, x)
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                loss = opt.step(lambda: _backward(opt.loss(model(x), y, x)))
            torch.testing.assert_close(loss, ref_loss, rtol=1e-13, atol=0)
    assert min(kls) > 1e-6  # the KL is on and its gradient reached the student
    for (k, v), ref in zip(model.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(v, ref, rtol=1e-12, atol=1e-14, msg=k)
    for (k, v), ref in zip(opt.teacher.state_dict().items(), ref_teacher.state_dict().values()):
        torch.testing.assert_close(v, ref, rtol=1e-12, atol=1e-14, msg=k)
    assert opt.teacher.state_dict()["1.num_batches_tracked"].item() == 6


class _KeywordModel(nn.Module):
    """Keyword inputs, output with a ``.logits`` attribute (HuggingFace style)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, features, shift):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.linear(features) + shift)


def test_mesa_teacher_logits_take_tensor_tuple_and_dict_inputs_and_join_autograd():
    torch.manual_seed(0)
    model = _KeywordModel()
    opt = MESA(model.parameters(), torch.optim.SGD, model=model, start_epoch=0, lr=0.1)
    x, shift = torch.randn(4, 3), torch.randn(4, 2)
    expected = opt.teacher.linear(x).detach() + shift
    for inputs in ({"features": x, "shift": shift}, (x, shift)):
        z_teacher = opt.teacher_logits(inputs)
        torch.testing.assert_close(z_teacher, expected)
        assert not z_teacher.is_inference() and not z_teacher.requires_grad
    linear = nn.Linear(3, 2)
    opt = MESA(linear.parameters(), torch.optim.SGD, model=linear, start_epoch=0, lr=0.1)
    torch.testing.assert_close(opt.teacher_logits(x), linear(x).detach())
    opt.set_epoch(1)
    loss = opt.loss(linear(x) * 2, torch.tensor([0, 1, 0, 1]), x)  # KL ≠ 0: its graph backpropagates
    loss.backward()
    assert linear.weight.grad is not None and torch.isfinite(linear.weight.grad).all()


def _kl_rows_by_hand(z, z_teacher, tau):
    p = torch.softmax(z_teacher / tau, -1)
    return (p * (torch.log_softmax(z_teacher / tau, -1) - torch.log_softmax(z / tau, -1))).sum(-1)


@pytest.mark.parametrize("options, lam, factor, smoothing", [
    ({}, 0.8, 25.0, 0.0),                                              # the paper's defaults: λ = 0.8, τ = 5, τ² on
    ({"tau_squared": False, "tau": 3.0, "lam": 0.5}, 0.5, 1.0, 0.0),   # the KL unscaled
    ({"label_smoothing": 0.2, "tau": 2.0}, 0.8, 4.0, 0.2),             # smoothing reaches the CE term
])
def test_mesa_loss_is_the_formula(options, lam, factor, smoothing):
    """loss = CE_smoothed(z, y) + λ · (τ² or 1) · mean KL(softmax(z_T/τ) ‖ softmax(z/τ))."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    opt = MESA(model.parameters(), torch.optim.SGD, model=model, decay=0.5, start_epoch=0, lr=0.1, **options)
    with torch.no_grad():  # move the student away from the teacher so that the KL is not 0
        model.weight.add_(torch.randn_like(model.weight))
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    opt.set_epoch(1)
    z = model(x)
    tau = options.get("tau", 5.0)
    kl = _kl_rows_by_hand(z, opt.teacher(x), tau).mean()
    assert kl > 1e-3
    expected = F.cross_entropy(z, y, label_smoothing=smoothing) + lam * factor * kl
    torch.testing.assert_close(opt.loss(z, y, x), expected, rtol=1e-6, atol=1e-7)
    opt.set_epoch(0)  # inactive (epoch ≤ start_epoch): the smoothed CE alone
    torch.testing.assert_close(opt.loss(z, y, x), F.cross_entropy(z, y, label_smoothing=smoothing))


def test_mesa_loss_before_set_epoch_names_the_call():
    model = nn.Linear(3, 4)
    opt = MESA(model.parameters(), torch.optim.SGD, model=model, lr=0.1)
    assert opt.epoch is None and not opt.active
    with pytest.raises(RuntimeError, match="set_epoch"):
        opt.loss(torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(2, 3))
