"""
Invariance under a random GL(h) action
======================================

Every head of an attention layer can be reparametrised by any invertible ``A`` — ``(W_Q, W_K) →
(W_Q A⁻¹, W_K Aᵀ)``, likewise for ``(W_V, W_O)``, biases included — without changing the network.
This example applies random elements (condition number up to 100, overall scale 0.1 to 10) to
a small vision transformer in float64 and measures the same model before and after: geodesic
sharpness does not move (to round-off), adaptive and Euclidean sharpness do.
"""
import copy

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from quotientsharp import adaptive_sharpness, euclidean_sharpness, find_symmetries, geodesic_sharpness
from quotientsharp.models import TinyViT

torch.manual_seed(0)
model = TinyViT(image_size=8, patch_size=4, n_classes=3, d_model=16, depth=1, n_heads=2, mlp_dim=16).double()
x, y = torch.randn(64, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(30):                         # a few steps, so that the model is not at its init
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
model.eval()
batches = [(x[:32], y[:32]), (x[32:], y[32:])]


def measures(m):
    common = dict(n_iter=10, progress=False)
    return {
        "geodesic (inv)": geodesic_sharpness(m, batches, F.cross_entropy, 0.05, metric="inv", **common).value,
        "geodesic (mix)": geodesic_sharpness(m, batches, F.cross_entropy, 0.005, metric="mix", **common).value,
        "adaptive": adaptive_sharpness(m, batches, F.cross_entropy, 0.05, **common).value,
        "Euclidean": euclidean_sharpness(m, batches, F.cross_entropy, 0.05, **common).value,
    }


base = measures(model)

# %%
# The group action: one random ``A`` per head and block, drawn by the quotient itself.
quotient = find_symmetries(model)
w = {n: p.detach() for n, p in model.named_parameters()}
changes = {name: [] for name in base}
scales = [0.1, 1.0, 10.0]
for i, scale in enumerate(scales):
    g = quotient.random_element(w, scale=scale, max_cond=100.0, generator=torch.Generator().manual_seed(i))
    twin = copy.deepcopy(model)
    twin.load_state_dict(quotient.action(w, g), strict=False)
    with torch.no_grad():
        out_change = (twin(x) - model(x)).abs().max().item()
    assert out_change < 1e-9, out_change            # the same function
    for name, value in measures(twin).items():
        changes[name].append(abs(value - base[name]) / base[name])
    print(f"scale {scale:>4}: output change {out_change:.1e}; relative change of sharpness: "
          + ", ".join(f"{n} {c[-1]:.1e}" for n, c in changes.items()))

# %%
# Geodesic sharpness is invariant (the ascent is mapped equivariantly, :doc:`/geometry`);
# adaptive and Euclidean sharpness, whose metrics are not GL-invariant, are not.
assert max(changes["geodesic (inv)"] + changes["geodesic (mix)"]) <= 1e-9
assert min(changes["adaptive"]) > 1e-3 and min(changes["Euclidean"]) > 1e-3

fig, ax = plt.subplots(figsize=(5, 3.4), layout="constrained")
for k, (name, c) in enumerate(changes.items()):
    ax.bar([i + 0.2 * k for i in range(len(scales))], [max(v, 1e-17) for v in c], width=0.2, label=name)
ax.set(yscale="log", xticks=[0.3 + i for i in range(len(scales))], xticklabels=[f"scale {s}" for s in scales],
       ylabel="relative change of sharpness", title="same network, reparametrised")
ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
