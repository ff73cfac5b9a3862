"""SyncBatchNorm that also runs on CPU (gloo): torch's nn.SyncBatchNorm is CUDA/XPU only.

Batch statistics are all-reduced over the default process group in forward, and the two
gradient sums in backward, with the same formulas as nn.SyncBatchNorm, so a CPU torchrun
job trains like a GPU one. Parameter gradients stay local; the trainer averages them.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn as nn


class _SyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0] + list(range(2, x.dim()))
        n_local = x.numel() // x.shape[1]
        xd = x.double()
        stats = torch.cat([xd.sum(dims), (xd * xd).sum(dims),
                           torch.tensor([float(n_local)], dtype=torch.float64, device=x.device)])
        tdist.all_reduce(stats)
        C = x.shape[1]
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        shape = [1, C] + [1] * (x.dim() - 2)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.to(x.dtype).view(shape)
        ctx.save_for_backward(xhat, weight, invstd.to(x.dtype))
        ctx.n = float(n)
        y = xhat * weight.view(shape) + bias.view(shape)
        unbiased = var * n / (n - 1).clamp_min(1)
        return y, mean.to(x.dtype), unbiased.to(x.dtype)

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        xhat, weight, invstd = ctx.saved_tensors
        dims = [0] + list(range(2, gy.dim()))
        C = gy.shape[1]
        shape = [1, C] + [1] * (gy.dim() - 2)
        sum_dy = gy.sum(dims)
        sum_dy_xhat = (gy * xhat).sum(dims)
        local = torch.cat([sum_dy, sum_dy_xhat])
        total = local.clone()
        tdist.all_reduce(total)
        mean_dy = (total[:C] / ctx.n).view(shape)
        mean_dy_xhat = (total[C:] / ctx.n).view(shape)
        gx = (gy - mean_dy - xhat * mean_dy_xhat) * (invstd * weight).view(shape)
        return gx, sum_dy_xhat, sum_dy, None


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over all processes; same parameters and buffers as BN."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sync = (self.training and tdist.is_available() and tdist.is_initialized()
                and tdist.get_world_size() > 1)
        if not sync:
            return super().forward(x)
        y, mean, var = _SyncBN.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach(), alpha=m)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace BatchNorm layers by a synchronised version: torch's on CUDA, ours elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module
