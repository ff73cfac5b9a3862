"""Supervised cross-entropy losses: OHEM (REFERENCE 3.2) and the plain ignore-aware CE.

Also home of the small pixel-CE machinery shared by the other loss modules:

* ``compute_dtype`` / ``upcast`` (furnace.precision): losses compute in float32 at least
  (bf16/fp16 logits are upcast), float64 stays float64 so golden tests can run at full
  precision.
* ``check_labels``: one clear ``ValueError`` for labels outside ``[0, C) U {ignore_index}``.
* ``softmax_stats`` + ``weighted_nll``: a per-pixel CE ``sum_i a_i * (-log p_{y_i})`` whose
  backward is ``a_i * (softmax - onehot)``.  It keeps one ``[B,C,H,W]`` buffer (the unnormalised
  softmax) for backward, like ``F.cross_entropy`` does with its log-softmax, but lets callers
  look at the probabilities (OHEM selection) without a second softmax pass.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..precision import upcast  # noqa: F401  (the losses' import path)

logger = logging.getLogger(__name__)

__all__ = ["OhemCrossEntropy", "CITYSCAPES_CLASS_WEIGHTS", "cross_entropy"]

#: Class weights of the reference city OHEM criterion (classes 0..18), float32 like the
#: reference's ``torch.FloatTensor([...])``; cast to float64 they are e.g. 0.8373000025749207.
CITYSCAPES_CLASS_WEIGHTS = torch.tensor(
    [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
     0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507], dtype=torch.float32)


# ----------------------------------------------------------------------------- shared helpers
def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32




def check_labels(target: torch.Tensor, num_classes: int, ignore_index: int, who: str,
                 check: Optional[bool] = None) -> None:
    """Raise ``ValueError`` if ``target`` holds a label outside ``[0, C) U {ignore_index}``.

    ``check=None`` checks only CPU tensors (free); ``True`` always checks (one host sync on
    GPU); ``False`` never.  Labels from an argmax are always valid, so hot paths skip it.
    """
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"{who}: target must be an integer label map, got {target.dtype}")
    if check is False or (check is None and target.device.type != "cpu"):
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        vals = torch.unique(target[bad])[:8].tolist()
        raise ValueError(
            f"{who}: target contains labels {vals} outside [0, {num_classes}) that are not "
            f"ignore_index={ignore_index}; num_classes is taken from dim 1 of the scores "
            f"{num_classes}. Fix the label maps (or the class count) so every pixel is a class "
            f"index or {ignore_index}.")


def _target_index(target: torch.Tensor, ignore_index: int):
    """(valid [B,H,W] bool, index [B,1,H,W] int64 with ignored pixels mapped to class 0)."""
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer label map [B,H,W], got {target.dtype}")
    valid = target != ignore_index
    idx = torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device))
    return valid, idx.long().unsqueeze(1)


@torch.no_grad()
def softmax_stats(z: torch.Tensor, idx: torch.Tensor):
    """Per-pixel softmax pieces for logits ``z`` [B,C,H,W] and labels ``idx`` [B,1,H,W].

    Returns ``(e, s, nll)``: ``e = exp(z - max_c z)`` [B,C,H,W] (softmax = e / s),
    ``s = sum_c e`` [B,1,H,W] and ``nll = -log softmax(z)[y]`` [B,1,H,W] (nats).
    """
    with torch.autocast(z.device.type, enabled=False):
        m = z.amax(1, keepdim=True)
        e = torch.sub(z, m)
        zy = e.gather(1, idx)            # z_y - max, taken before exp to keep -log p exact
        e.exp_()
        s = e.sum(1, keepdim=True)
        nll = s.log() - zy               # = -(z_y - max - log s), as log_softmax rounds
    return e, s, nll


class _WeightedNLL(torch.autograd.Function):
    """sum_i a_i * nll_i with d/dz = a_i * (e_i / s_i - onehot(y_i)); a, e, s, nll detached.

    Backward turns the saved ``e`` into the gradient in place (no new [B,C,H,W] allocation);
    a second backward through the same graph is refused by autograd's version check.
    """

    @staticmethod
    def forward(ctx, z, e, s, nll, idx, a):
        ctx.save_for_backward(e, s, idx, a)
        ctx.z_dtype = z.dtype
        return (nll * a).sum()

    @staticmethod
    def backward(ctx, grad):
        e, s, idx, a = ctx.saved_tensors
        ga = a * grad                                   # [B,1,H,W]
        gz = e.mul_(ga / s)
        gz.scatter_add_(1, idx, -ga)
        return gz.to(ctx.z_dtype), None, None, None, None, None


def weighted_nll(logits: torch.Tensor, stats, idx: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Scalar ``sum_i a_i * (-log p_{y_i})`` with gradient to ``logits`` (in its own dtype).

    ``stats = softmax_stats(upcast(logits), idx)``; ``a`` [B,1,H,W] per-pixel coefficients
    without gradient (0 at ignored pixels).  The gradient is formed in backward from the saved
    ``e, s`` and cast back to ``logits.dtype`` there, so bf16 logits need no extra fp32 copy
    in the graph.
    """
    e, s, nll = stats
    return _WeightedNLL.apply(logits, e, s, nll, idx, a.detach())


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                  check: Optional[bool] = None) -> torch.Tensor:
    """Mean CE over non-ignored pixels (``nn.CrossEntropyLoss(ignore_index=255)``, VOC's S_k).

    logits [B,C,H,W] (any float dtype, computed in >= float32), target [B,H,W] int64.
    Returns a scalar in nats; 0 (with gradient) if every pixel is ignored (the reference: NaN).
    """
    return OhemCrossEntropy(ignore_index=ignore_index, min_kept=0)(logits, target, check=check)


