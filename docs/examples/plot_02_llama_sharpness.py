"""
Sharpness of a Llama-config model (GQA, rotary)
===============================================

Grouped-query attention and rotary embeddings break part of the per-head GL(h) symmetry. What is
left is found from the module structure and config: on QK one complex scalar per rotation plane
per KV group, ``(ℂ*)^{h/2}``, and on VO a full GL(h) per KV group. The metric, Christoffel term
and geodesics stay those of the GL blocks; the horizontal projection becomes a small batched
``k × k`` solve over the subgroup's Lie algebra (see :doc:`/geometry`).
"""
import torch
import torch.nn.functional as F
import transformers

from quotientsharp import adaptive_sharpness, find_symmetries, geodesic_sharpness

torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, vocab_size=64)
model = transformers.LlamaForCausalLM(cfg).double().eval()

# %%
# What the adapter found, per layer:
quotient = find_symmetries(model)
print(quotient.summary())
assert "rotary" in quotient.summary() and "GL(8)" in quotient.summary()

# %%
# Next-token prediction on random tokens; the loss flattens the sequence dimension.
ids = torch.randint(0, 64, (8, 12))
batches = [(ids, ids.roll(-1, 1))]


def loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


geo = geodesic_sharpness(model, batches, loss, rho=0.01, quotient=quotient, n_iter=8, progress=False)
ada = adaptive_sharpness(model, batches, loss, rho=0.01, n_iter=8, progress=False)
print(f"geodesic (mix): {geo.value:.4g}   adaptive: {ada.value:.4g}")

# %%
# The residual group acts without changing the network; a full GL(h) on QK would break the
# rotary embedding. Apply a random element of the residual group to every block and compare the
# logits and the geodesic sharpness.
w = dict(model.named_parameters())
g = quotient.random_element(w, scale=0.5, generator=torch.Generator().manual_seed(1))
moved = quotient.action({n: p.detach() for n, p in w.items()}, g)
twin = transformers.LlamaForCausalLM(cfg).double().eval()
twin.load_state_dict({**model.state_dict(), **moved})
with torch.no_grad():
    logit_change = (twin(ids).logits - model(ids).logits).abs().max().item()
geo_twin = geodesic_sharpness(twin, batches, loss, rho=0.01, n_iter=8, progress=False)
rel = abs(geo_twin.value - geo.value) / geo.value
# (HF computes RMSNorm in float32, so round-off far below float32 precision does not reach the
# logits: they agree to the last bit here.)
print(f"max logit change under the residual group: {logit_change:.2e}")
print(f"geodesic sharpness: {geo.value:.12g} -> {geo_twin.value:.12g} (relative change {rel:.1e})")
assert logit_change < 1e-9 and rel < 1e-9
