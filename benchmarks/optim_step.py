"""Step time and peak memory of SGD, SAM, ASAM, RSAM, SAF, MESA and GeodesicSAM on one small ViT.

Every method trains the same ``TinyViT`` (same initial weights) on the same batches in one run;
methods are timed in interleaved rounds and the median per-step time of the rounds is reported
as a ratio to plain SGD (momentum 0.9) and to SAM. Peak memory: ``torch.cuda.max_memory_allocated`` on
CUDA; on CPU the peak of the running sum of allocations recorded by the PyTorch profiler
(op granularity, approximate to ~1 MiB here) while building the model and optimizer and taking
two steps; "resident" memory is exact: the live tensors (weights, grads, optimizer and method
state) after those steps. Writes
``benchmarks/results/optim_step.json`` and prints a table.

Clock: on CPU this process's CPU time (``benchmarks/timing.py``, ``clock="process"``: other jobs on
shared cores do not count; one torch thread), on CUDA synchronised wall time. Allocator: on CPU
with glibc, ``--malloc no-trim`` (default) fixes glibc's trim and mmap thresholds (``mallopt``, as
``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_`` would) so that freed activation memory stays in
the heap, as with jemalloc/tcmalloc or a GPU caching allocator. With glibc's default dynamic
thresholds, whether a step's short-lived tensors (MESA's no-grad teacher forward on top of the
student's saved activations) are handed back to the OS and page-faulted in again on the next step
depends on the heap layout left by everything else in the process: it added 0–16% of an SGD step
to MESA from run to run. ``minor_page_faults_per_step`` records it; ``--malloc default`` keeps
glibc's behaviour.

    python benchmarks/optim_step.py --quick      # < 1 minute on 2 CPU cores
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from quotientsharp.models.vit import TinyViT
from quotientsharp.optim import ASAM, MESA, RSAM, SAF, SAM, GeodesicSAM

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/timing.py
from timing import timed  # noqa: E402

try:
    import resource
except ImportError:  # not on Windows
    resource = None

METHODS = ("SGD", "SAM", "ASAM", "RSAM", "SAF", "MESA", "GeodesicSAM")
TEACHER_FORWARD = "MESA teacher forward"
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (indices, images, labels)
SGD_KWARGS = dict(lr=0.05, momentum=0.9)


def make_batches(n_batches: int, batch_size: int, device: torch.device) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(n_batches):
        idx = torch.arange(b * batch_size, (b + 1) * batch_size)
        x = torch.randn(batch_size, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (batch_size,), generator=g)
        out.append((idx.to(device), x.to(device), y.to(device)))
    return out


def build(method: str, num_samples: int, device: torch.device) -> Callable[[Batch], None]:
    """A fresh model (seed 0) and optimizer; returns ``train_step(batch)``."""
    torch.manual_seed(0)
    model = TinyViT(image_size=8, patch_size=2, in_channels=1, n_classes=10).to(device)
    params = model.parameters()
    if method == "SGD":
        opt = torch.optim.SGD(params, **SGD_KWARGS)
    elif method in ("SAM", "ASAM", "RSAM", "GeodesicSAM"):
        if method == "SAM":
            opt = SAM(params, torch.optim.SGD, rho=0.05, model=model, **SGD_KWARGS)
        elif method == "ASAM":
            opt = ASAM(model.named_parameters(), torch.optim.SGD, rho=0.5, model=model, **SGD_KWARGS)
        elif method == "RSAM":
            opt = RSAM(params, torch.optim.SGD, rho=0.65, alpha=1.2, warmup_epochs=-1, model=model, **SGD_KWARGS)
        else:  # mixed GL metric on the attention blocks, adaptive metric elsewhere, 2nd-order geodesic
            opt = GeodesicSAM(params, torch.optim.SGD, rho=0.5, model=model, **SGD_KWARGS)

        def sharpness_aware_step(batch: Batch) -> None:
            _, x, y = batch
            opt.step(lambda: F.cross_entropy(model(x), y).backward())

        return sharpness_aware_step
    elif method == "SAF":
        opt = SAF(params, torch.optim.SGD, num_samples=num_samples, num_classes=10,
                  lag_epochs=1, start_epoch=0, **SGD_KWARGS)
    elif method == "MESA":
        opt = MESA(params, torch.optim.SGD, model=model, start_epoch=0, **SGD_KWARGS)
    else:
        raise ValueError(method)
    if isinstance(opt, (SAF, MESA)):
        opt.set_epoch(1)  # KL active; SAF's memory is filled for epoch 0 by warm_up()

    def one_pass_step(batch: Batch) -> None:
        idx, x, y = batch
        logits = model(x)
        if isinstance(opt, SAF):
            loss = opt.loss(logits, y, idx)
        elif isinstance(opt, MESA):
            loss = opt.loss(logits, y, x)
        else:
            loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    one_pass_step.optimizer = opt  # type: ignore[attr-defined]
    return one_pass_step


def warm_up(step: Callable[[Batch], None], batches: list[Batch]) -> None:
    """Fill SAF's epoch-0 slot for every sample, then take warm-up steps at epoch 1."""
    opt = getattr(step, "optimizer", None)
    if isinstance(opt, SAF):
        opt.set_epoch(0)
        for b in batches:
            step(b)
        opt.set_epoch(1)
    for b in batches[:2]:
        step(b)


