"""Scaling: a sharpness measure on 1 vs 2 gloo processes, a population sweep on 1 vs 2 Ray workers.

* ``sharpness``: geodesic sharpness (mixed metric) of a small ViT on ``n_batches`` batches, every
  process on one thread, the batches split across ranks (:mod:`quotientsharp.distributed`);
  median over repeats of the measure's wall time (after a barrier, process start-up excluded)
  and CPU time of the busiest rank, and the check that the distributed value equals the
  single-process one.
* ``sweep``: the measurement stage of a diagonal-network study (training cached) sequentially in
  this process and on local Ray with ``num_cpus`` 1 and 2 (:mod:`quotientsharp.studies.parallel`);
  Ray's start-up is timed apart (its workers' first imports are not), and the summaries must
  match the sequential one.

Timings on a shared machine depend on its load (``load_average_before`` is recorded).

Writes ``benchmarks/results/scaling.json`` and prints a table.

    python benchmarks/scaling.py --quick      # ~1-2 min on 2 CPU cores
    python benchmarks/scaling.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from quotientsharp.adapters import find_symmetries
from quotientsharp.measures import geodesic_sharpness
from quotientsharp.models import TinyViT
from quotientsharp.studies import diagonal as D

RESULT = Path(__file__).parent / "results" / "scaling.json"


# --------------------------------------------------------------------------- torch.distributed
def _problem(n_batches: int, batch_size: int):
    torch.manual_seed(0)
    model = TinyViT(image_size=8, patch_size=2, d_model=32, depth=2, n_heads=4, mlp_dim=64)
    g = torch.Generator().manual_seed(0)
    return model, [(torch.randn(batch_size, 1, 8, 8, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
                   for _ in range(n_batches)]


def _rank(rank: int, world: int, port: int, args: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, batches = _problem(args["n_batches"], args["batch_size"])
        quotient = find_symmetries(model, "mix")
        times, cpu = [], []
        for _ in range(args["repeats"]):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            r = geodesic_sharpness(model, batches, F.cross_entropy, 0.1, quotient=quotient, n_iter=args["n_iter"],
                                   progress=False, distributed=True)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        busiest = torch.tensor([statistics.median(cpu)], dtype=torch.float64)
        dist.all_reduce(busiest, dist.ReduceOp.MAX)
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": statistics.median(times), "cpu_seconds": busiest.item(),
                                             "value": r.value}))
    finally:
        dist.destroy_process_group()


def time_sharpness(world: int, args: dict) -> dict:
    """Median wall seconds, CPU seconds of the busiest rank and value on ``world`` gloo processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(_rank, args=(world, port, args, f.name), nprocs=world, join=True)
        return json.loads(Path(f.name).read_text())


# --------------------------------------------------------------------------- Ray
def _without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "measure_seconds"}


def time_sweep(n_models: int, n_iter: int, cpus: list[int]) -> dict:
    """Seconds of the study's measurement stage: sequential, then on Ray with each ``num_cpus``."""
    import ray

    from quotientsharp.studies.parallel import RayExecutor

    config = D.study_config(rhos=(0.05, 0.1), n_iter=n_iter, n_restarts=1, ode_rhos=[])
    config["models"] = [m for m in D.population(50) if m["alpha"] >= 0.2][:n_models]
    config["n_boot"] = 200
    root = Path(tempfile.mkdtemp(prefix="qs_scaling_"))
    out = {"n_models": n_models}
    try:
        D.run_study(root / "train", config, progress=False)  # trains once; the timed runs reuse it
        t0 = time.perf_counter()
        expected = D.run_study(_fresh(root, "seq"), config, progress=False)
        out["sequential"] = time.perf_counter() - t0
        for k in cpus:
            t0 = time.perf_counter()
            ray.init(num_cpus=k, include_dashboard=False, log_to_driver=False)
            out[f"ray_start_{k}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            summary = D.run_study(_fresh(root, f"ray{k}"), config, progress=False, executor=RayExecutor())
            out[f"ray_{k}"] = time.perf_counter() - t0
            ray.shutdown()
            assert _without_timing(summary) == _without_timing(expected), "Ray changed the summary"
    finally:
        shutil.rmtree(root)
    return out


def _fresh(root: Path, name: str) -> Path:
    """A new study folder holding only the cached training."""
    shutil.copytree(root / "train" / "train", root / name / "train")
    return root / name


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches, models and repeats")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray sweep")
    args = parser.parse_args(argv)
    sharp = dict(n_batches=4, batch_size=64, n_iter=20, repeats=2) if args.quick else \
        dict(n_batches=8, batch_size=64, n_iter=20, repeats=3)
    result = {"machine": {"cpus": os.cpu_count(), "load_average_before": os.getloadavg(),
                          "platform": platform.platform(), "torch": torch.__version__},
              "sharpness": {"config": sharp}}
    runs = {w: time_sharpness(w, sharp) for w in (1, 2)}
    assert runs[2]["value"] == runs[1]["value"], "the distributed value differs from one process"
    for w, r in runs.items():
        result["sharpness"].update({f"seconds_{w}": r["seconds"], f"cpu_seconds_busiest_rank_{w}": r["cpu_seconds"]})
    result["sharpness"].update(speedup=runs[1]["seconds"] / runs[2]["seconds"], value=runs[1]["value"])
    if not args.no_ray:
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sweep = time_sweep(6 if args.quick else 12, 100, [1, 2])
        result["sweep"] = sweep | {"speedup_2_vs_1": sweep["ray_1"] / sweep["ray_2"],
                                   "speedup_2_vs_sequential": sweep["sequential"] / sweep["ray_2"]}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1))
    print(table(result))
    return result


def table(result: dict) -> str:
    s = result["sharpness"]
    lines = ["| workload | 1 worker (s) | 2 workers (s) | speedup |", "|---|---|---|---|",
             f"| geodesic sharpness, {s['config']['n_batches']} batches, gloo processes | {s['seconds_1']:.2f} | "
             f"{s['seconds_2']:.2f} | {s['speedup']:.2f}x |",
             f"| (CPU seconds of the busiest rank) | {s['cpu_seconds_busiest_rank_1']:.2f} | "
             f"{s['cpu_seconds_busiest_rank_2']:.2f} | "
             f"{s['cpu_seconds_busiest_rank_1'] / s['cpu_seconds_busiest_rank_2']:.2f}x |"]
    if "sweep" in result:
        w = result["sweep"]
        lines.append(f"| diagonal sweep, {w['n_models']} models, Ray workers (sequential {w['sequential']:.2f} s; "
                     f"Ray start {w['ray_start_2']:.1f} s) | {w['ray_1']:.2f} | {w['ray_2']:.2f} | "
                     f"{w['speedup_2_vs_1']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
