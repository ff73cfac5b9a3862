"""LPL's losses (spec ``methods/LPL.md`` sections 3.2-3.5): class-aware cross entropy (CCE),
the multi-label classification loss, GT replacement of pseudo labels, the dynamic-evaluation
IoU tracker and the progressive-cross-training (PCT) weights and loss.

Every function is pure torch and works on CPU and CUDA. Scores in fp16/bf16/fp32 are computed
in float32; float64 stays float64 (the golden checks of spec 10.3 run in float64).

Reference quirks kept on purpose (spec sections 3.2 and 11):

* CCE has two epsilons (1e-5 in the softmax denominator and inside the log) and no
  max-subtraction: a logit above ~88.7 overflows ``exp`` in float32 and the result is NaN,
  also when the class is absent from the image (inf x 0). ``stable=True`` is the
  max-subtracted, epsilon-free alternative (not the reference).
* The log-probabilities of absent classes are not masked and can be positive, so a target
  outside the image's label set would give a negative loss; LPL's targets are always inside
  it (GT classes and class-restricted argmaxes).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["EPS", "class_aware_softmax", "cce_loss", "restricted_argmax",
           "multilabel_cls_loss", "replace_with_gt", "IoUTracker", "pct_weights", "pct_loss"]

EPS = 1e-5
IGNORE = 255


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other float type is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _labels_as_map(y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Image-level labels [B,C] or [B,C,1,1] -> [B,C,1,1] in the logits' compute dtype."""
    b, c = logits.shape[:2]
    if y.dim() == 4 and y.shape[2:] == (1, 1):
        y = y.flatten(1)
    if y.shape != (b, c):
        raise ValueError(f"image-level labels y must be [B,C] or [B,C,1,1] = [{b},{c}] "
                         f"for logits {list(logits.shape)}; got {list(y.shape)}")
    return y.to(device=logits.device, dtype=_compute_dtype(logits))[:, :, None, None]


def class_aware_softmax(logits: torch.Tensor, y: torch.Tensor, eps: float = EPS,
                        stable: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the classes present in each image (CCE, spec 3.2).

    Args:
        logits: [B,C,H,W] scores (fp16, bf16, fp32 or fp64).
        y: image-level labels in {0,1}, [B,C] or [B,C,1,1] (any numeric dtype).
        eps: the reference's epsilon (denominator and log).
        stable: False (reference): q_c = exp(z_c) / (sum_{k: y_k=1} exp(z_k) + eps) and
            logq = log(q + eps) for ALL classes, without max-subtraction (NaN once a logit
            overflows exp). True: max-subtracted, epsilon-free log-softmax over the present
            classes; absent classes get logq = -inf (a target outside S gives an infinite loss).

    Returns:
        (prob, logq), both [B,C,H,W] in float32 (float64 for float64 logits): prob = q * y
        (0 for absent classes), logq the log-probabilities the CCE loss reads.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B,C,H,W]; got shape {list(logits.shape)}")
    ym = _labels_as_map(y, logits)
    z = logits.to(_compute_dtype(logits))
    if stable:
        present = ym > 0
        masked = z.masked_fill(~present, float("-inf"))
        logq = torch.log_softmax(masked, dim=1)
        return logq.exp() * ym, logq
    e = torch.exp(z)
    # the product (not a mask) keeps the reference's inf * 0 = NaN for absent overflows
    q = e / ((e * ym).sum(dim=1, keepdim=True) + eps)
    return q * ym, torch.log(q + eps)


