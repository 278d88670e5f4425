"""Data-parallel measures on two gloo CPU processes: equal to one process, uneven shards, refusals."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo import run_on_gloo
from test_sharpness_common import TinyAttentionClassifier

from quotientsharp.curvature import HessianOperator, hessian_max_eigenvalue, hessian_trace
from quotientsharp.distributed import DataParallel
from quotientsharp.measures import adaptive_sharpness, euclidean_sharpness, geodesic_sharpness

WORLD = 2
RTOL = 1e-10


def setup(n_batches, sizes=None):
    """A float64 attention classifier and ``n_batches`` batches (sizes 6, 6, …, or ``sizes``)."""
    torch.manual_seed(0)
    model = TinyAttentionClassifier().double()
    g = torch.Generator().manual_seed(1)
    sizes = sizes or [6] * n_batches
    return model, [(torch.randn(n, 5, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
                   for n in sizes]


def close(a, b, rtol=RTOL):
    assert abs(a - b) <= rtol * abs(b), (a, b)


def check_sharpness():
    kw = dict(rho=0.1, n_iter=6, n_restarts=1, progress=False)
    for sizes in ([6, 6, 6, 6, 4], [5]):  # 3 + 2 batches; one batch: rank 1 holds none
        model, batches = setup(len(sizes), sizes)
        one = geodesic_sharpness(model, batches, F.cross_entropy, **kw)
        many = geodesic_sharpness(model, batches, F.cross_entropy, distributed=True, **kw)
        close(many.value, one.value)
        assert many.per_batch == one.per_batch and many.config == one.config
        assert many.extras == one.extras and many.stderr == one.stderr
    model, batches = setup(2, [7, 6])  # one batch split by examples: 4 + 3 and 3 + 3
    one = geodesic_sharpness(model, batches, F.cross_entropy, **kw)
    split = geodesic_sharpness(model, batches, F.cross_entropy, distributed=True, split="examples", **kw)
    close(split.value, one.value, 1e-9)
    assert [e["error_increase"] for e in split.extras] == pytest.approx([e["error_increase"] for e in one.extras])


def check_hessian():
    model, batches = setup(3, [6, 6, 5])  # rank 0: batches 0 and 2, rank 1: batch 1
    op = HessianOperator(model, batches, F.cross_entropy, distributed=True)
    assert len(op.batches) == (2 if dist.get_rank() == 0 else 1)
    assert sum(op.batch_weights) == pytest.approx(11 / 17 if dist.get_rank() == 0 else 6 / 17)
    kw = dict(seed=3, progress=False)
    close(hessian_trace(model, batches, F.cross_entropy, n_probes=20, distributed=True, **kw).value,
          hessian_trace(model, batches, F.cross_entropy, n_probes=20, **kw).value)
    close(hessian_max_eigenvalue(model, batches, F.cross_entropy, distributed=True, **kw).value,
          hessian_max_eigenvalue(model, batches, F.cross_entropy, **kw).value)
    model, batches = setup(1)  # rank 1 holds no batch
    single = HessianOperator(model, batches, F.cross_entropy)
    op = HessianOperator(model, batches, F.cross_entropy, process_group=dist.group.WORLD)
    assert len(op.batches) == (1 if dist.get_rank() == 0 else 0)  # the group alone shards the batches
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(op @ v, single @ v, rtol=0, atol=0)


def check_refusals():
    model, batches = setup(2)
    if dist.get_rank() == 1:
        with torch.no_grad():
            model.head.weight[0, 0] += 1e-12
    for measure in (geodesic_sharpness, adaptive_sharpness, euclidean_sharpness):  # every entry point checks
        with pytest.raises(ValueError, match="different weights"):
            measure(model, batches, F.cross_entropy, 0.1, distributed=True, progress=False)
    with pytest.raises(ValueError, match="different weights"):
        HessianOperator(model, batches, F.cross_entropy, distributed=True)
    model, batches = setup(2 + dist.get_rank())
    with pytest.raises(ValueError, match="different loaders"):
        HessianOperator(model, batches, F.cross_entropy, distributed=True)


def worker(rank):
    check_sharpness()
    check_hessian()
    check_refusals()


def test_two_gloo_processes_equal_one():
    run_on_gloo(worker, WORLD)


def test_single_process_plan():
    dp = DataParallel()
    index, batches, sizes = dp.shard([(torch.zeros(2, 1), torch.zeros(2)), (torch.zeros(3, 1), torch.zeros(3))], "cpu")
    assert (index, sizes, dp.world) == ([0, 1], [2, 3], 1)
    with pytest.raises(ValueError, match="init_process_group"):
        geodesic_sharpness(*setup(1), F.cross_entropy, 0.1, distributed=True, progress=False)
    with pytest.raises(ValueError, match="split must be"):
        geodesic_sharpness(*setup(1), F.cross_entropy, 0.1, split="rows", progress=False)