def time_steps(step: Callable[[Batch], None], batches: list[Batch], n_steps: int,
               device: torch.device) -> tuple[float, float]:
    """(seconds per step, minor page faults per step) over ``n_steps`` steps."""
    def run() -> None:
        for i in range(n_steps):
            step(batches[i % len(batches)])

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0
    seconds = timed(run, str(device), clock="process")
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) if resource else float("nan")
    return seconds / n_steps, faults / n_steps


def set_malloc(mode: str) -> str:
    """``"no-trim"``: glibc keeps freed memory (trim threshold 1 GiB, mmap threshold 32 MiB, no
    dynamic adjustment); ``"default"``: glibc's dynamic thresholds. Returns what was done."""
    if mode == "default":
        return "glibc default (dynamic trim/mmap thresholds)"
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "not glibc: allocator left as is"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20)):
        return "mallopt refused: glibc default"
    return "glibc mallopt: M_TRIM_THRESHOLD=1 GiB, M_MMAP_THRESHOLD=32 MiB (no trimming)"


def live_tensor_bytes(exclude: set[int]) -> int:
    """Bytes of the distinct storages of all live Python tensors, except those at ``exclude``."""
    gc.collect()
    seen, total = set(exclude), 0
    with warnings.catch_warnings():  # isinstance on deprecated torch.distributed objects warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.device.type != "meta":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def memory_bytes(method: str, batches: list[Batch], device: torch.device) -> tuple[int, int]:
    """(peak, resident) bytes of building ``method`` and taking two steps; nothing else alive.

    Resident: live tensors after the steps (weights, grads, optimizer and method state).
    """
    num_samples = len(batches) * batches[0][0].numel()
    batch_storages = {t.untyped_storage().data_ptr() for b in batches for t in b}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step = build(method, num_samples, device)
        for b in batches[:2]:
            step(b)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step = build(method, num_samples, device)
            for b in batches[:2]:
                step(b)
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        current = peak = 0
        for e in events:
            current += e.self_cpu_memory_usage
            peak = max(peak, current)
    resident = live_tensor_bytes(batch_storages)
    del step
    return peak, resident


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (< 1 min on 2 cores)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=31, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--malloc", choices=("no-trim", "default"), default="no-trim",
                        help="CPU glibc allocator thresholds (see the module docstring)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "optim_step.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 4, 15
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    malloc = set_malloc(args.malloc) if device.type == "cpu" else "CUDA caching allocator"
    batches = make_batches(args.batches, args.batch_size, device)
    num_samples = args.batches * args.batch_size

    peak, resident = {}, {}
    for m in METHODS:  # first, while no other model is alive
        peak[m], resident[m] = memory_bytes(m, batches, device)

    steps = {m: build(m, num_samples, device) for m in METHODS}
    for step in steps.values():
        warm_up(step, batches)
    mesa_opt = steps["MESA"].optimizer  # type: ignore[attr-defined]
    # MESA's floor: its teacher's no-grad forward alone, timed like a step (not a method).
    steps[TEACHER_FORWARD] = lambda batch: mesa_opt.teacher_logits(batch[1])
    timed_names = (*METHODS, TEACHER_FORWARD)
    rounds: dict[str, list[float]] = {m: [] for m in timed_names}
    faults: dict[str, list[float]] = {m: [] for m in timed_names}
    for r in range(args.rounds):
        order = timed_names[r % len(timed_names):] + timed_names[: r % len(timed_names)]  # spread drift
        for m in order:
            seconds_per_step, faults_per_step = time_steps(steps[m], batches, args.steps, device)
            rounds[m].append(seconds_per_step)
            faults[m].append(faults_per_step)
    seconds = {m: statistics.median(ts) for m, ts in rounds.items()}
    teacher_forward = seconds.pop(TEACHER_FORWARD)

    saf_opt = steps["SAF"].optimizer  # type: ignore[attr-defined]
    result = {
        "time_ratio_vs_sgd": {m: seconds[m] / seconds["SGD"] for m in METHODS},
        "time_ratio_vs_sam": {m: seconds[m] / seconds["SAM"] for m in METHODS},
        "memory_ratio_vs_sgd": {m: peak[m] / peak["SGD"] for m in METHODS},
        "memory_ratio_vs_sam": {m: peak[m] / peak["SAM"] for m in METHODS},
        "resident_memory_ratio_vs_sgd": {m: resident[m] / resident["SGD"] for m in METHODS},
        "mesa_teacher_forward_vs_sgd": teacher_forward / seconds["SGD"],
        "mesa_floor_vs_sgd": "1 + mesa_teacher_forward_vs_sgd: MESA's one extra (no-grad) forward per step",
        "step_seconds_median": seconds,
        "step_seconds_rounds": rounds,
        "minor_page_faults_per_step": {m: statistics.median(f) for m, f in faults.items()},
        "peak_memory_bytes": peak,
        "resident_memory_bytes": resident,
        "extra_resident_bytes_vs_sgd": {m: resident[m] - resident["SGD"] for m in METHODS},
        "saf_logit_memory_bytes": saf_opt.memory_bytes,
        "saf_logit_memory_formula": f"N*C*(E+1)*4 = {num_samples}*10*2*4",
        "setup": {
            "model": "TinyViT(image_size=8, patch_size=2, in_channels=1, n_classes=10)",
            "n_parameters": sum(p.numel() for p in TinyViT(8, 2, 1, 10).parameters()),
            "batch_size": args.batch_size, "batches": args.batches, "steps_per_round": args.steps,
            "rounds": args.rounds, "threads": args.threads, "device": str(device),
            "torch": torch.__version__, "quick": args.quick,
            "clock": "CUDA-synchronised wall time" if device.type == "cuda" else "process CPU time",
            "malloc": malloc,
            "memory_method": ("peak: cuda max_memory_allocated" if device.type == "cuda"
                              else "peak: profiler allocation trace (op granularity)")
            + "; resident: live tensor storages after build + 2 steps",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'method':<11} {'ms/step':>8} {'time/SGD':>9} {'time/SAM':>9} {'peak MiB':>9} {'peak/SGD':>9} "
          f"{'peak/SAM':>9} {'resident MiB':>13} {'resident/SGD':>13}")
    for m in METHODS:
        print(f"{m:<11} {1e3 * seconds[m]:8.2f} {result['time_ratio_vs_sgd'][m]:9.2f} "
              f"{result['time_ratio_vs_sam'][m]:9.2f} {peak[m] / 2**20:9.2f} "
              f"{result['memory_ratio_vs_sgd'][m]:9.2f} {result['memory_ratio_vs_sam'][m]:9.2f} "
              f"{resident[m] / 2**20:13.3f} {result['resident_memory_ratio_vs_sgd'][m]:13.2f}")
    print(f"MESA's teacher forward alone: {result['mesa_teacher_forward_vs_sgd']:.2f}x an SGD step "
          f"(MESA's floor: {1 + result['mesa_teacher_forward_vs_sgd']:.2f}x)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
