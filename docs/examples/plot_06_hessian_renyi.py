"""
Hessian spectrum and Rényi sharpness
====================================

The classical curvature measures, all matrix-free (Hessian-vector products by double backward):
the top eigenvalue (Lanczos), the trace (Hutchinson), the spectral density (stochastic Lanczos
quadrature, SLQ) and Rényi sharpness ``−H_α`` of the normalised absolute spectrum. On a model
small enough for the dense Hessian, each estimate is checked against the exact spectrum.
"""
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from quotientsharp import (
    hessian_max_eigenvalue,
    hessian_spectral_density,
    hessian_trace,
    renyi_entropy,
    renyi_sharpness,
)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
x, y = torch.randn(200, 6, dtype=torch.float64), torch.randint(0, 3, (200,))
opt = torch.optim.SGD(model.parameters(), lr=0.5)
for _ in range(200):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
batches = [(x[:100], y[:100]), (x[100:], y[100:])]       # the Hessian of the mean over both

# %%
# The dense Hessian of the loader-averaged loss (123 parameters): the ground truth.
names = [n for n, _ in model.named_parameters()]
shapes = [p.shape for p in model.parameters()]
flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def total_loss(flat):
    params, i = {}, 0
    for n, s in zip(names, shapes):
        params[n] = flat[i:i + s.numel()].reshape(s)
        i += s.numel()
    return sum(F.cross_entropy(torch.func.functional_call(model, params, (xb,)), yb) for xb, yb in batches) / 2


eigs = torch.linalg.eigvalsh(torch.autograd.functional.hessian(total_loss, flat0))
print(f"{len(eigs)} parameters; exact λ_max = {eigs[-1].item():.8f}, trace = {eigs.sum().item():.6f}")

# %%
# Matrix-free estimates, each with its record (``.value``, ``.stderr`` where it is random, the
# settings in ``.config``).
lam = hessian_max_eigenvalue(model, batches, F.cross_entropy, progress=False)
tr = hessian_trace(model, batches, F.cross_entropy, n_probes=300, progress=False)
print(f"Lanczos λ_max = {lam.value:.8f}   Hutchinson trace = {tr.value:.4f} ± {tr.stderr:.4f}")
assert abs(lam.value - eigs[-1].item()) <= 1e-6 * abs(eigs[-1].item())
assert abs(tr.value - eigs.sum().item()) <= 4 * tr.stderr

# %%
# Rényi sharpness ``−H_α`` (α = 0.5), from SLQ, against the Rényi entropy of the exact spectrum.
ren = renyi_sharpness(model, batches, F.cross_entropy, alpha=0.5, m=30, n_probes=50, progress=False)
exact = renyi_entropy(eigs, alpha=0.5)
print(f"Rényi sharpness (SLQ) = {ren.sharpness:.4f} ± {ren.stderr:.4f}; exact = {exact.sharpness:.4f}")
assert abs(ren.sharpness - exact.sharpness) <= 0.05 * abs(exact.sharpness)

# %%
# The spectral density from SLQ against a histogram of the exact eigenvalues.
dens = hessian_spectral_density(model, batches, F.cross_entropy, m=40, n_probes=5, progress=False)
fig, ax = plt.subplots(figsize=(5, 3))
ax.hist(eigs.numpy(), bins=60, density=True, alpha=0.4, label="exact eigenvalues")
ax.plot(dens.grid.numpy(), dens.density.clamp_min(1e-7).numpy(), label="SLQ density")
ax.set(yscale="log", ylim=(1e-4, None), xlabel="eigenvalue", ylabel="density")
ax.legend()
fig.tight_layout()
