"""The CPU SyncBatchNorm: two gloo processes on half batches equal BatchNorm on the whole."""
import os

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from helpers import free_port
from furnace.engine.syncbn import convert_sync_batchnorm


def _worker(rank, port, x, gy, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    bn = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)),
                                torch.device("cpu"))
    bn.train()
    xs = x.chunk(2)[rank].clone().requires_grad_(True)
    y = bn(xs)
    y.backward(gy.chunk(2)[rank])
    g = bn[0].weight.grad.clone()
    tdist.all_reduce(g)  # the trainer sums (then averages) parameter gradients
    out[rank] = (y.detach(), xs.grad, g, bn[0].running_mean.clone(), bn[0].running_var.clone())
    tdist.destroy_process_group()


def test_two_process_syncbn_equals_full_batch_bn():
    torch.manual_seed(1)
    x, gy = torch.randn(4, 3, 5, 6) * 2 + 1, torch.randn(4, 3, 5, 6)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), x, gy, out), nprocs=2, join=True)
    bn = torch.nn.BatchNorm2d(3).train()
    xf = x.clone().requires_grad_(True)
    y = bn(xf)
    y.backward(gy)
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), y.detach())
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]), xf.grad)
    torch.testing.assert_close(out[0][2], bn.weight.grad)
    for r in (0, 1):
        torch.testing.assert_close(out[r][3], bn.running_mean)
        torch.testing.assert_close(out[r][4], bn.running_var)
