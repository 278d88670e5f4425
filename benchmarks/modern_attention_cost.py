"""Cost of geodesic sharpness on a modern LLM layout relative to adaptive sharpness (issue 14).

A Llama-config causal LM built from config (grouped-query attention with rotary embeddings, so the
QK blocks carry the rotary sub-algebra and its k x k projection, VO the full GL(h) per KV group),
the same batches and the same number of ascent iterations for every measure: geodesic sharpness
with the mixed and the inverse metric, and adaptive sharpness. Times are medians over repeats run
round-robin (CPU: process CPU time, robust to other jobs on shared cores). Writes ``benchmarks/results/modern_attention_cost.json`` and prints a table.

    python benchmarks/modern_attention_cost.py --quick     # < 1 min on 2 CPU cores
    python benchmarks/modern_attention_cost.py             # the full run
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import timed

from quotientsharp.adapters import find_symmetries
from quotientsharp.measures import adaptive_sharpness, geodesic_sharpness

RESULT = Path(__file__).parent / "results" / "modern_attention_cost.json"
LLAMA = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=344, vocab_size=512, max_position_embeddings=128)


def make_problem(batch_size: int, seq_len: int, n_batches: int, device: str, seed: int = 0):
    import transformers
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(attn_implementation="sdpa", **LLAMA)).to(device)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, LLAMA["vocab_size"], (batch_size, seq_len), generator=g).to(device)
        batches.append((ids, torch.roll(ids, -1, 1)))
    return model, batches


def lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def measures(model, rho: float, n_iter: int):
    """name -> callable(batches) (quotients found once, outside the timings)."""
    common = dict(rho=rho, n_iter=n_iter, progress=False)
    q_mix, q_inv = find_symmetries(model, "mix"), find_symmetries(model, "inv")
    return {
        "adaptive": lambda b: adaptive_sharpness(model, b, lm_loss, **common),
        "geodesic_mix": lambda b: geodesic_sharpness(model, b, lm_loss, quotient=q_mix, **common),
        "geodesic_inv": lambda b: geodesic_sharpness(model, b, lm_loss, quotient=q_inv, **common),
    }, q_mix


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 1 min on 2 CPU cores)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--n-batches", type=int)
    ap.add_argument("--n-iter", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULT)
    a = ap.parse_args(argv)
    quick = dict(batch_size=16, seq_len=32, n_batches=1, n_iter=5, repeats=3)
    full = dict(batch_size=32, seq_len=64, n_batches=2, n_iter=10, repeats=5)
    cfg = {k: getattr(a, k) if getattr(a, k) is not None else (quick if a.quick else full)[k] for k in full}
    torch.set_num_threads(a.threads)
    model, batches = make_problem(cfg["batch_size"], cfg["seq_len"], cfg["n_batches"], a.device)
    fns, q = measures(model, a.rho, cfg["n_iter"])
    for fn in fns.values():  # warm-up (allocator, lazy init)
        fn(batches[:1])
    times = {name: [] for name in fns}
    for _ in range(cfg["repeats"]):  # round-robin, so drifts hit every measure alike
        for name, fn in fns.items():
            times[name].append(timed(lambda: fn(batches), a.device, clock="process"))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {name: median[name] / median["adaptive"] for name in fns if name != "adaptive"}
    targets = {"geodesic_mix": 1.10, "geodesic_inv": 1.25}
    report = {
        "ratios_vs_adaptive": ratios,
        "within_targets": {k: ratios[k] <= v for k, v in targets.items()},
        "median_seconds": median,
        "all_seconds": times,
        "targets": targets,
        "symmetries": q.summary().splitlines(),
        "config": {**cfg, "quick": a.quick, "rho": a.rho, "device": a.device, "threads": a.threads,
                   "model": f"LlamaForCausalLM({LLAMA})",
                   "n_parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
                   "machine": platform.processor() or platform.machine()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(q.summary())
    print(f"{'measure':16s} {'median s':>10s} {'x adaptive':>11s} {'target':>7s}")
    for name in fns:
        print(f"{name:16s} {median[name]:10.3f} {ratios.get(name, 1.0):11.3f} {targets.get(name, ''):>7}")
    print(f"wrote {a.out}")
    return report


if __name__ == "__main__":
    main()
