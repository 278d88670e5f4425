"""Two gloo CPU processes: SAM's local vs global perturbation, SAF's global logit memory."""
import torch
import torch.distributed as dist
from gloo import run_on_gloo
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from quotientsharp.optim import SAF, SAM

WORLD = 2


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def gather(t):
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t)
    return out


def check_sam(rank, scope):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model = DDP(net)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    theta = flat(list(net.parameters())).detach().clone()
    local_g = flat(torch.autograd.grad(nn.functional.cross_entropy(net(x), y), list(net.parameters())))
    mean_g = local_g.clone()
    dist.all_reduce(mean_g)
    mean_g /= WORLD
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.5, model=model, perturbation=scope)
    seen = []

    def closure():
        seen.append(flat(list(net.parameters())).detach().clone())
        nn.functional.cross_entropy(model(x), y).backward()

    opt.step(closure)
    direction = mean_g if scope == "global" else local_g
    torch.testing.assert_close(seen[1], theta + 0.1 * direction / direction.norm())
    perturbed = gather(seen[1])
    assert torch.equal(*perturbed) == (scope == "global")
    after = gather(flat(list(net.parameters())).detach())
    assert torch.equal(*after), "the second pass must be synchronised"


def check_saf(rank, mode):
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    opt = SAF(model.parameters(), torch.optim.SGD, num_samples=8, num_classes=4, lag_epochs=1,
              start_epoch=0, lr=0.1, buffer_mode=mode)
    x_all = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    y_all = torch.arange(8) % 4
    for epoch in range(2):  # the sampler swaps the ranks' samples between epochs
        opt.set_epoch(epoch)
        idx = torch.arange(4) + 4 * ((rank + epoch) % WORLD)
        z = model(x_all[idx])
        if epoch == 0:
            written = gather(torch.cat([idx.float()[:, None], z.detach()], 1))
        loss = opt.loss(z, y_all[idx], idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    memories = gather(opt.logit_memory.contiguous())
    assert torch.equal(*memories) == (mode == "global")
    if mode == "global":
        rows = torch.cat(written)
        torch.testing.assert_close(opt.logit_memory[rows[:, 0].long(), 0], rows[:, 1:])
        assert opt.stats["stale_rows"] == 0
    else:
        assert opt.stats["stale_rows"] == 4  # every target at epoch 1 was written by the other rank


def worker(rank):
    for scope in ("local", "global"):
        check_sam(rank, scope)
    for mode in ("global", "per_rank_legacy"):
        check_saf(rank, mode)


def test_ddp_two_gloo_processes():
    run_on_gloo(worker, WORLD)
