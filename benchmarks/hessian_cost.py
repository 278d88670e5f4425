"""Cost of Hessian-vector products: quotientsharp's modes vs one gradient and vs curvlinops.

Model: a small ViT-like transformer (8×8 one-channel images, 2×2 patches → 16 tokens, one block
of :class:`quotientsharp.models.attention.MultiHeadSelfAttention` with pre-LayerNorm and an MLP,
10 classes) on random data, float32, cross-entropy. All timings are medians over repeats, taken
in the same process, and reported as ratios to one gradient (forward + backward) on the same batch.

- ``hvp``: one :meth:`HessianOperator.matvec` per mode; ``matmat8``: per-vector time of an
  8-column :meth:`HessianOperator.matmat` (graph reuse / vmap).
- curvlinops: ``HessianLinearOperator`` (jvp over jacrev, vmapped) ``@ v`` on the same batch.
- Peak memory: CPU allocations recorded by the torch profiler (``profile_memory=True``), replayed
  with ``torch.profiler._memory_profiler.MemoryProfile``; peak bytes allocated above the state at
  entry, as a ratio to the gradient's peak. (tracemalloc does not see torch's CPU allocator.)
- Top eigenvalue: our Lanczos (tol 1e-4) vs curvlinops ``to_scipy()`` + ``scipy.sparse.linalg.eigsh``
  (k=1, which="LA", tol 1e-4), wall time and relative error against a tight Lanczos reference.

SLQ section (``slq_comparison``, issue 17): 8-probe SLQ (m = 15) on the study-sized transformer
(28×28 images, 7×7 patches → 16 tokens, d_model 64, two batches of 256), today's sequential
algorithm (``lockstep=False``: probe after probe, one matvec per Lanczos step; for the quotient
Hessian with the per-column geometry of before, :class:`PerColumnQuotientHessian`) vs lockstep
(``lockstep=True``: one 8-column matmat per step), for the plain Hessian and the quotient Hessian
(mix metric): process CPU time, one torch thread, interleaved round-robin repeats, medians, ratios
lockstep/sequential, and the agreement of the two results (quadrature nodes, trace, Rényi α = 0.5, 1.5).

Usage: ``python benchmarks/hessian_cost.py [--quick] [--section all|slq]``; writes
benchmarks/results/hessian_cost.json (``--section slq`` updates only its ``"slq"`` entry).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quotientsharp.curvature import DEFAULT_HVP_MODE, HessianOperator, QuotientHessianOperator, lanczos
from quotientsharp.models.attention import MultiHeadSelfAttention

RESULTS = Path(__file__).parent / "results" / "hessian_cost.json"
sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/timing.py


class TinyTransformer(nn.Module):
    """Patch embedding → pre-LN block (MHSA + MLP) → LayerNorm → mean pool → linear head."""

    def __init__(self, image_size=8, patch_size=2, d_model=64, n_heads=4, n_classes=10):
        super().__init__()
        self.patch_size = patch_size
        n_tokens = (image_size // patch_size) ** 2
        self.embed = nn.Linear(patch_size**2, d_model)
        self.position = nn.Parameter(0.02 * torch.randn(n_tokens, d_model))
        self.norm1, self.norm2, self.norm_out = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attention = MultiHeadSelfAttention(d_model, n_heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, images):
        p = self.patch_size
        patches = F.unfold(images, p, stride=p).transpose(1, 2)  # (b, tokens, p²)
        x = self.embed(patches) + self.position
        x = x + self.attention(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm_out(x).mean(1))


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn) -> int:
    """Peak CPU bytes allocated by torch during ``fn()`` above the state at entry."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def main(quick: bool) -> dict:
    torch.manual_seed(0)
    batch = 32 if quick else 128
    repeats = 5 if quick else 15
    model = TinyTransformer()
    images, labels = torch.randn(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    data = [(images, labels)]
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)

    def gradient():
        loss = F.cross_entropy(model(images), labels)
        return torch.autograd.grad(loss, params)

    ops = {mode: HessianOperator(model, data, F.cross_entropy, mode=mode, check_deterministic=False)
           for mode in ("reverse_over_reverse", "forward_over_reverse")}
    from curvlinops import HessianLinearOperator

    curvlinops_op = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, data, check_deterministic=False)
    v = torch.randn(n, dtype=torch.float64)
    V = torch.randn(n, 8, dtype=torch.float64)
    v32, V32 = v.float(), V.float()

    t_grad = median_time(gradient, repeats)
    m_grad = peak_memory(gradient)
    timings = {mode: median_time(lambda: op.matvec(v), repeats) for mode, op in ops.items()}
    timings_matmat = {mode: median_time(lambda: op.matmat(V), repeats) / 8 for mode, op in ops.items()}
    memory = {mode: peak_memory(lambda: op.matvec(v)) for mode, op in ops.items()}
    t_curvlinops = median_time(lambda: curvlinops_op @ v32, repeats)
    t_curvlinops_matmat = median_time(lambda: curvlinops_op @ V32, repeats) / 8
    m_curvlinops = peak_memory(lambda: curvlinops_op @ v32)

    reference = ops["reverse_over_reverse"].matvec(v)
    agreement = {
        mode: float((op.matvec(v) - reference).norm() / reference.norm()) for mode, op in ops.items()
    }
    agreement["curvlinops"] = float(((curvlinops_op @ v32).double() - reference).norm() / reference.norm())

    default = DEFAULT_HVP_MODE
    eig = top_eigenvalue_comparison(ops[default], curvlinops_op)
    slq_result = slq_comparison(quick)
    result = {
        "model": {"name": "TinyTransformer(d_model=64, 4 heads, 16 tokens)", "n_params": n, "batch": batch,
                  "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "machine": platform.machine()},
        "repeats": repeats,
        "gradient_seconds": t_grad,
        "hvp_seconds": timings,
        "hvp_ratio_vs_grad": {mode: t / t_grad for mode, t in timings.items()},
        "matmat8_per_vector_ratio_vs_grad": {mode: t / t_grad for mode, t in timings_matmat.items()},
        "curvlinops_hvp_ratio_vs_grad": t_curvlinops / t_grad,
        "curvlinops_matmat8_per_vector_ratio_vs_grad": t_curvlinops_matmat / t_grad,
        "hvp_ratio_vs_curvlinops": timings[default] / t_curvlinops,
        "hvp_ratio_vs_curvlinops_by_mode": {mode: t / t_curvlinops for mode, t in timings.items()},
        "matmat8_ratio_vs_curvlinops": timings_matmat[default] / t_curvlinops_matmat,
        "peak_memory_bytes": {"gradient": m_grad, **memory, "curvlinops": m_curvlinops},
        "peak_memory_ratio_vs_grad": {k: m / m_grad for k, m in {**memory, "curvlinops": m_curvlinops}.items()},
        "memory_method": "torch.profiler profile_memory + _memory_profiler.MemoryProfile timeline (CPU allocator)",
        "relative_difference_vs_reverse_over_reverse_fp32": agreement,
        "default_mode": default,
        "quick": quick,
        "top_eigenvalue": eig,
        "slq": slq_result,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print_table(result)
    return result


class PerColumnQuotientHessian(QuotientHessianOperator):
    """The quotient Hessian as it was before lockstep SLQ (commit debfdb5), kept as the baseline:
    geometry one column at a time (projection, Christoffel form by ``autograd.grad``, gradient
    conversion, metric, probe whitening), the HVPs of a block still sharing one graph per batch."""

    def metric_matvec(self, v):
        zeta = {n: torch.zeros_like(t, requires_grad=True) for n, t in self.point.items()}
        with torch.enable_grad():
            value = self.quotient.inner(self.point, self.to_dict(v), zeta)
            out = torch.autograd.grad(value, list(zeta.values()), materialize_grads=True)
        return self.to_flat(dict(zip(zeta, out)))

    def christoffel_matvec(self, v):
        leaf = {n: t.detach().requires_grad_() for n, t in self.to_dict(v).items()}
        with torch.enable_grad():
            gamma = self.quotient.christoffel(self.point, leaf)
            value = 0.5 * sum((self._gradient[n] * gamma[n]).sum() for n in self.param_names)
            if not value.requires_grad:
                return torch.zeros_like(v, dtype=torch.float64)
            out = torch.autograd.grad(value, list(leaf.values()), materialize_grads=True)
        return self.to_flat(dict(zip(leaf, out)))

    def project(self, v):
        return self.to_flat(self.quotient.horizontal_projection(self.point, self.to_dict(v)))

    def riemannian_gradient(self, g):
        return self.to_flat(self.quotient.riemannian_gradient(self.point, self.to_dict(g)))

    def matmat(self, V):
        U = torch.stack([self.project(V[:, j]) for j in range(V.shape[1])], 1)
        HU = self.hessian.matmat(U)
        return torch.stack([self.riemannian_gradient(HU[:, j] - self.christoffel_matvec(U[:, j]))
                            for j in range(V.shape[1])], 1)

    def sample_probes(self, count, seed=0, distribution=None, generator=None):
        generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        zeta = torch.randn(self.n, count, generator=generator, dtype=torch.float64).to(self.device)
        columns = []
        for j in range(count):
            z = self.project(self.to_flat(self.quotient.whiten(self.point, self.to_dict(zeta[:, j]))))
            columns.append(z * (self.n_horizontal / self.inner(z, z)).sqrt())
        return torch.stack(columns, 1)


def slq_comparison(quick: bool) -> dict:
    """Sequential (today) vs lockstep 8-probe SLQ on the study-sized transformer (module docstring).

    Variants, timed round robin: the plain Hessian sequential/lockstep; the quotient Hessian
    sequential with the per-column geometry of before (:class:`PerColumnQuotientHessian`, "today"),
    sequential with the column-batched geometry, and lockstep."""
    from timing import timed

    from quotientsharp.curvature import renyi_entropy, slq

    torch.manual_seed(0)
    batch, repeats, m, n_probes = (64, 1, 15, 8) if quick else (256, 3, 15, 8)
    model = TinyTransformer(image_size=28, patch_size=7, d_model=64)
    data = [(torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))) for _ in range(2)]
    hessian = HessianOperator(model, data, F.cross_entropy)
    quotient = QuotientHessianOperator(model, data, F.cross_entropy, metric="mix", eps_rel=1e-6)
    today_quotient = PerColumnQuotientHessian(model, data, F.cross_entropy, metric="mix", eps_rel=1e-6)
    variants = {  # (operator, variant): (op, lockstep)
        ("hessian", "sequential"): (hessian, False),
        ("hessian", "lockstep"): (hessian, True),
        ("quotient_hessian", "sequential"): (today_quotient, False),
        ("quotient_hessian", "sequential_batched_geometry"): (quotient, False),
        ("quotient_hessian", "lockstep"): (quotient, True),
    }
    seconds = {key: [] for key in variants}
    results = {}

    def run(key):
        op, lockstep = variants[key]
        results[key] = slq(op, m, n_probes, seed=0, progress=False, lockstep=lockstep)

    components = slq_components(hessian, data[0], n_probes, repeats=5)
    for op, lockstep in variants.values():  # warm-up (lazy imports, allocator) outside the timings
        slq(op, 2, 2, seed=0, progress=False, lockstep=lockstep)
    for _ in range(repeats):  # round robin: every variant once per repeat
        for key in variants:
            seconds[key].append(timed(lambda: run(key), "cpu", clock="process"))
    out = {"model": {"name": "TinyTransformer(image 28, patch 7, d_model 64, 4 heads, 16 tokens)",
                     "n_params": hessian.n, "batches": [batch, batch], "dtype": "float32",
                     "threads": torch.get_num_threads()},
           "m": m, "n_probes": n_probes, "repeats": repeats, "clock": "process CPU time (time.process_time)",
           "seconds": {}, "ratio_lockstep_vs_sequential": {}, "agreement": {}}
    # what lockstep cannot save: m·P HVPs per batch on graphs built once per batch
    floor = len(data) * (m * components["hvp_block_seconds"] + components["graph_build_seconds"])
    out["components"] = {**components, "lockstep_floor_seconds": floor,
                         "lockstep_floor_ratio_vs_sequential": floor / statistics.median(seconds[("hessian", "sequential")])}
    for name in ("hessian", "quotient_hessian"):
        times = {v: statistics.median(t) for (o, v), t in seconds.items() if o == name}
        out["seconds"][name] = {**times, "all": {v: t for (o, v), t in seconds.items() if o == name}}
        out["ratio_lockstep_vs_sequential"][name] = times["lockstep"] / times["sequential"]
        a, b = results[(name, "sequential")], results[(name, "lockstep")]
        out["agreement"][name] = {
            "max_node_difference_relative": float((a.nodes - b.nodes).abs().max() / a.nodes.abs().max()),
            "max_weight_difference": float((a.weights - b.weights).abs().max()),
            "trace": [a.trace().value, b.trace().value],
            **{f"renyi_{alpha}": [renyi_entropy(a, alpha).estimate, renyi_entropy(b, alpha).estimate]
               for alpha in (0.5, 1.5)},
        }
    return out


