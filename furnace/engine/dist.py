"""Devices and torchrun: one CPU, one CUDA device, or a DDP process group (NCCL or gloo).

The faithful DUEB step runs each branch twice with gradients (supervised and student pass)
before a single backward, which DistributedDataParallel's reducer does not allow. So instead
of wrapping the model in DDP we broadcast the initial weights once and average the gradients
explicitly after backward (one flattened all-reduce per parameter bucket). BatchNorm layers
become SyncBatchNorm so that batch statistics, and hence running stats, agree across ranks.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as tdist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_device(spec: Optional[str]) -> torch.device:
    """``-d`` of the train scripts: '' (auto), 'cpu', '0', 'cuda:1'. One device per process."""
    spec = (spec or "").strip().lower()
    if spec in ("", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    idx = spec.split(":")[-1]
    if not idx.isdigit() or "," in spec or "-" in spec:
        raise ValueError(f"-d/--devices for training takes one device ('cpu', '0', 'cuda:1'), "
                         f"got {spec!r}; for several GPUs use torchrun --nproc_per_node=N")
    if not torch.cuda.is_available() or int(idx) >= torch.cuda.device_count():
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(f"-d {spec}: CUDA device {idx} is not available ({n} visible); "
                         "use -d cpu or a valid device id")
    return torch.device(f"cuda:{idx}")


def setup(device_spec: Optional[str] = None, local_rank: Optional[int] = None) -> DistInfo:
    """Initialise the process group under torchrun (WORLD_SIZE > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=parse_device(device_spec))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank or 0))
    use_cuda = torch.cuda.is_available() and (device_spec or "").lower() != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device(f"cuda:{local_rank}")
    else:
        device = torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo",
                                 timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not info.distributed:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        tdist.broadcast(t.data, src=0)


def average_gradients(params: Iterable[torch.nn.Parameter], info: DistInfo,
                      bucket_bytes: int = 64 << 20) -> None:
    """All-reduce and average the gradients of ``params`` in flattened buckets.

    A parameter with a gradient on some ranks but none on others (a method whose losses
    depend on each rank's data: a gate that opens on one rank only, an empty term) gets a zero
    gradient on the others first, so every rank reduces the same buckets and the average is
    what one process holding every rank's batch would compute; a parameter without a
    gradient on every rank keeps none (optimisers skip it)."""
    if not info.distributed:
        return
    params = list(params)
    if not params:
        return
    dev = next((p.grad.device for p in params if p.grad is not None), params[0].device)
    has = torch.tensor([float(p.grad is not None) for p in params], device=dev)
    tdist.all_reduce(has, op=tdist.ReduceOp.MAX)
    for p, h in zip(params, has.tolist()):
        if h > 0 and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            tdist.all_reduce(flat)
            flat /= info.world_size
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``t`` over ranks (for logging)."""
    if not info.distributed:
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t / info.world_size


def max_rank_divergence(module: torch.nn.Module, info: DistInfo) -> float:
    """Largest absolute difference of any parameter between this rank and rank 0 (0 if single)."""
    if not info.distributed:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])
    ref = flat.clone()
    tdist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    tdist.all_reduce(diff, op=tdist.ReduceOp.MAX)
    return float(diff)
