"""Pseudo-labels, confidences, confusion-based class weights, inter/union labels (REFERENCE
3.7) and the confidence-weighted unsupervised CE (REFERENCE 3.8).

Everything stays on the device: the confusion matrix is a ``bincount`` (the reference pulls
millions of labels to the host every iteration for sklearn), and nothing here forces a host
sync, so ``overlap`` is returned as a tensor (call ``float()`` when logging).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .ohem import _target_index, check_labels, softmax_stats, upcast, weighted_nll

__all__ = ["PseudoLabels", "pseudo_labels", "unsup_ce", "label_and_confidence"]

_LOG2E = 1.0 / math.log(2.0)


class PseudoLabels(NamedTuple):
    """Result of :func:`pseudo_labels` (all tensors on the teachers' device, no grad).

    label1, label2: [B,H,W] int64 argmax of each teacher's logits.
    conf1, conf2: [B,H,W] max softmax probability (compute dtype: float32 or float64).
    class_weight: [C] float64 w (sums to ~1; larger = more disagreement on that class).
    confusion: [C,C] int64, rows = branch-1 class, cols = branch-2 class, +1 on the diagonal.
    overlap: 0-dim float64 tensor, trace / total of ``confusion``.
    inter: [B,H,W] int64, label1 where the branches agree, else ``ignore_index``.
    union: [B,H,W] int64, the agreed label, else the label whose class weight is larger
        (strict >, ties go to branch 2).
    weight_inter: [B,H,W] (conf1 + conf2) / 2.
    weight_union: [B,H,W] (conf1 + conf2) / 2 where the branches agree, else the confidence
        of the branch whose label ``union`` took.
    """

    label1: torch.Tensor
    label2: torch.Tensor
    conf1: torch.Tensor
    conf2: torch.Tensor
    class_weight: torch.Tensor
    confusion: torch.Tensor
    overlap: torch.Tensor
    inter: torch.Tensor
    union: torch.Tensor
    weight_inter: torch.Tensor
    weight_union: torch.Tensor


@torch.no_grad()
def label_and_confidence(t: torch.Tensor, work: Optional[torch.Tensor] = None):
    """(argmax_c t [B,H,W] int64, max_c softmax(t) [B,H,W]) for logits ``t`` [B,C,H,W].

    Ties give the first maximal class, like ``torch.argmax``.  ``argmax(dim=1)`` and
    ``max(dim=1)`` are slow on CPU for NCHW maps (strided reductions with an index), so the
    label is found with plain vectorised passes: ``t == max`` is exact, written as 1.0 / 0.0
    into the scratch buffer and scaled by the rank C - c, whose channel max is C - c_first
    (a NaN pixel has no maximum and maps to class 0).  The confidence is
    ``1 / sum_c exp(t_c - max)``, with exp computed as exp2 of log2(e)-scaled differences
    (markedly cheaper than exp on CPU).  ``work``: optional ``[B,C,H,W]`` scratch buffer of
    t's dtype (pass one to reuse it across calls).  Four full passes plus two reductions.
    """
    C = t.shape[1]
    if work is None:
        work = torch.empty_like(t)
    m = t.amax(1, keepdim=True)
    rank = torch.arange(C, 0, -1, dtype=t.dtype, device=t.device).view(1, C, 1, 1)
    k = torch.eq(t, m, out=work).mul_(rank).amax(1)                 # C - c_first, 0 if NaN
    label = torch.rsub(k, C).fmod_(C).long()                        # NaN pixel: C -> 0
    conf = torch.sub(t, m, out=work).mul_(_LOG2E).exp2_().sum(1).reciprocal_()
    return label, conf


@torch.no_grad()
def pseudo_labels(t1: torch.Tensor, t2: torch.Tensor, ignore_index: int = 255) -> PseudoLabels:
    """Pseudo-label machinery of DUEB on the two (mixed) teacher logits.

    Args:
        t1, t2: teacher logits [B,C,H,W] of branch 1 and 2 (any float dtype; detached; bf16/fp16
            are upcast to float32).
        ignore_index: label written where the branches disagree in ``inter`` (255).

    Returns:
        :class:`PseudoLabels`.  Class weights (float64, as the reference):
        ``K = confusion + I``, row r_c, column q_c, diagonal d_c,
        ``w_c = (q_c - d_c)/q_c + (r_c - d_c)/r_c`` then ``w /= (sum(w) + 1e-6)``.

    Cost: one scratch buffer shared by both teachers (:func:`label_and_confidence`), then
    only [B,H,W] maps: the pair index label1 * C + label2 serves both the confusion
    ``bincount`` and the union choice (a [C, C] table of ``w[i] > w[j]`` looked up per pixel,
    so no float64 map is formed); float64 is used on [C]-sized tensors only.  No host sync.
    """
    if t1.shape != t2.shape or t1.dim() != 4:
        raise ValueError(f"pseudo_labels: expected two [B,C,H,W] logits of the same shape, got "
                         f"{tuple(t1.shape)} and {tuple(t2.shape)}")
    C = t1.shape[1]
    t1 = upcast(t1.detach())
    t2 = upcast(t2.detach())
    work = torch.empty_like(t1)
    label1, conf1 = label_and_confidence(t1, work)
    label2, conf2 = label_and_confidence(t2, work)
    del work

    pair = label1 * C + label2                                      # [B,H,W] in [0, C*C)
    counts = torch.bincount(pair.view(-1), minlength=C * C)
    confusion = counts.view(C, C) + torch.eye(C, dtype=counts.dtype, device=counts.device)
    row = confusion.sum(1).double()
    col = confusion.sum(0).double()
    diag = torch.diagonal(confusion).double()
    w = (col - diag) / col + (row - diag) / row
    w = w / (w.sum() + 1e-6)
    overlap = diag.sum() / confusion.sum().double()

    disagree = label1 != label2
    inter = torch.where(disagree, ignore_index, label1)
    # strict: ties (and agreement, w[i] > w[i] is False) go to branch 2
    first = (w.view(C, 1) > w.view(1, C)).view(-1)[pair]
    union = torch.where(first, label1, label2)
    weight_inter = (conf1 + conf2).mul_(0.5)
    weight_union = torch.where(disagree, torch.where(first, conf1, conf2), weight_inter)
    return PseudoLabels(label1, label2, conf1, conf2, w, confusion, overlap, inter, union,
                        weight_inter, weight_union)


def unsup_ce(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor,
             ignore_index: int = 255, check: Optional[bool] = None) -> torch.Tensor:
    """Confidence-weighted CE averaged over ALL pixels (REFERENCE 3.8, QUIRK 21).

    ``mean over B*H*W of CE_none(logits, label) * weight``, with CE_none = 0 at ignored pixels
    (so disagreement pixels count as zeros in the mean).

    Args:
        logits: student logits [B,C,H,W] (computed in >= float32).
        label: pseudo-labels [B,H,W] int64 (``ignore_index`` = ignore).
        weight: per-pixel confidence [B,H,W] (no gradient flows into it).
    Returns:
        scalar (nats).
    """
    if logits.dim() != 4 or label.shape != logits.shape[:1] + logits.shape[2:] \
            or weight.shape != label.shape:
        raise ValueError(f"unsup_ce: expected logits [B,C,H,W], label and weight [B,H,W], got "
                         f"{tuple(logits.shape)}, {tuple(label.shape)}, {tuple(weight.shape)}")
    check_labels(label, logits.shape[1], ignore_index, "unsup_ce", check)
    z = upcast(logits.detach())
    valid, idx = _target_index(label, ignore_index)
    with torch.no_grad():
        a = torch.where(valid, weight.detach().to(z.dtype), torch.zeros((), dtype=z.dtype,
                                                                        device=z.device))
        a = (a / label.numel()).unsqueeze(1)
    return weighted_nll(logits, softmax_stats(z, idx), idx, a)