def slq_components(op: HessianOperator, batch, n_columns: int, repeats: int) -> dict:
    """Process CPU time, one batch: a gradient, building the double-backward graph
    (``create_graph=True`` gradient), and one ``n_columns``-column HVP block on the built graph."""
    from timing import timed

    params = list(op.target.values())
    V = op.layout.unflatten_columns(torch.randn(op.n, n_columns, dtype=torch.float64), op.compute_dtype)

    def gradient():
        leaves = [p.detach().requires_grad_() for p in params]
        loss = op.batch_loss(dict(zip(op.param_names, leaves)), batch)
        return torch.autograd.grad(loss, leaves)

    with op.context():
        apply = op.batch_product(batch)
        apply(V)
        times = {"gradient_seconds": [], "graph_build_seconds": [], "hvp_block_seconds": []}
        for _ in range(repeats):
            times["gradient_seconds"].append(timed(gradient, "cpu", clock="process"))
            times["graph_build_seconds"].append(timed(lambda: op.batch_product(batch), "cpu", clock="process"))
            times["hvp_block_seconds"].append(timed(lambda: apply(V), "cpu", clock="process"))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["hvp_block_columns"] = n_columns
    out["hvp_per_column_vs_gradient"] = out["hvp_block_seconds"] / n_columns / out["gradient_seconds"]
    return out


