"""Cost of sharpness measures at real size (issue 17): BERT-base and ViT-B/16 built from their
HuggingFace configs (no download), one batch, float32.

Per model, side by side in one process (round-robin repeats, medians):

- ``passes``: ``n_iter`` plain forward+backward passes (``zero_grad(set_to_none=True)``, loss,
  ``backward``), the work the ascent's iterations need;
- ``adaptive``: adaptive sharpness, ``n_iter`` ascent iterations (plus the base and the final
  forward);
- ``geodesic_mix`` / ``geodesic_inv``: geodesic sharpness on the GL(h) quotient of every attention
  head, same iterations.

Times: process CPU time with one torch thread on CPU (other jobs on shared cores do not count),
wall time between synchronisations on CUDA (:func:`timing.timed`). Memory: the peak above the
resident set (CPU, sampled every 2 ms from ``/proc/self/statm`` in a fresh subprocess per measure,
so no allocator state carries over) or above ``torch.cuda.memory_allocated`` (CUDA,
``max_memory_allocated``) at the start of one call; ``train_step`` is the peak of one
forward+backward pass, the budget of adaptive sharpness is ``train_step + 4 x parameter bytes``.

    python benchmarks/real_size.py --quick            # 4-layer BERT of width 768, minutes on CPU
    python benchmarks/real_size.py                    # BERT-base and ViT-B/16 (~1 h on one CPU thread)
    python benchmarks/real_size.py --device cuda      # the same on a GPU

Results go to ``benchmarks/results/real_size.json`` under ``"quick"`` or ``"full"`` (the other run
is kept); the top-level ``"ratios"`` are those of the ``--quick`` BERT (the acceptance figures;
the full run's BERT when no quick run is stored).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import timed

RESULT = Path(__file__).parent / "results" / "real_size.json"
MEASURES = ("passes", "adaptive", "geodesic_mix", "geodesic_inv")
TARGETS = {"adaptive_vs_passes": 1.3, "geodesic_mix_vs_adaptive": 1.10, "geodesic_inv_vs_adaptive": 1.25,
           "memory_geodesic_mix_vs_adaptive": 1.2, "memory_geodesic_inv_vs_adaptive": 1.2,
           "memory_adaptive_vs_budget": 1.0}


def build(name: str, device: str, seed: int = 0):
    """``(model, batch)``: a HuggingFace model from its default config (float32, eval mode) and one
    seeded batch (BERT: 8 x 128 tokens; ViT: 8 images of 3 x 224 x 224)."""
    from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if name.startswith("bert"):
        layers = {"bert_base": 12, "bert_quick": 4}[name]
        config = BertConfig(num_hidden_layers=layers)
        model = BertForSequenceClassification(config)
        ids = torch.randint(0, config.vocab_size, (8, 128), generator=g)
        inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        targets = torch.randint(0, config.num_labels, (8,), generator=g)
    elif name == "vit_b16":
        config = ViTConfig(num_labels=1000)
        model = ViTForImageClassification(config)
        inputs = {"pixel_values": torch.randn(8, 3, 224, 224, generator=g).to(device)}
        targets = torch.randint(0, config.num_labels, (8,), generator=g)
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.to(device).eval(), (inputs, targets.to(device))


def calls(model, batch, n_iter: int, rho: float):
    """measure name -> zero-argument callable (quotients found once, outside the timings)."""
    from quotientsharp.adapters import find_symmetries
    from quotientsharp.measures import adaptive_sharpness, geodesic_sharpness

    inputs, targets = batch

    def passes():
        for _ in range(n_iter):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(**inputs).logits, targets).backward()
        model.zero_grad(set_to_none=True)

    common = dict(rho=rho, n_iter=n_iter, progress=False)
    q_mix, q_inv = find_symmetries(model, "mix"), find_symmetries(model, "inv")
    return {
        "passes": passes,
        "adaptive": lambda: adaptive_sharpness(model, [batch], F.cross_entropy, **common),
        "geodesic_mix": lambda: geodesic_sharpness(model, [batch], F.cross_entropy, quotient=q_mix, **common),
        "geodesic_inv": lambda: geodesic_sharpness(model, [batch], F.cross_entropy, quotient=q_inv, **common),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn, device: str) -> int:
    """Peak bytes above the state at the start of ``fn()`` (see the module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    start, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - start


def _memory_child(name, measure, device, n_iter, rho, queue):
    torch.set_num_threads(1)
    model, batch = build(name, device)
    if measure == "train_step":
        fn = calls(model, batch, 1, rho)["passes"]
    else:
        fn = calls(model, batch, n_iter, rho)[measure]
    queue.put(peak_memory(fn, device))


def memory_of(name: str, measure: str, device: str, n_iter: int, rho: float) -> int:
    """:func:`peak_memory` of one measure; on CPU in a fresh (spawned) process."""
    if device.startswith("cuda"):
        model, batch = build(name, device)
        fn = calls(model, batch, 1 if measure == "train_step" else n_iter, rho)
        return peak_memory(fn["passes" if measure == "train_step" else measure], device)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_memory_child, args=(name, measure, device, n_iter, rho, queue))
    child.start()
    value = queue.get()
    child.join()
    return value


