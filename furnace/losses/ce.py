"""The supervised cross-entropy of the VOC configs, safe on a batch without labelled pixels.

``nn.CrossEntropyLoss(ignore_index=255)`` averages over the labelled pixels, so a batch whose
labels are all 255 gives 0/0 = NaN, and training stops blaming the learning rate. Such a batch
carries no supervised signal: it contributes 0 (and zero gradients). Every other batch gets the
same value and gradients as the reference loss (the same kernel; no host synchronisation).
"""
from __future__ import annotations

import torch
from torch import nn


class SupervisedCrossEntropy(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` (default ``ignore_index=255``) that returns 0 instead of NaN
    when every target pixel is ignored (mean reduction).

    logits [B,C,H,W] float, target [B,H,W] int64; returns a scalar in nats.
    """

    def __init__(self, ignore_index: int = 255, **kwargs):
        super().__init__(ignore_index=ignore_index, **kwargs)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = super().forward(input, target)
        if self.reduction != "mean":
            return loss
        labelled = (target != self.ignore_index).any()
        # where() passes a zero gradient into the NaN branch, and the kernel's gradient is
        # zero at ignored pixels, so no NaN reaches the logits
        return torch.where(labelled, loss, torch.zeros_like(loss))