def print_slq(r: dict) -> None:
    print(f"SLQ m={r['m']}, {r['n_probes']} probes, {r['model']['n_params']} params, batches {r['model']['batches']}, "
          f"{r['clock']}, median of {r['repeats']}:")
    for name, t in r["seconds"].items():
        agree = r["agreement"][name]
        batched = (f" (sequential, batched geometry {t['sequential_batched_geometry']:.2f} s)"
                   if "sequential_batched_geometry" in t else "")
        print(f"  {name:<18} sequential {t['sequential']:7.2f} s  lockstep {t['lockstep']:7.2f} s  "
              f"ratio {r['ratio_lockstep_vs_sequential'][name]:.2f}  max rel. node diff "
              f"{agree['max_node_difference_relative']:.1e}{batched}")
    c = r["components"]
    print(f"  per batch: gradient {c['gradient_seconds']:.3f} s, graph build {c['graph_build_seconds']:.3f} s, "
          f"{c['hvp_block_columns']}-column HVP block {c['hvp_block_seconds']:.3f} s "
          f"({c['hvp_per_column_vs_gradient']:.2f}x a gradient per column); lockstep floor (HVPs only) "
          f"{c['lockstep_floor_seconds']:.2f} s = {c['lockstep_floor_ratio_vs_sequential']:.2f}x sequential")