def cce_loss(logq: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
             ignore_index: int = IGNORE) -> torch.Tensor:
    """Negative log-likelihood of ``target`` under ``logq`` (from :func:`class_aware_softmax`).

    Args:
        logq: [B,C,H,W] log-probabilities.
        target: [B,H,W] int64 class indices, ``ignore_index`` for ignored pixels.
        reduction: ``'mean'`` (0-d: mean over non-ignored pixels, ``nll_loss`` semantics; 0 with
            zero gradients when every pixel is ignored, where ``nll_loss`` gives NaN) or
            ``'none'`` ([B,H,W] per-pixel loss, 0 at ignored pixels).

    Returns:
        The loss in nats, in logq's dtype.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    if target.shape != logq.shape[:1] + logq.shape[2:]:
        raise ValueError(f"target must be [B,H,W] = {[logq.shape[0], *logq.shape[2:]]} for "
                         f"logq {list(logq.shape)}; got {list(target.shape)}")
    # nll_loss's backward rejects a non-contiguous input (e.g. channels-last logits)
    loss = F.nll_loss(logq.contiguous(), target, ignore_index=ignore_index,
                      reduction=reduction)
    if reduction == "none":
        return loss
    labelled = (target != ignore_index).any()
    # where() passes zero gradient into the 0/0 branch; no host synchronisation
    return torch.where(labelled, loss, torch.zeros_like(loss))


def restricted_argmax(prob: torch.Tensor) -> torch.Tensor:
    """Pseudo labels: argmax over classes of the class-aware probabilities.

    prob [B,C,H,W] (zero for absent classes) -> [B,H,W] int64; ties go to the lowest class
    index (torch.argmax), as in the reference.
    """
    return prob.argmax(dim=1)


def multilabel_cls_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Image classification loss of HybridNet (spec 3.3 item 2).

    s_{i,c} = max over pixels of logits[i,c] (global max pooling of the upsampled logits);
    multilabel soft margin -[y ln sigmoid(s) + (1-y) ln sigmoid(-s)] over classes 1..C-1
    (background excluded), averaged over images and classes.

    Args:
        logits: [B,C,H,W] scores (computed in float32, float64 kept).
        y: image-level labels [B,C] or [B,C,1,1] in {0,1}.

    Returns:
        0-d loss in nats.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B,C,H,W]; got shape {list(logits.shape)}")
    ym = _labels_as_map(y, logits).flatten(1)
    scores = logits.to(_compute_dtype(logits)).amax(dim=(2, 3))
    return F.multilabel_soft_margin_loss(scores[:, 1:], ym[:, 1:])


def replace_with_gt(pseudo: torch.Tensor, gt: torch.Tensor,
                    is_labelled: torch.Tensor) -> torch.Tensor:
    """Pseudo-label maps with the whole map of every labelled image replaced by its GT crop.

    pseudo, gt [B,H,W] int64; is_labelled [B] bool. Returns a new [B,H,W] tensor; GT's 255
    pixels are kept (spec 3.3 items 3 and 5).
    """
    if pseudo.shape != gt.shape or pseudo.dim() != 3:
        raise ValueError(f"pseudo and gt must both be [B,H,W]; got {list(pseudo.shape)} and "
                         f"{list(gt.shape)}")
    if is_labelled.shape != pseudo.shape[:1]:
        raise ValueError(f"is_labelled must be [B] = [{pseudo.shape[0]}]; got "
                         f"{list(is_labelled.shape)}")
    return torch.where(is_labelled.bool()[:, None, None], gt.to(pseudo.dtype), pseudo)


class IoUTracker:
    """PseudoNet's running per-class IoU on the strong half (dynamic evaluation, spec 3.4).

    State (float32, length C): T (GT pixel counts, start 1), Pd (predicted pixel counts,
    start 0), I (correct pixel counts, start 0). Each :meth:`update` decays the state by
    ``momentum`` and adds the batch's counts; GT pixels equal to 255 are left out of T and I
    but every pixel's prediction counts in Pd (reference quirk 3).
    """

    def __init__(self, num_classes: int, momentum: float = 0.99,
                 device: Optional[torch.device] = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
        self.num_classes = num_classes
        self.momentum = float(momentum)
        # rows T, Pd, I; T starts at 1 so the IoU denominator is positive from the start
        self._state = torch.zeros(3, num_classes, dtype=torch.float32, device=device)
        self._state[0] = 1.0

    @property
    def T(self) -> torch.Tensor:
        return self._state[0]

    @property
    def Pd(self) -> torch.Tensor:
        return self._state[1]

    @property
    def I(self) -> torch.Tensor:  # noqa: E743 - the spec's name
        return self._state[2]

    def counts(self, gt: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Per-batch counts [3,C] float32 (GT, prediction, intersection) of gt/pred [B,H,W]."""
        if gt.shape != pred.shape:
            raise ValueError(f"gt and pred must have the same shape; got {list(gt.shape)} and "
                             f"{list(pred.shape)}")
        c = self.num_classes
        gt = gt.reshape(-1).to(device=self._state.device, dtype=torch.int64)
        pred = pred.reshape(-1).to(device=self._state.device, dtype=torch.int64)
        valid = (gt >= 0) & (gt < c)  # 255 (and any other out-of-range value) is ignored
        # index c collects the ignored pixels; a fixed-size scatter needs no host sync
        gt_bin = torch.where(valid, gt, torch.full_like(gt, c))
        hit_bin = torch.where(valid & (gt == pred), gt, torch.full_like(gt, c))
        pred_bin = torch.where((pred >= 0) & (pred < c), pred, torch.full_like(pred, c))
        out = torch.zeros(3, c + 1, dtype=torch.float32, device=self._state.device)
        one = torch.ones_like(gt, dtype=torch.float32)
        out[0].index_add_(0, gt_bin, one)
        out[1].index_add_(0, pred_bin, one)
        out[2].index_add_(0, hit_bin, one)
        return out[:, :c]

    def update(self, gt: torch.Tensor, pred: torch.Tensor,
               reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """Decay the state and add this batch's counts.

        Args:
            gt: [B,H,W] GT of the strong crops (255 = ignore).
            pred: [B,H,W] PseudoNet's class-restricted argmax on the same crops.
            reduce: optional callable mapping the batch counts [3,C] float32 to their sum over
                ranks (DDP all-reduce); applied before the decay-and-add so every rank holds
                the single-GPU state.
        """
        counts = self.counts(gt, pred)
        if reduce is not None:
            counts = reduce(counts)
            if not torch.is_tensor(counts) or counts.shape != (3, self.num_classes):
                raise ValueError("IoUTracker.update: reduce must return the [3,C] counts "
                                 f"tensor; got {getattr(counts, 'shape', type(counts))}")
        self._state = self._state * self.momentum + counts.to(self._state)

    def iou(self) -> torch.Tensor:
        """[C] float32: I / (T + Pd - I); exactly 0 for a class never predicted correctly."""
        t, pd, i = self._state
        return i / (t + pd - i)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Tensors only (loadable with ``torch.load(weights_only=True)``)."""
        return {"T": self.T.clone(), "Pd": self.Pd.clone(), "I": self.I.clone(),
                "momentum": torch.tensor(self.momentum, dtype=torch.float64)}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict` onto this tracker's device; the saved momentum (if
        present) replaces this tracker's, so a resumed run continues exactly."""
        missing = [k for k in ("T", "Pd", "I") if k not in state]
        if missing:
            raise ValueError(f"IoU tracker state lacks {missing}; expected the keys T, Pd, I "
                             "of IoUTracker.state_dict()")
        shapes = {k: tuple(state[k].shape) for k in ("T", "Pd", "I")}
        if any(s != (self.num_classes,) for s in shapes.values()):
            raise ValueError(f"IoU tracker state has shapes {shapes} but this tracker has "
                             f"{self.num_classes} classes; the checkpoint was trained with "
                             "another num_classes")
        if "momentum" in state:
            self.momentum = float(state["momentum"])
        self._state = torch.stack([state[k].to(device=self._state.device,
                                               dtype=torch.float32)
                                   for k in ("T", "Pd", "I")])

    def to(self, device) -> "IoUTracker":
        """Move the state to ``device`` (in place); returns self."""
        self._state = self._state.to(device)
        return self


def pct_weights(iou: torch.Tensor, y: torch.Tensor, gamma: float = 8.0) -> torch.Tensor:
    """PCT admission weight of each image (spec 3.5).

    v = y * iou; every exact 0 becomes 1 (absent classes AND present classes with IoU exactly
    0, reference quirk 2); w = (min over classes of v) ** gamma.

    Args:
        iou: [C] running IoU (:meth:`IoUTracker.iou`).
        y: image-level labels [B,C] or [B,C,1,1].
        gamma: exponent (8 in the reference).

    Returns:
        [B] weights in iou's dtype (detached inputs give detached weights).
    """
    if y.dim() == 4 and y.shape[2:] == (1, 1):
        y = y.flatten(1)
    if y.dim() != 2 or y.shape[1] != iou.shape[0]:
        raise ValueError(f"y must be [B,C] or [B,C,1,1] with C = {iou.shape[0]}; got "
                         f"{list(y.shape)}")
    v = y.to(iou) * iou
    v = torch.where(v == 0, torch.ones_like(v), v)
    return v.min(dim=1).values ** gamma


def pct_loss(pixel_loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_pct = sum_i w_i * sum_p l_ip / (B*H*W) (spec 3.5): ALL pixels count in the divisor,
    ignored ones included (reference quirk 5).

    pixel_loss [B,H,W] (``cce_loss(..., reduction='none')``, 0 at ignored pixels),
    weights [B] -> 0-d loss.
    """
    if pixel_loss.dim() != 3 or weights.shape != pixel_loss.shape[:1]:
        raise ValueError(f"pixel_loss must be [B,H,W] and weights [B]; got "
                         f"{list(pixel_loss.shape)} and {list(weights.shape)}")
    return (weights.to(pixel_loss)[:, None, None] * pixel_loss).mean()