def run_model(name: str, device: str, n_iter: int, rho: float, repeats: int, memory: bool, log) -> dict:
    model, batch = build(name, device)
    n_params = sum(p.numel() for p in model.parameters())
    fns = calls(model, batch, n_iter, rho)
    times: dict[str, list[float]] = {k: [] for k in fns}
    values = {}
    clock = "process" if device == "cpu" else "wall"
    for r in range(repeats):
        for k, fn in fns.items():
            out = {}
            times[k].append(timed(lambda fn=fn, out=out: out.setdefault("r", fn()), device, clock))
            if out["r"] is not None:
                values[k] = out["r"].value
            log(f"{name} repeat {r}: {k} {times[k][-1]:.1f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {"adaptive_vs_passes": med["adaptive"] / med["passes"],
              "geodesic_mix_vs_adaptive": med["geodesic_mix"] / med["adaptive"],
              "geodesic_inv_vs_adaptive": med["geodesic_inv"] / med["adaptive"]}
    out = {"n_params": n_params, "param_bytes": 4 * n_params, "seconds": med, "all_seconds": times,
           "values": values, "ratios": ratios}
    if memory:
        mem = {m: memory_of(name, m, device, n_iter, rho) for m in ("train_step", *MEASURES[1:])}
        log(f"{name} memory (MB): " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in mem.items()))
        budget = mem["train_step"] + 4 * out["param_bytes"]
        out["memory_bytes"] = {**mem, "adaptive_budget": budget}
        ratios.update({"memory_geodesic_mix_vs_adaptive": mem["geodesic_mix"] / mem["adaptive"],
                       "memory_geodesic_inv_vs_adaptive": mem["geodesic_inv"] / mem["adaptive"],
                       "memory_adaptive_vs_budget": mem["adaptive"] / budget})
    out["meets_targets"] = {k: v <= TARGETS[k] for k, v in ratios.items()}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 4-layer BERT of width 768 only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=None, help="bert_quick, bert_base, vit_b16")
    parser.add_argument("--n-iter", type=int, default=10)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 2 quick, 1 full)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULT, help="result file (merged into when it exists)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.models or (["bert_quick"] if args.quick else ["bert_base", "vit_b16"])
    repeats = args.repeats or (2 if args.quick else 1)

    def log(msg):
        if not args.quiet:
            print(msg, flush=True)

    run = {"config": {"device": args.device, "n_iter": args.n_iter, "rho": args.rho, "repeats": repeats,
                      "threads": args.threads, "dtype": "float32", "batch": "BERT 8 x 128 tokens; ViT 8 x 3 x 224 x 224",
                      "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                      "date": time.strftime("%Y-%m-%d")},
           "targets": TARGETS,
           "models": {m: run_model(m, args.device, args.n_iter, args.rho, repeats, not args.no_memory, log)
                      for m in models}}
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["quick" if args.quick else "full"] = run
    main_run = results.get("quick", run)  # the acceptance figures: the --quick BERT when there is one
    bert = next((m for m in main_run["models"] if m.startswith("bert")), next(iter(main_run["models"])))
    results["ratios"] = main_run["models"][bert]["ratios"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for m, r in run["models"].items():
        log(f"{m}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["ratios"].items()))
    return results


if __name__ == "__main__":
    main()
