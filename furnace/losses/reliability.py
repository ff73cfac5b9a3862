"""Entropy-based pixel reliability (U2PL, spec methods/U2PL.md 3.6 and 3.7 A).

A pixel's reliability is the entropy of the teacher's softmax there. The unsupervised loss
keeps the pseudo labels of the pixels below a batch percentile of that entropy; the
percentile rises with the epochs ("dynamic partition adjustment"), so fewer pixels are
dropped as the teacher improves. The contrastive loss draws anchors from the lowest and
negatives from the highest ``alpha_t`` percent of the same entropies.

Percentiles are NumPy's default (linear interpolation), computed per process over the local
batch, as the reference.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["entropy", "percentile", "keep_percent", "unreliable_percent",
           "reliable_pseudo_label_loss", "entropy_masks"]


def entropy(prob: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Entropy in nats of probabilities along ``dim``: -sum p log(p + 1e-10).

    prob [B,C,H,W] -> [B,H,W] (the 1e-10 keeps zero probabilities finite, as the reference)."""
    return -(prob * torch.log(prob + 1e-10)).sum(dim)


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``numpy.percentile(values, q)`` with linear interpolation, as a 0-d tensor.

    values: any shape, flattened; q in [0, 100]. Unlike ``torch.quantile`` there is no size
    limit (a Cityscapes batch has over a million pixels)."""
    x = values.detach().flatten()
    if x.numel() == 0:
        raise ValueError("percentile of an empty set (no valid pixel in the batch)")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    x = torch.sort(x).values
    pos = q / 100.0 * (x.numel() - 1)
    lo = int(pos)                      # pos >= 0, so int() is floor
    hi = min(lo + 1, x.numel() - 1)
    return x[lo] + (x[hi] - x[lo]) * (pos - lo)


def unreliable_percent(alpha0: float, epoch: int, nepochs: int) -> float:
    """alpha_t = alpha0 (1 - e/E): the share (percent) of pixels treated as unreliable at
    epoch e (0-based) of E; 20 -> 0 over the run, epoch-granular."""
    return alpha0 * (1.0 - epoch / nepochs)


def keep_percent(drop_percent: float, epoch: int, nepochs: int) -> float:
    """kappa_e = 100 - (100 - drop_percent)(1 - e/E), the entropy percentile below which
    pseudo labels are kept. ``drop_percent`` is U2PL's config name for the share *kept* at
    epoch 0 (80 -> 20 % unreliable)."""
    return 100.0 - unreliable_percent(100.0 - drop_percent, epoch, nepochs)


def reliable_pseudo_label_loss(student_logits: torch.Tensor, target: torch.Tensor,
                               keep: float, teacher_entropy: torch.Tensor,
                               weight_mode: str = "reference", ignore_index: int = 255
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """U2PL's unsupervised loss on the reliable pixels.

    Args:
        student_logits: [B,C,H,W] (grad).
        target: [B,H,W] int64 pseudo labels (not modified).
        keep: entropy percentile kappa in (0, 100]; pixels with H >= pct(H, kappa) are
            dropped (ties dropped, so the maximum-entropy pixel always is when kappa < 100).
        teacher_entropy: [B,H,W] :func:`entropy` of the teacher's softmax, which decides
            reliability (the contrastive masks use the same map, so it is computed once).
        weight_mode: ``reference``: the mean CE over kept pixels times B*H*W / N_keep (the
            code's lambda_u on an already averaged CE, i.e. 1/kept-fraction); ``mean``: the
            mean CE over kept pixels (Eq. 3 x Eq. 8 of the paper read literally).
    Returns:
        (loss 0-d, kept fraction 0-d). With no kept pixel the loss is 0 (with a graph).
    """
    with torch.no_grad():
        h = teacher_entropy.detach()
        valid = target != ignore_index
        thresh = percentile(h[valid], keep)
        target = target.clone()
        target[(h >= thresh) & valid] = ignore_index
        kept = (target != ignore_index).sum()
    if int(kept) == 0:
        return student_logits.sum() * 0, kept.float() / target.numel()
    ce = F.cross_entropy(student_logits, target, ignore_index=ignore_index)
    if weight_mode == "reference":
        ce = ce * (target.numel() / kept.to(ce.dtype))
    elif weight_mode != "mean":
        raise ValueError(f"weight_mode must be 'reference' or 'mean', got {weight_mode!r}")
    return ce, kept.float() / target.numel()


def entropy_masks(h: torch.Tensor, valid: torch.Tensor, alpha: float
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(low, high) bool masks: the valid pixels with H <= pct(H, alpha) and with
    H >= pct(H, 100 - alpha), percentiles over the valid pixels. h, valid: same shape."""
    values = h[valid]
    low = (h <= percentile(values, alpha)) & valid
    high = (h >= percentile(values, 100.0 - alpha)) & valid
    return low, high
