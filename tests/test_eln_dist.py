"""Gradient averaging when ranks disagree on which parameters have a gradient (ELN's gates and
empty terms are per reference group, so per rank)."""
import os

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from helpers import free_port
from furnace.engine.dist import DistInfo, average_gradients


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        a.grad = torch.full((3,), float(rank + 1))      # both ranks: averaged
        if rank == 0:
            b.grad = torch.full((3,), 4.0)              # rank 0 only: (4 + 0) / 2
        average_gradients([a, b, c], DistInfo(rank=rank, world_size=2))
        out[rank] = (a.grad.tolist(), b.grad.tolist(), c.grad)
    finally:
        tdist.destroy_process_group()


def test_a_gradient_on_one_rank_only_is_averaged_with_zero():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        a, b, c = out[rank]
        assert a == [1.5] * 3 and b == [2.0] * 3 and c is None