def top_eigenvalue_comparison(op, curvlinops_op) -> dict:
    from scipy.sparse.linalg import eigsh

    reference = float(lanczos(op, 1, tol=1e-10, m=120, progress=False).eigenvalues[0])
    start = time.perf_counter()
    ours = lanczos(op, 1, tol=1e-4, progress=False)
    t_ours = time.perf_counter() - start
    scipy_op = curvlinops_op.to_scipy()
    start = time.perf_counter()
    theirs = eigsh(scipy_op, k=1, which="LA", tol=1e-4, return_eigenvectors=False)
    t_theirs = time.perf_counter() - start
    return {
        "reference": reference,
        "quotientsharp_lanczos": {"seconds": t_ours, "matvecs": ours.n_matvecs,
                                  "rel_error": abs(float(ours.eigenvalues[0]) - reference) / abs(reference)},
        "curvlinops_eigsh": {"seconds": t_theirs,
                             "rel_error": abs(float(theirs[0]) - reference) / abs(reference)},
        "time_ratio": t_ours / t_theirs,
    }


def print_table(r: dict) -> None:
    print(f"model: {r['model']['name']}, {r['model']['n_params']} params, batch {r['model']['batch']}, "
          f"{r['model']['threads']} threads; gradient {1e3 * r['gradient_seconds']:.2f} ms")
    print(f"{'method':<34}{'time/grad':>10}{'matmat8/grad':>14}{'mem/grad':>10}{'rel.diff':>11}")
    for mode in r["hvp_ratio_vs_grad"]:
        print(f"{mode:<34}{r['hvp_ratio_vs_grad'][mode]:>10.2f}{r['matmat8_per_vector_ratio_vs_grad'][mode]:>14.2f}"
              f"{r['peak_memory_ratio_vs_grad'][mode]:>10.2f}{r['relative_difference_vs_reverse_over_reverse_fp32'][mode]:>11.1e}")
    print(f"{'curvlinops HessianLinearOperator':<34}{r['curvlinops_hvp_ratio_vs_grad']:>10.2f}"
          f"{r['curvlinops_matmat8_per_vector_ratio_vs_grad']:>14.2f}{r['peak_memory_ratio_vs_grad']['curvlinops']:>10.2f}"
          f"{r['relative_difference_vs_reverse_over_reverse_fp32']['curvlinops']:>11.1e}")
    print(f"default mode {r['default_mode']}: HVP time / curvlinops = {r['hvp_ratio_vs_curvlinops']:.2f}, "
          f"matmat8 / curvlinops = {r['matmat8_ratio_vs_curvlinops']:.2f}")
    e = r["top_eigenvalue"]
    print_slq(r["slq"])
    print(f"top eigenvalue {e['reference']:.6g}: Lanczos {e['quotientsharp_lanczos']['seconds']:.3f} s "
          f"({e['quotientsharp_lanczos']['matvecs']} matvecs, rel.err {e['quotientsharp_lanczos']['rel_error']:.1e}) vs "
          f"curvlinops+eigsh {e['curvlinops_eigsh']['seconds']:.3f} s (rel.err {e['curvlinops_eigsh']['rel_error']:.1e})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few repeats (< 1 minute)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--section", choices=("all", "slq"), default="all",
                        help="slq: only the SLQ comparison (one thread), merged into the existing JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.section == "slq":
        torch.set_num_threads(args.threads or 1)
        existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        existing["slq"] = slq_comparison(args.quick)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(existing, indent=2))
        print_slq(existing["slq"])
    else:
        main(args.quick)