# ----------------------------------------------------------------------------- OHEM
class OhemCrossEntropy(nn.Module):
    """``ProbOhemCrossEntropy2d`` of the reference (REFERENCE 3.2), with selection not sort.

    For logits ``z`` [B,C,H,W] and labels ``y`` [B,H,W] (``ignore_index`` = ignore), with
    q_i = softmax(z)_i[y_i] (q = 1 at ignored pixels) over all N = B*H*W pixels:

    * no mining if ``min_kept > #valid`` or ``min_kept <= 0``: every valid pixel is kept
      (the reference logs ``Labels: <#valid>``; we log it at DEBUG so no host sync happens
      unless that level is enabled);
    * otherwise tau = k-th smallest q with k = min(N, min_kept) (``torch.kthvalue``),
      threshold = tau if tau > thresh else thresh, keep valid pixels with q <= threshold.

    Loss = sum_kept w[y] * (-log p_y) / sum_kept w[y] (nats), w = ``weight`` or 1.
    ``last_kept`` holds the number of kept pixels of the last call as a 0-dim int64 tensor
    (no host sync; ``int(crit.last_kept)`` to read it).  An empty selection gives 0.

    Args:
        ignore_index: label value that is ignored (255).
        thresh: probability threshold (0.7).
        min_kept: minimum number of kept pixels (the reference uses 50000 * batch size).
        weight: per-class weights [C] or None; a sequence is stored as float32 like the
            reference (use ``CITYSCAPES_CLASS_WEIGHTS`` for the city criterion).
    """

    def __init__(self, ignore_index: int = 255, thresh: float = 0.7, min_kept: int = 100000,
                 weight: Optional[Union[torch.Tensor, Sequence[float]]] = None):
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.thresh = float(thresh)
        self.min_kept = int(min_kept)
        if weight is not None:
            if not isinstance(weight, torch.Tensor):
                weight = torch.tensor(list(weight), dtype=torch.float32)
            weight = weight.detach().clone().reshape(-1)
        # not persistent: the criterion must not add keys to model checkpoints
        self.register_buffer("weight", weight, persistent=False)
        self.last_kept: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, thresh={self.thresh}, "
                f"min_kept={self.min_kept}, weighted={self.weight is not None}")

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                check: Optional[bool] = None) -> torch.Tensor:
        """logits [B,C,H,W], target [B,H,W] integer -> scalar loss (nats)."""
        if logits.dim() != 4 or target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"OhemCrossEntropy: expected logits [B,C,H,W] and target [B,H,W], "
                             f"got {tuple(logits.shape)} and {tuple(target.shape)}")
        C = logits.shape[1]
        if self.weight is not None and self.weight.numel() != C:
            raise ValueError(f"OhemCrossEntropy: {self.weight.numel()} class weights for "
                             f"{C} classes")
        check_labels(target, C, self.ignore_index, "OhemCrossEntropy", check)
        z = upcast(logits.detach())
        valid, idx = _target_index(target, self.ignore_index)
        valid = valid.unsqueeze(1)                                   # [B,1,H,W]
        stats = softmax_stats(z, idx)
        with torch.no_grad():
            keep = valid
            if self.min_kept > 0:
                e, s, _ = stats
                n = valid.numel()
                q = e.gather(1, idx) / s                             # softmax prob of y
                q = q.masked_fill_(~valid, 1.0)
                tau = torch.kthvalue(q.reshape(-1), min(n, self.min_kept)).values
                thr = torch.where(tau > self.thresh, tau, torch.full_like(tau, self.thresh))
                n_valid = valid.sum()
                no_mining = n_valid < self.min_kept
                keep = valid & ((q <= thr) | no_mining)
                if logger.isEnabledFor(logging.DEBUG) and bool(no_mining):
                    logger.debug("Labels: %d", int(n_valid))
            if self.weight is not None:
                w = self.weight.to(device=z.device, dtype=z.dtype)[idx]
                a = torch.where(keep, w, torch.zeros((), dtype=z.dtype, device=z.device))
            else:
                a = keep.to(z.dtype)
            den = a.sum()
            a = a / torch.where(den > 0, den, torch.ones_like(den))
            self.last_kept = keep.sum()
        return weighted_nll(logits, stats, idx, a)
