"""ELN's losses (spec methods/ELN.md 3.2 and 3.3, corrections in section 10).

* :func:`eln_target` / :func:`eln_bce`: the ELN's target (1 where the argmax of a prediction
  equals the label, ignore pixels 0) and its class-balanced BCE: error pixels weighted by
  n1 / n0, the mean over all pixels.
* :func:`gated_aux_loss`: the auxiliary decoders' CE, each added only while it is at least
  alpha_k times the main loss (a tie opens the gate).
* :func:`eln_pseudo_labels` / :func:`filtered_pseudo_ce`: the teacher's argmax kept where the
  ELN logit is > 0 (else 255), and the CE against it at stride 4.
* :func:`draw_windows` / :func:`pixel_contrastive`: the class-level contrastive loss over 8
  random 32 x 32 windows, teacher anchors and student keys.

Where the reference returns a non-tensor (a closed gate: the integer 0; no class in a
window: the float 0.0), these functions return the same Python numbers.
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..resize import upsample

IGNORE = 255
Number = Union[int, float, torch.Tensor]


def sup_ce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The reference's CEloss: logits upsampled (align_corners=True) to the label size, CE
    with ignore 255, mean over the valid pixels (NaN when there is none)."""
    if logits.shape[-2:] != label.shape[-2:]:
        logits = upsample(logits, label.shape[-2:])
    return F.cross_entropy(logits.float(), label, ignore_index=IGNORE)


# -- ELN training ------------------------------------------------------------------------

