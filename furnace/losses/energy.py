"""Energy term E(p, y) of DUEB (REFERENCE 3.4, QUIRKS 6-8).

E = log sum_i exp(p_i[y_i]) over every non-ignored pixel i of the batch whose gathered
probability is not exactly 0.0: one scalar for the whole batch.  The reference builds the
gathered vector with a loop over classes and boolean indexing; we gather once and mask with
-inf, which gives the same value and gradient (same pixels dropped) without a host sync.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .ohem import _target_index, check_labels, compute_dtype

__all__ = ["energy_term"]

_warned_empty = False


def energy_term(prob: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                check: Optional[bool] = True) -> torch.Tensor:
    """Energy term: logsumexp over the gathered probabilities of the labelled class.

    Args:
        prob: softmax probabilities [B,C,H,W] (not logits, as in the reference); any float
            dtype, computed in float32 at least (float64 stays float64).
        target: labels [B,H,W] integer, ``ignore_index`` = ignore.
        ignore_index: ignored label (255).
        check: ``True`` (default) raises ``ValueError`` for labels outside
            ``[0, C) U {ignore_index}`` and warns once when nothing is selected; this costs one
            host sync on GPU.  ``False`` skips both (use it for argmax pseudo-labels, which are
            valid by construction); ``None`` checks only on CPU.

    Returns:
        0-dim tensor (nats) ``log sum exp(p_y)`` over the kept pixels, pooled over the batch.
        Pixels with label ``ignore_index`` or with ``p_y == 0.0`` exactly (underflow) are
        dropped like in the reference.  If no pixel is left the result is 0 with a zero
        gradient (the reference returns -inf and the loss turns NaN, QUIRK 7).
    """
    global _warned_empty
    if prob.dim() != 4 or target.shape != prob.shape[:1] + prob.shape[2:]:
        raise ValueError(f"energy_term: expected prob [B,C,H,W] and target [B,H,W], got "
                         f"{tuple(prob.shape)} and {tuple(target.shape)}")
    C = prob.shape[1]
    do_check = check is True or (check is None and target.device.type == "cpu")
    valid, idx = _target_index(target, ignore_index)
    if do_check:
        # clamp so the gather cannot fault on bad labels; they raise below, after one sync
        bad = valid & ((target < 0) | (target >= C))
        idx = idx.clamp(0, C - 1)
    py = prob.gather(1, idx).squeeze(1).to(compute_dtype(prob))      # [B,H,W]
    keep = valid & (py != 0)
    n_kept = keep.sum()
    # -inf removes a pixel from the logsumexp exactly (exp(-inf) = 0, zero gradient); when
    # nothing is kept fill with 0 instead so the backward stays finite (no -inf - -inf).
    fill = torch.where(n_kept > 0, float("-inf"), 0.0).to(py.dtype)
    e = torch.logsumexp(torch.where(keep, py, fill).reshape(-1), 0)
    e = torch.where(n_kept > 0, e, torch.zeros_like(e))
    if do_check:
        any_bad, empty = torch.stack([bad.any(), n_kept == 0]).tolist()   # one host sync
        if any_bad:
            check_labels(target, C, ignore_index, "energy_term", True)
        if empty and not _warned_empty:
            _warned_empty = True
            warnings.warn("energy_term: no pixel selected (all labels ignored or all "
                          "probabilities 0); returning 0 instead of the reference's -inf. "
                          "This warning is shown once.", RuntimeWarning, stacklevel=2)
    return e
