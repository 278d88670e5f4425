"""
Data-parallel measures on two gloo processes
============================================

Every sharpness measure and Hessian estimator takes ``distributed=True`` (the default process
group) or ``process_group=`` (:mod:`quotientsharp.distributed`). Each rank passes the same model
and loader; rank ``r`` of ``W`` keeps batches ``r, r+W, …``. Sharpness: each rank solves its
batches and the per-batch values are all-gathered, so the result equals the single-process one
bit for bit. Hessian: gradients and Hessian-vector products are all-reduced, so every rank runs
the same Lanczos iteration.

Here two CPU processes in one gloo group on localhost (on GPUs: ``torchrun`` and ``"nccl"``).
The processes are forked so that the worker can be defined in this script.
"""
import json
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from quotientsharp import geodesic_sharpness, hessian_max_eigenvalue
from quotientsharp.models import TinyViT


def setup():
    """The same model and batches on every rank (seeded)."""
    torch.manual_seed(0)
    model = TinyViT(image_size=8, patch_size=4, n_classes=3, d_model=16, depth=1, n_heads=2, mlp_dim=16).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g))
               for _ in range(4)]
    return model.eval(), batches


def measure(**kw):
    model, batches = setup()
    geo = geodesic_sharpness(model, batches, F.cross_entropy, rho=0.01, n_iter=8, progress=False, **kw)
    lam = hessian_max_eigenvalue(model, batches, F.cross_entropy, progress=False, **kw)
    return {"geodesic": geo.value, "per_batch": geo.per_batch, "lambda_max": lam.value}


def worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = measure(distributed=True)      # rank 0 solves batches 0 and 2, rank 1 batches 1 and 3
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


with socket.socket() as s:                       # a free port on localhost
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
with tempfile.TemporaryDirectory() as out:
    mp.start_processes(worker, args=(port, out), nprocs=2, join=True, start_method="fork")
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]

single = measure()
for r, res in enumerate(ranks):
    print(f"rank {r}: geodesic sharpness {res['geodesic']:.15g}, λ_max {res['lambda_max']:.12g}")
print(f"1 process: geodesic sharpness {single['geodesic']:.15g}, λ_max {single['lambda_max']:.12g}")

# %%
# Both ranks return the single-process result: sharpness bit for bit (each batch is solved by
# exactly one rank), the eigenvalue up to the summation order of the all-reduce.
for res in ranks:
    assert res["geodesic"] == single["geodesic"] and res["per_batch"] == single["per_batch"]
    assert abs(res["lambda_max"] - single["lambda_max"]) <= 1e-9 * abs(single["lambda_max"])
