"""Cost of geodesic sharpness relative to adaptive sharpness (spec part 2 §4).

One small transformer (``quotientsharp.models.TinyViT``), the same batches and the same number of
ascent iterations for every measure: geodesic (mixed metric, inverse metric, mixed metric with the
exact RK4 geodesic: ``--exact-steps`` fixed steps, its gradient by the discrete adjoint of
:mod:`quotientsharp.geodesic`), adaptive and Euclidean worst-case sharpness. Times are medians over repeats
run round-robin; peak memory is the peak of live tensor bytes during one extra run on one batch
(CUDA: the allocator's peak; CPU: the torch profiler's allocation timeline, skipped by ``--quick``
because profiling is slow). Writes
``benchmarks/results/sharpness_cost.json`` and prints a table.

    python benchmarks/sharpness_cost.py --quick      # < 1 min on 2 CPU cores
    python benchmarks/sharpness_cost.py              # the full run
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
from quotientsharp.measures import adaptive_sharpness, euclidean_sharpness, geodesic_sharpness
from quotientsharp.models import TinyViT

RESULT = Path(__file__).parent / "results" / "sharpness_cost.json"


def make_problem(batch_size: int, n_batches: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyViT(image_size=8, patch_size=2, d_model=64, depth=2, n_heads=4, mlp_dim=128).to(device)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(batch_size, 1, 8, 8, generator=g).to(device),
                torch.randint(0, 10, (batch_size,), generator=g).to(device)) for _ in range(n_batches)]
    return model, batches


def measures(model, rho: float, n_iter: int, exact_steps: int):
    """name -> zero-argument callable (quotients found once, outside the timings)."""
    common = dict(rho=rho, n_iter=n_iter, progress=False)
    q_mix, q_inv = find_symmetries(model, "mix"), find_symmetries(model, "inv")
    return {
        "adaptive": lambda b: adaptive_sharpness(model, b, F.cross_entropy, **common),
        "geodesic_mix": lambda b: geodesic_sharpness(model, b, F.cross_entropy, quotient=q_mix, **common),
        "geodesic_inv": lambda b: geodesic_sharpness(model, b, F.cross_entropy, quotient=q_inv, **common),
        "geodesic_exact": lambda b: geodesic_sharpness(model, b, F.cross_entropy, quotient=q_mix, geodesic="exact",
                                                       ode_steps=exact_steps, ode_tol=None, **common),
        "euclidean": lambda b: euclidean_sharpness(model, b, F.cross_entropy, **common),
    }


def peak_bytes(fn, device: str) -> int:
    """Peak of live tensor bytes allocated while ``fn()`` runs."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (< 1 min on 2 CPU cores)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--n-batches", type=int)
    ap.add_argument("--n-iter", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--exact-steps", type=int, default=8, help="fixed RK4 steps of the exact geodesic")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULT)
    a = ap.parse_args(argv)
    quick = dict(batch_size=256, n_batches=1, n_iter=10, repeats=3)
    full = dict(batch_size=256, n_batches=2, n_iter=20, repeats=5)
    cfg = {k: getattr(a, k) if getattr(a, k) is not None else (quick if a.quick else full)[k] for k in full}
    torch.set_num_threads(a.threads)
    model, batches = make_problem(cfg["batch_size"], cfg["n_batches"], a.device)
    fns = measures(model, a.rho, cfg["n_iter"], a.exact_steps)
    for fn in fns.values():  # warm-up (allocator, lazy init)
        fn(batches[:1])
    times = {name: [] for name in fns}
    for _ in range(cfg["repeats"]):  # round-robin, so drifts hit every measure alike
        for name, fn in fns.items():
            times[name].append(timed(lambda: fn(batches), a.device))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    with_memory = a.device.startswith("cuda") or not a.quick  # the CPU profiler is slow
    peak = {name: peak_bytes(lambda: fn(batches[:1]), a.device) if with_memory else None
            for name, fn in fns.items()}
    ratios = {name: median[name] / median["adaptive"] for name in fns if name != "adaptive"}
    mem_ratios = {name: peak[name] / peak["adaptive"] if with_memory else None for name in fns if name != "adaptive"}
    report = {
        "ratios_vs_adaptive": ratios,
        "memory_ratios_vs_adaptive": mem_ratios,
        "median_seconds": median,
        "all_seconds": times,
        "peak_bytes": peak,
        "targets": {"geodesic_mix": 1.10, "geodesic_inv": 1.25, "geodesic_exact": 2.0},
        "config": {**cfg, "quick": a.quick, "rho": a.rho, "exact_rk4_steps": a.exact_steps, "device": a.device,
                   "threads": a.threads, "model": "TinyViT(8x8, patch 2, d=64, depth 2, 4 heads, mlp 128)",
                   "n_parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
                   "machine": platform.processor() or platform.machine()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(f"{'measure':16s} {'median s':>10s} {'x adaptive':>11s} {'peak MiB':>9s} {'mem x':>7s}")
    for name in fns:
        r, m = ratios.get(name, 1.0), mem_ratios.get(name, 1.0)
        mem = f"{peak[name] / 2**20:9.1f} {m:7.2f}" if with_memory else f"{'-':>9s} {'-':>7s}"
        print(f"{name:16s} {median[name]:10.3f} {r:11.3f} {mem}")
    print(f"wrote {a.out}")
    return report


if __name__ == "__main__":
    main()