def eln_target(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """[B,H,W] float: 1 where argmax_c of ``pred`` (upsampled to the label size) equals the
    label, else 0; ignore pixels (255) never match, so they are 0 ("error")."""
    if pred.shape[-2:] != label.shape[-2:]:
        pred = upsample(pred, label.shape[-2:])
    return (pred.argmax(dim=1) == label).float()


def eln_bce(z: torch.Tensor, target: torch.Tensor, zero_errors: str = "raise",
            valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Class-balanced BCE of the ELN logits ``z`` [B,1,H,W] (upsampled to the target size)
    against ``target`` [B,H,W]: per-pixel BCE, error pixels (T=0) times n1/n0, mean over all
    B*H*W pixels. ``zero_errors``: what a batch without any error pixel does ('raise': the
    reference's ZeroDivisionError; 'unit': weight 1). ``valid`` [B,H,W] bool: count and
    average over these pixels only (None: all, the reference)."""
    if z.shape[-2:] != target.shape[-2:]:
        z = upsample(z, target.shape[-2:])
    loss = F.binary_cross_entropy_with_logits(z[:, 0].float(), target, reduction="none")
    if valid is None:
        n1 = int((target == 1).sum())
        n0 = target.numel() - n1
    else:
        n1 = int(((target == 1) & valid).sum())
        n0 = int(valid.sum()) - n1
    if n0 == 0:
        if zero_errors == "raise":
            raise ZeroDivisionError("ELN loss: the batch has no error pixel (n0 = 0); the "
                                    "reference divides by zero here (set "
                                    "eln.zero_errors=unit to weight errors 1)")
        w0 = 1.0
    else:
        w0 = n1 / n0
    weight = torch.where(target == 1, torch.ones_like(loss), torch.full_like(loss, w0))
    if valid is None:
        return (loss * weight).mean()
    return (loss * weight * valid).sum() / valid.sum().clamp(min=1)


def eln_loss(z: torch.Tensor, pred: torch.Tensor, label: torch.Tensor,
             zero_errors: str = "raise", ignore_as_error: bool = True) -> torch.Tensor:
    """L_ELN(P) of one prediction: :func:`eln_bce` of ``z`` against :func:`eln_target`;
    ``ignore_as_error=False`` leaves the ignore pixels out (the reference counts them as
    errors)."""
    valid = None if ignore_as_error else label != IGNORE
    return eln_bce(z, eln_target(pred, label), zero_errors, valid)


def gated_aux_loss(aux_losses: Sequence[torch.Tensor], sup: torch.Tensor,
                   alphas: Sequence[float]) -> Tuple[Number, List[bool]]:
    """sum_k 1[L_k >= alpha_k * L_sup] L_k (the integer 0 when every gate is closed) and the
    gates (True: open; an exact tie opens)."""
    total: Number = 0
    gates = []
    for loss, alpha in zip(aux_losses, alphas):
        is_open = bool(loss.detach() >= sup.detach() * alpha)
        gates.append(is_open)
        if is_open:
            total = total + loss
    return total, gates


# -- self-training -------------------------------------------------------------------------

def eln_pseudo_labels(teacher_logits: torch.Tensor, eln_logits: torch.Tensor):
    """(pseudo [B,h,w] with 255 where dropped, keep mask M [B,h,w] bool, argmax [B,h,w]):
    M = round(sigmoid(z)), computed in z's dtype as the reference: in float32 M = 1 exactly
    when z > 0; from fp16 autocast, logits below about 1e-3 also round to 0 (section 10)."""
    argmax = teacher_logits.argmax(dim=1)
    keep = torch.round(torch.sigmoid(eln_logits[:, 0])) == 1
    pseudo = torch.where(keep, argmax, torch.full_like(argmax, IGNORE))
    return pseudo, keep, argmax


def filtered_pseudo_ce(student_logits: torch.Tensor, pseudo: torch.Tensor,
                       empty: str = "nan") -> torch.Tensor:
    """CE of the student's stride-4 logits against the filtered pseudo labels, mean over the
    kept pixels. ``empty``: with no kept pixel, 'nan' is the reference (a NaN total: the run
    stops), 'zero' gives a 0 that keeps the graph."""
    if empty == "zero" and not bool((pseudo != IGNORE).any()):
        return student_logits.float().sum() * 0.0
    return sup_ce(student_logits, pseudo)


def draw_windows(rng: random.Random, h: int, w: int, size: int = 32,
                 count: int = 8) -> List[Tuple[int, int]]:
    """``count`` top-left corners (i, j) of ``size`` x ``size`` windows in an h x w map,
    drawn as the reference: i = randint(0, h - size), then j = randint(0, w - size), per
    window; a map of exactly size x size draws nothing (0, 0); a smaller map is an error."""
    if h < size or w < size:
        raise ValueError(f"contrastive windows of {size}x{size} do not fit the {h}x{w} "
                         "feature map")
    out = []
    for _ in range(count):
        if h == size and w == size:
            out.append((0, 0))
            continue
        i = rng.randint(0, h - size)
        j = rng.randint(0, w - size)
        out.append((i, j))
    return out


def _normalise(v: torch.Tensor) -> torch.Tensor:
    """Rows of v [n,D] divided by their norm clamped at >= 1e-8."""
    return v / v.norm(dim=1, keepdim=True).clamp(min=1e-8)


def class_contrastive(anchors: torch.Tensor, keys: torch.Tensor, keep: torch.Tensor,
                      labels: torch.Tensor, temperature: float,
                      ratios: Optional[Dict[int, torch.Tensor]] = None) -> Number:
    """One window's loss: the mean over the classes c among the kept pixels of
    -log(pos_c / (pos_c + neg_c)) / n_c, with pos_c the sum of exp(a.p / tau) over all pairs
    of the class's anchor (teacher) and key (student) embeddings, neg_c the same over the
    other classes' keys (each sum clamped at >= 1e-8); 0.0 (a float) when no pixel is kept.

    anchors, keys: [B,D,h,w]; keep [B,h,w] bool; labels [B,h,w]. ``ratios``: a dict that
    receives each class's -log ratio before the 1/n_c factor (diagnostics, tests)."""
    lab = torch.where(keep, labels, torch.full_like(labels, IGNORE))
    classes = torch.unique(lab)
    classes = classes[classes != IGNORE]
    if len(classes) == 0:
        return 0.0
    dtype = torch.float32 if anchors.dtype in (torch.float16, torch.bfloat16) else None
    a_all = anchors.permute(1, 0, 2, 3).to(dtype or anchors.dtype)    # D x B x h x w
    k_all = keys.permute(1, 0, 2, 3).to(dtype or keys.dtype)
    valid = lab != IGNORE
    total: Number = 0
    for c in classes:
        sel = lab == c
        a = _normalise(a_all[:, sel].T)
        p = _normalise(k_all[:, sel].T)
        q = _normalise(k_all[:, valid & ~sel].T)
        pos = torch.exp(a @ p.T / temperature).sum().clamp(min=1e-8)
        neg = torch.exp(a @ q.T / temperature).sum().clamp(min=1e-8)
        ratio = -torch.log(pos / (neg + pos))
        if ratios is not None:
            ratios[int(c)] = ratio.detach()
        total = total + ratio / sel.sum()
    return total / len(classes)


def pixel_contrastive(anchors: torch.Tensor, keys: torch.Tensor, keep: torch.Tensor,
                      labels: torch.Tensor, windows: Sequence[Tuple[int, int]],
                      temperature: float = 0.5, size: int = 32) -> Number:
    """(1/len(windows)) sum over the windows (the same window for every image and tensor) of
    :func:`class_contrastive`. Gradients reach whatever needs them: the caller passes the
    teacher's embeddings computed without grad."""
    total: Number = 0
    for i, j in windows:
        s = (slice(None), slice(None), slice(i, i + size), slice(j, j + size))
        total = total + class_contrastive(anchors[s], keys[s], keep[s[0], s[2], s[3]],
                                          labels[s[0], s[2], s[3]], temperature)
    return total / len(windows)
