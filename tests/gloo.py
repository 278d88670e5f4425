"""Run a test body on two (or more) gloo CPU processes."""
import gc
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, body, port, world):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        body(rank)
        gc.collect()  # free DDP reducers / buffers before the group goes (else gloo may abort at exit)
        dist.barrier()  # tear down together: a rank destroying the group early aborts its peer
    finally:
        dist.destroy_process_group()


def run_on_gloo(body, world: int = 2) -> None:
    """``body(rank)`` (a module-level function) on ``world`` processes in one gloo group; a failure
    on any rank fails the caller."""
    mp.spawn(_entry, args=(body, free_port(), world), nprocs=world, join=True)
