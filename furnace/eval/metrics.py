"""Confusion histogram, IoU, mIoU and pixel accuracy (REFERENCE 5.4), and the result text (5.5).

The histogram is accumulated on the device with ``bincount`` (rows = ground truth, columns =
prediction); only the final numbers go to the host.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def confusion_histogram(pred: torch.Tensor, label: torch.Tensor,
                        num_classes: int) -> torch.Tensor:
    """Confusion counts of one prediction, int64 [C, C] on the device of ``pred``.

    pred: integer class map (any shape), values in [0, C).
    label: integer ground truth of the same shape; pixels outside [0, C) (255 = ignore, and
        any other out-of-range value) are left out, as the reference's ``k = (gt >= 0) & (gt < C)``.
    Entry [g, p] counts pixels with ground truth g predicted as p.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} "
                         "differ in size")
    label = label.to(device=pred.device, dtype=torch.int64).reshape(-1)
    pred = pred.to(torch.int64).reshape(-1)
    keep = (label >= 0) & (label < num_classes)
    idx = label[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Running confusion histogram over a dataset (kept on ``device``).

    ``update(pred, label)`` adds one image; ``merge`` adds another matrix or an array of
    counts (e.g. from another process); ``compute()`` returns the metrics dict
    (``absent_iou`` as :func:`compute_metrics`).
    """

    def __init__(self, num_classes: int, device: Union[str, torch.device] = "cpu",
                 absent_iou: str = "skip"):
        self.num_classes = int(num_classes)
        self.absent_iou = absent_iou
        self.hist = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64,
                                device=device)

    def update(self, pred: torch.Tensor, label: ArrayLike) -> torch.Tensor:
        """Add one image; returns its own histogram [C, C] (on the device)."""
        if not isinstance(label, torch.Tensor):
            label = torch.from_numpy(np.asarray(label))
        h = confusion_histogram(pred.to(self.hist.device), label, self.num_classes)
        self.hist += h
        return h

    def merge(self, other: Union["ConfusionMatrix", ArrayLike]) -> None:
        h = other.hist if isinstance(other, ConfusionMatrix) else other
        if not isinstance(h, torch.Tensor):
            h = torch.from_numpy(np.asarray(h))
        self.hist += h.to(self.hist.device, torch.int64)

    def numpy(self) -> np.ndarray:
        return self.hist.cpu().numpy()

    def compute(self) -> Dict[str, object]:
        return compute_metrics(self.numpy(), self.absent_iou)


#: what a class with no ground-truth pixel and no predicted pixel counts for in the mean
ABSENT_IOU = ("skip", "zero")


def compute_metrics(hist: ArrayLike, absent_iou: str = "skip") -> Dict[str, object]:
    """Metrics of a confusion histogram [C, C] (rows ground truth, columns prediction).

    Returns ``iou`` (float64 [C]), ``miou`` = mean of ``iou`` without its NaNs,
    ``miou_no_back`` = the same over iou[1:] (class 0 is the background), ``pixel_acc`` =
    correct / labelled pixels (the reference's "mACC": overall pixel accuracy, not mean class
    accuracy), ``labeled`` and ``correct`` (pixel counts). Fractions are in [0, 1] (NaN when
    undefined).

    absent_iou: a class absent from both ground truth and prediction has IoU NaN and is left
        out of the means (``'skip'``, the reference CPS code's nanmean), or has IoU 0 and
        counts in them (``'zero'``: LPL's evaluation, mean over all C classes; it matters on
        subsets where a class never occurs).
    """
    if absent_iou not in ABSENT_IOU:
        raise ValueError(f"eval_absent_iou must be one of {ABSENT_IOU}, got {absent_iou!r}")
    if isinstance(hist, torch.Tensor):
        hist = hist.cpu().numpy()
    hist = np.asarray(hist, dtype=np.float64)
    diag = np.diag(hist)
    union = hist.sum(1) + hist.sum(0) - diag
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = diag / union
    if absent_iou == "zero":
        iou = np.where(union > 0, iou, 0.0)
    labeled = float(hist.sum())
    correct = float(diag.sum())
    return {"iou": iou,
            "miou": _nanmean(iou),
            "miou_no_back": _nanmean(iou[1:]),
            "pixel_acc": correct / labeled if labeled > 0 else float("nan"),
            "labeled": int(labeled), "correct": int(correct)}


def _nanmean(a: np.ndarray) -> float:
    """np.nanmean without the RuntimeWarning when everything is NaN (gives NaN)."""
    a = np.asarray(a, dtype=np.float64)
    ok = ~np.isnan(a)
    return float(a[ok].mean()) if ok.any() else float("nan")


def format_results(iou: Sequence[float], miou: float, miou_no_back: float, pixel_acc: float,
                   class_names: Optional[Sequence[str]] = None) -> str:
    """The reference result block (REFERENCE 5.5), without a trailing newline.

    One line ``"<i+1> <name>\\t<IoU*100 %.3f>%"`` per class, a dashes line, and
    ``"mIou: X%     mIoU(no_back): Y%      mACC: Z%"`` with percentages to 3 decimals.
    """
    names = list(class_names) if class_names is not None else []
    if len(names) != len(iou):
        names = [f"class_{i}" for i in range(len(iou))]
    lines = ["%d %s\t%.3f%%" % (i + 1, names[i], iou[i] * 100) for i in range(len(iou))]
    lines.append("-" * 36)
    lines.append("mIou: %.3f%%     mIoU(no_back): %.3f%%      mACC: %.3f%%"
                 % (miou * 100, miou_no_back * 100, pixel_acc * 100))
    return "\n".join(lines)
