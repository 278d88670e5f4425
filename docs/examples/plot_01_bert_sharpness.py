"""
Geodesic vs adaptive sharpness of a HuggingFace BERT
====================================================

A small ``BertForSequenceClassification`` is built from a config (nothing is downloaded),
trained for a few steps on a synthetic task, and measured. :func:`~quotientsharp.adapters.find_symmetries`
reads the per-head GL(h) blocks from the HF module names (``query/key/value``,
``attention.output.dense``); geodesic sharpness quotients them out, adaptive sharpness does not.
"""
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from quotientsharp import adaptive_sharpness, find_symmetries, geodesic_sharpness

torch.manual_seed(0)
config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=16, num_labels=2,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
model = BertForSequenceClassification(config)

# %%
# A synthetic task: is token 7 in the sequence? Batches are dicts with ``"labels"``, the form
# every measure accepts for HF models (the loss is applied to ``outputs.logits``).
ids = torch.randint(8, 50, (256, 12))
ids[::2, 3] = 7
labels = (ids == 7).any(1).long()
labels[torch.rand(256) < 0.15] ^= 1          # 15% label noise: the loss stays away from 0
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step in range(40):
    idx = torch.randint(0, 256, (32,))
    out = model(input_ids=ids[idx], labels=labels[idx])
    opt.zero_grad()
    out.loss.backward()
    opt.step()
model.eval()
print(f"training loss after 40 steps: {out.loss.item():.3f}")

batches = [{"input_ids": ids[i:i + 16], "labels": labels[i:i + 16]} for i in (0, 16)]

# %%
# The quotient: one GL(h) group holding every head's QK and VO blocks.
quotient = find_symmetries(model)
print(quotient.summary())
assert len(quotient.groups[0].blocks) == 4   # 2 layers x (QK, VO), 4 heads each

# %%
# Worst-case sharpness at a few radii. The mixed metric scales like ``|w|⁴`` while the inverse
# and adaptive metrics are dimensionless, so the same ρ means different things: the mixed metric
# gets its own, smaller radii (beyond them its perturbations exceed half a block's norm, where
# the second-order geodesic is unreliable and the measure warns). Compare a measure across
# models or radii, never raw values across metrics.
grids = {"geodesic (mix)": [0.001, 0.002, 0.004], "geodesic (inv)": [0.01, 0.03, 0.1],
         "adaptive": [0.01, 0.03, 0.1]}
results = {}
for name, rhos in grids.items():
    results[name] = []
    for rho in rhos:
        if name == "adaptive":
            res = adaptive_sharpness(model, batches, F.cross_entropy, rho, n_iter=8, progress=False)
        else:
            res = geodesic_sharpness(model, batches, F.cross_entropy, rho, quotient=quotient.with_metric(name[-4:-1]),
                                     n_iter=8, progress=False)
        # the ascent stays in the ball: every batch's best perturbation has metric norm <= rho
        assert all(e["xi_norm"] <= rho * (1 + 1e-6) for e in res.extras)
        assert res.value > 0  # a trained model is strictly sharper somewhere in the ball
        results[name].append(res.value)
    print(f"{name:16s}", "  ".join(f"rho={r:<6} {v:.4g}" for r, v in zip(rhos, results[name])))

fig, ax = plt.subplots(figsize=(4, 3))
for name, values in results.items():
    ax.plot(grids[name], values, "o-", label=name)
ax.set(xscale="log", yscale="log", xlabel="ρ", ylabel="worst-case sharpness", title="tiny BERT")
ax.legend()
fig.tight_layout()
