"""Learning-rate schedules, applied per iteration (a method owns one per optimiser): the
reference's poly schedule (``WarmUpPolyLR``) and a constant one."""
from __future__ import annotations

from typing import Iterable

import torch


class PolyLR:
    """lr(t) = base * t / warmup for t < warmup, else base * (1 - t / (total + eps)) ** power.

    As in the reference the poly term uses t / total even after a warm-up, and t counts
    iterations over the whole run (epoch * niters_per_epoch + idx). ``eps`` (0 by default)
    is LPL's 1e-5 added to the total (``itr / (max_itr + 1e-5)``); it changes the last
    iterations' rates by up to ~1e-5 relative.
    """

    def __init__(self, base_lr: float, power: float, total_iters: int, warmup_iters: int = 0,
                 eps: float = 0.0):
        if total_iters <= 0:
            raise ValueError(f"PolyLR total_iters must be positive, got {total_iters}")
        if eps < 0:
            raise ValueError(f"PolyLR eps must be >= 0, got {eps}")
        self.base_lr = base_lr
        self.power = power
        self.total_iters = total_iters
        self.warmup_iters = warmup_iters
        self.eps = eps

    def get_lr(self, t: int) -> float:
        if self.warmup_iters > 0 and t < self.warmup_iters:
            return self.base_lr * (t / self.warmup_iters)
        # eps == 0 divides by the integer total, exactly as before the option existed
        total = self.total_iters + self.eps if self.eps else self.total_iters
        return self.base_lr * (1 - t / total) ** self.power


class ConstantLR:
    """lr(t) = base for every t (e.g. a reference that never decays an optimiser's LR)."""

    def __init__(self, base_lr: float):
        self.base_lr = base_lr

    def get_lr(self, t: int) -> float:
        return self.base_lr


def set_lr(optimizers: Iterable[torch.optim.Optimizer], lr: float) -> None:
    """Write ``lr`` into every parameter group of every optimiser (as the reference does),
    times the group's ``lr_mult`` where a method sets one (e.g. U2PL's 10x decoder lr)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
