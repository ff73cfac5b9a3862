"""Does the uncertainty know where the model is wrong? Error detection and calibration.

Every labelled pixel (ignore label 255 and any label outside [0, C) left out) is *wrong* when
the prediction differs from the label (the positive class) and *correct* otherwise. Each
uncertainty score should be high on the wrong pixels; how well it ranks them is measured by

* AUROC: P(score of a wrong pixel > score of a correct pixel), ties count 1/2;
* AUPR: average precision of finding the wrong pixels, thresholding the score from the top
  (step-wise, as ``sklearn.metrics.average_precision_score``).

Scores (all >= 0, higher = more uncertain):

``variance``      the variance head of the evaluated branch (softplus output; the reference
                  never trains it, ``dueb.aleatoric.learn_variance=true`` does);
``entropy``       predictive entropy of softmax(logits) in nats, in [0, log C];
``1-msp``         1 - p(predicted class), in [0, 1 - 1/C] (the maximum softmax probability
                  unless a multi-scale prediction differs from the argmax of the mean logits);
``disagreement``  Jensen-Shannon divergence between the two branches' softmax outputs, in
                  nats, in [0, log 2]: symmetric, bounded and, unlike 1[argmax differ], graded,
                  so it ranks pixels rather than splitting them into two groups.

Calibration of the softmax: ECE with 15 equal-width confidence bins, confidence = p(predicted
class), bin k = [k/15, (k+1)/15) (1.0 in the last), ECE = sum_k n_k/N |accuracy_k -
mean confidence_k|, and the reliability diagram of the same bins. The ECE is exact (per bin
the meter keeps the pixel count, the correct count and the float64 sum of confidences).

Memory and merging: the meter keeps fixed-size histograms on the device (per score, correct
and wrong pixel counts in ``bins`` bins; 3 x 15 numbers for the ECE), updated image by image,
so memory does not grow with the dataset. Histograms add: :meth:`UncertaintyMeter.merge`
(states sent from other processes, as eval.py's per-device workers do) and
:meth:`UncertaintyMeter.all_reduce` (a torch.distributed sum, for DDP validation).

Binning: 65536 bins per score (4 MB of int64 in all) over a range fixed up front
(:data:`DEFAULT_RANGES`; values outside fall in the end bins). The variance, unbounded above,
is binned in log(x) over [1e-10, 1e4] (0.05 % relative bin width); the bounded scores
(entropy <= log C, 1-msp <= 1 - 1/C, JS <= log 2) in log(x / (bound - x)), equally fine next
to 0 and next to the bound (a near-uniform softmax piles up there): 0.13 % relative width of
x and of bound - x, from 1e-30 to 1e-7 of the bound (float32 resolution). AUROC and AUPR are exact for the binned scores;
against the unbinned scores only the order of a correct and a wrong pixel in the *same* bin
is lost, and :meth:`UncertaintyMeter.compute` returns the worst case of that error: for
AUROC ``0.5 * sum_b wrong_b * correct_b / (P * N)``,
for AUPR the spread between every bin's best and worst inner ordering. Pixels piled in an end
bin (e.g. softmax scores below 1e-30 where float32 exp underflows) show up in that bound.
Scores are computed in float32 with cancellation-free formulas (1 - p and the entropy from
the sum of the non-maximal exp(logit - max), so they keep their relative precision down to
1e-30); the JS divergence is accurate to about 1e-7 nats absolute.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

SCORES = ("variance", "entropy", "1-msp", "disagreement")
ECE_BINS = 15
DEFAULT_BINS = 65536
# (low, high) of the bins per score; None: high is the score's bound for C classes
DEFAULT_RANGES: Dict[str, Tuple[float, Optional[float]]] = {
    "variance": (1e-10, 1e4),          # the loss's exp(var) term rules out larger values
    "entropy": (1e-30, None),          # log C
    "1-msp": (1e-30, None),            # 1 - 1/C
    "disagreement": (1e-30, math.log(2.0)),
}
# 'log': bins equal in log(x); 'logit': equal in log(x / (high - x)), for bounded scores
BIN_SCALES = {"variance": "log", "entropy": "logit", "1-msp": "logit", "disagreement": "logit"}
TOP_GAP = 1e-7                         # logit scale: high - x below TOP_GAP * high is one bin
CHUNK = 1 << 18                        # pixels per step: bounds the temporaries ([C, CHUNK])

ArrayLike = Union[np.ndarray, torch.Tensor]


# ----------------------------------------------------------------------------- scores

def softmax_scores(logits: torch.Tensor, pred: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy, 1 - p(pred) and p(pred) of softmax(logits) per pixel, float32 [N] each.

    logits: [C, N] (any float dtype, computed in float32); pred: int64 [N] (default: argmax).
    With d_j = x_j - max x and q_j = exp(d_j): Z = 1 + s, s = sum of q_j over the non-maximal
    j, H = log1p(s) - sum_j q_j d_j / Z and 1 - p(pred) = (Z - q_pred) / Z, where Z - q_pred
    is summed without the predicted class, so small values keep their relative precision.
    """
    x = logits.float()
    xmax, amax = x.max(0)
    d = x - xmax
    q = d.exp()
    s_max = q.scatter(0, amax[None], 0.0).sum(0)
    z = 1.0 + s_max
    entropy = (torch.log1p(s_max) - (q * d).sum(0) / z).clamp_min(0.0)
    if pred is None or torch.equal(pred, amax):
        q_pred, s_other = torch.ones_like(s_max), s_max
    else:
        q_pred = q.gather(0, pred[None])[0]
        s_other = q.scatter(0, pred[None], 0.0).sum(0)
    total = q_pred + s_other
    return entropy, s_other / total, q_pred / total


def js_divergence(logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, log 2]) of softmax(logits1), softmax(logits2).

    logits1, logits2: [C, N]; returns float32 [N]. JS = (KL(p1||m) + KL(p2||m)) / 2 with
    m = (p1 + p2) / 2, from log-softmax values (rounding below about 1e-7 is clamped at 0).
    """
    lp1 = torch.log_softmax(logits1.float(), 0)
    lp2 = torch.log_softmax(logits2.float(), 0)
    lm = torch.logaddexp(lp1, lp2) - math.log(2.0)
    js = 0.5 * ((lp1.exp() * (lp1 - lm)).sum(0) + (lp2.exp() * (lp2 - lm)).sum(0))
    return js.clamp_min(0.0)


# ----------------------------------------------------------------------------- metrics

def binned_auroc(correct: ArrayLike, wrong: ArrayLike) -> Tuple[float, float]:
    """AUROC of error detection from per-bin counts (bins in ascending score order).

    correct, wrong: int [B] pixel counts per bin. Returns (auroc, bound): the AUROC of the
    binned scores (pairs in one bin count 1/2) and the largest possible difference to the
    AUROC of the unbinned scores, 0.5 * sum_b wrong_b correct_b / (P N). NaN without both
    classes.
    """
    n = np.asarray(correct, dtype=np.float64)
    p = np.asarray(wrong, dtype=np.float64)
    P, N = p.sum(), n.sum()
    if P == 0 or N == 0:
        return float("nan"), float("nan")
    below = np.cumsum(n) - n                     # correct pixels in lower bins
    ties = float((p * n).sum())
    auroc = (float((p * below).sum()) + 0.5 * ties) / (P * N)
    return auroc, 0.5 * ties / (P * N)


def binned_aupr(correct: ArrayLike, wrong: ArrayLike) -> Tuple[float, float, float]:
    """Average precision of error detection from per-bin counts (bins in ascending order).

    Returns (ap, lo, hi): the AP of the binned scores (thresholds at bin edges from the top,
    precision at the end of each bin, as sklearn for tied scores), and bounds of the AP of
    the unbinned scores over every order inside the bins: ``hi`` ranks a bin's wrong pixels
    before its correct ones (and ties them), ``lo`` after them, one by one. NaN without
    wrong pixels.
    """
    n = np.asarray(correct, dtype=np.float64)[::-1]     # descending score
    p = np.asarray(wrong, dtype=np.float64)[::-1]
    P = p.sum()
    if P == 0:
        return float("nan"), float("nan"), float("nan")
    tp = np.cumsum(p)
    fp = np.cumsum(n)
    tp0, fp0 = tp - p, fp - n                          # counts ranked above the bin
    has = p > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = float(np.where(has, p * tp / (tp + fp), 0.0).sum() / P)
        hi = float(np.where(has, p * tp / (tp0 + fp0 + p), 0.0).sum() / P)
    # the k-th of a bin's wrong pixels ranked after all its correct ones has precision
    # (tp0 + k) / (c + k), c = tp0 + fp0 + n; summed over k = 1..p that is
    # p - (fp0 + n) * sum_k 1/(c + k), and as 1/x is convex the midpoint rule bounds
    # sum_k 1/(c + k) <= log((c + p + 1/2) / (c + 1/2)), so `lo` is a true lower bound
    c = tp0 + fp0 + n
    harmonic_up = np.log1p(p / (c + 0.5))
    lo = float(np.where(has, p - (fp0 + n) * harmonic_up, 0.0).sum() / P)
    return ap, max(0.0, min(lo, ap)), min(1.0, max(hi, ap))


def expected_calibration_error(count: ArrayLike, correct: ArrayLike,
                               conf_sum: ArrayLike) -> float:
    """ECE = sum_k n_k / N |acc_k - conf_k| from per-bin pixel counts, correct counts and
    sums of confidence (any number of bins). NaN when empty."""
    count = np.asarray(count, dtype=np.float64)
    N = count.sum()
    if N == 0:
        return float("nan")
    gap = np.abs(np.asarray(correct, dtype=np.float64) - np.asarray(conf_sum, dtype=np.float64))
    return float(gap.sum() / N)          # n_k |acc_k - conf_k| = |correct_k - conf_sum_k|


# ----------------------------------------------------------------------------- meter

class UncertaintyMeter:
    """Running histograms for error detection and calibration (kept on ``device``).

    num_classes: C. bins: bins per score (scales: :data:`BIN_SCALES`). ranges: {score: (low,
    high)} overriding :data:`DEFAULT_RANGES` (``high`` None = the score's bound). Labels
    outside [0, C) (the ignore label 255) are left out.

    ``update(logits, var, label, logits2=None, pred=None, logits1=None)`` adds images;
    ``compute()`` gives the numbers; ``merge(state)`` / ``all_reduce()`` sum other processes'
    histograms in; ``state()`` gives them as numpy arrays (picklable).
    """

    def __init__(self, num_classes: int, device: Union[str, torch.device] = "cpu", *,
                 bins: int = DEFAULT_BINS,
                 ranges: Optional[Mapping[str, Tuple[float, Optional[float]]]] = None):
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if int(bins) < 2:
            raise ValueError(f"uncertainty bins must be >= 2, got {bins}")
        self.num_classes = int(num_classes)
        self.bins = int(bins)
        self.device = torch.device(device)
        bound = {"entropy": math.log(self.num_classes), "1-msp": 1.0 - 1.0 / self.num_classes}
        self.ranges: Dict[str, Tuple[float, float]] = {}
        for name in SCORES:
            lo, hi = (ranges or {}).get(name, DEFAULT_RANGES[name])
            hi = bound[name] if hi is None else hi
            if not (0 < lo < hi):
                raise ValueError(f"uncertainty range of {name} must satisfy 0 < low < high, "
                                 f"got ({lo}, {hi})")
            self.ranges[name] = (float(lo), float(hi))
        # hist[s, 0, b]: correct pixels of score s in bin b; hist[s, 1, b]: wrong ones
        self.hist = torch.zeros(len(SCORES), 2, self.bins, dtype=torch.int64, device=self.device)
        # per confidence bin: wrong and correct pixel counts, and the float64 confidence sum
        self.ece_counts = torch.zeros(2, ECE_BINS, dtype=torch.int64, device=self.device)
        self.ece_conf = torch.zeros(ECE_BINS, dtype=torch.float64, device=self.device)

    # -- accumulation --------------------------------------------------------------------

    def _bin(self, name: str, score: torch.Tensor) -> torch.Tensor:
        """Bin index in [0, bins) of scores (NaN goes to the top bin), see BIN_SCALES."""
        lo, hi = self.ranges[name]
        s = torch.nan_to_num(score.float(), nan=hi, posinf=hi).clamp(lo, hi)
        if BIN_SCALES[name] == "log":
            t, tlo, thi = s.log(), math.log(lo), math.log(hi)
        else:  # hi - s is exact in float32 (Sterbenz), so the top end keeps its resolution
            t = s.log() - (hi - s).clamp_min(hi * TOP_GAP).log()
            tlo, thi = math.log(lo) - math.log(hi - lo), -math.log(TOP_GAP)
        idx = ((t - tlo) * (self.bins / (thi - tlo))).floor().long()
        return idx.clamp_(0, self.bins - 1)

    def _add(self, name: str, score: torch.Tensor, wrong: torch.Tensor) -> None:
        idx = self._bin(name, score) + wrong.long() * self.bins
        self.hist[SCORES.index(name)] += torch.bincount(
            idx, minlength=2 * self.bins).view(2, self.bins)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, var: Optional[torch.Tensor], label: ArrayLike,
               logits2: Optional[torch.Tensor] = None, *, pred: Optional[torch.Tensor] = None,
               logits1: Optional[torch.Tensor] = None) -> None:
        """Add one image ([C, H, W]) or a batch ([B, C, H, W]).

        logits: class scores of the evaluated model (mean logits, not softmax), [B,] C, H, W.
        var: variance map [B, 1, H, W], [B, H, W] or [H, W], or None (no variance score).
        label: int [B,] H, W; pixels outside [0, C) (255) are left out.
        logits2: the second branch's logits, same shape: the disagreement score is the JS
            divergence between ``logits1`` (default ``logits``) and ``logits2``; None: no
            disagreement score. Pass ``logits1`` when ``logits`` is not branch 1's own
            output (e.g. the mean of both branches).
        pred: int [B,] H, W, the prediction that is right or wrong (default argmax of logits).
        """
        if logits.dim() == 3:
            logits = logits[None]
        if logits.dim() != 4:
            raise ValueError(f"logits must be [C, H, W] or [B, C, H, W], got "
                             f"{tuple(logits.shape)}")
        B, C, H, W = logits.shape
        if C != self.num_classes:
            raise ValueError(f"logits have {C} classes but the meter was built for "
                             f"{self.num_classes}")
        dev = self.device

        def pixels(t, name):  # -> [B*H*W] (or [C, B*H*W] for class maps) on the device
            if t is None:
                return None
            if not isinstance(t, torch.Tensor):
                t = torch.from_numpy(np.asarray(t))
            t = t.to(dev)
            if name in ("logits2", "logits1"):
                t = t[None] if t.dim() == 3 else t
                if tuple(t.shape) != (B, C, H, W):
                    raise ValueError(f"{name} {tuple(t.shape)} differs from logits "
                                     f"{(B, C, H, W)}")
                return t.permute(1, 0, 2, 3).reshape(C, -1)
            if name == "var" and t.dim() == 4:
                t = t[:, 0]
            t = t.reshape(-1)
            if t.numel() != B * H * W:
                raise ValueError(f"{name} has {t.numel()} pixels, logits {B * H * W} "
                                 f"({B}x{H}x{W})")
            return t

        x = logits.to(dev).permute(1, 0, 2, 3).reshape(C, -1)
        lab = pixels(label, "label").long()
        keep = ((lab >= 0) & (lab < C)).nonzero().squeeze(1)
        if keep.numel() == 0:
            return
        v = pixels(var, "var")
        x2 = pixels(logits2, "logits2")
        x1 = pixels(logits1, "logits1") if logits1 is not None else x
        pr = pixels(pred, "pred")
        for start in range(0, keep.numel(), CHUNK):
            k = keep[start:start + CHUNK]
            xk = x[:, k]
            p_k = pr[k].long() if pr is not None else xk.argmax(0)
            wrong = p_k != lab[k]
            entropy, msp, conf = softmax_scores(xk, p_k)
            self._add("entropy", entropy, wrong)
            self._add("1-msp", msp, wrong)
            if v is not None:
                self._add("variance", v[k], wrong)
            if x2 is not None:
                self._add("disagreement", js_divergence(x1[:, k], x2[:, k]), wrong)
            cb = (conf * ECE_BINS).floor().long().clamp_(0, ECE_BINS - 1)
            self.ece_counts += torch.bincount(cb + ECE_BINS * (~wrong).long(),
                                              minlength=2 * ECE_BINS).view(2, ECE_BINS)
            self.ece_conf.index_add_(0, cb, conf.double())

    # -- merging -------------------------------------------------------------------------

    def state(self) -> Dict[str, np.ndarray]:
        """The histograms as numpy arrays: hist int64 [4, 2, bins] (score, correct/wrong, bin),
        ece_counts int64 [2, 15] (wrong/correct, confidence bin), ece_conf float64 [15]
        (confidence sums): what another process sends to :meth:`merge`."""
        return {"hist": self.hist.cpu().numpy(), "ece_counts": self.ece_counts.cpu().numpy(),
                "ece_conf": self.ece_conf.cpu().numpy()}

    def merge(self, other: Union["UncertaintyMeter", Mapping[str, ArrayLike]]) -> None:
        """Add another meter's histograms (a meter or its :meth:`state`); same bins needed."""
        st = other.state() if isinstance(other, UncertaintyMeter) else other
        for key in ("hist", "ece_counts", "ece_conf"):
            t = st[key]
            t = t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t))
            mine = getattr(self, key)
            if tuple(t.shape) != tuple(mine.shape):
                raise ValueError(f"cannot merge uncertainty histograms of shape "
                                 f"{tuple(t.shape)} into {tuple(mine.shape)} ({key}): "
                                 "build both meters with the same bins")
            mine += t.to(mine.device, mine.dtype)

    def all_reduce(self, group=None) -> None:
        """Sum the histograms of every process of ``group`` (torch.distributed, in place)."""
        import torch.distributed as tdist
        for t in (self.hist, self.ece_counts, self.ece_conf):
            tdist.all_reduce(t, group=group)

    def reset(self) -> None:
        self.hist.zero_()
        self.ece_counts.zero_()
        self.ece_conf.zero_()

    # -- results -------------------------------------------------------------------------

    def compute(self) -> Dict[str, object]:
        """The numbers, on the host.

        Returns ``pixels`` (labelled pixels), ``wrong`` (their wrong ones), ``error_rate``,
        ``scores`` {name: {auroc, auroc_err, aupr, aupr_lo, aupr_hi, aupr_err}} for the
        scores that were given (AUROC/AUPR in [0, 1]; *_err: worst-case binning error),
        ``ece`` (fraction) and ``reliability`` {edges [16], count [15], accuracy [15],
        confidence [15]} (NaN for empty bins).
        """
        hist = self.hist.cpu().numpy()
        wrong_c, right_c = self.ece_counts.cpu().numpy()
        count = wrong_c + right_c
        conf = self.ece_conf.cpu().numpy()
        total = int(count.sum())
        correct = int(right_c.sum())
        scores = {}
        for i, name in enumerate(SCORES):
            if hist[i].sum() == 0:
                continue
            auroc, auroc_err = binned_auroc(hist[i, 0], hist[i, 1])
            ap, lo, hi = binned_aupr(hist[i, 0], hist[i, 1])
            scores[name] = {"auroc": auroc, "auroc_err": auroc_err, "aupr": ap,
                            "aupr_lo": lo, "aupr_hi": hi,
                            "aupr_err": max(hi - ap, ap - lo) if ap == ap else float("nan")}
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = np.where(count > 0, right_c / np.maximum(count, 1), np.nan)
            mean_conf = np.where(count > 0, conf / np.maximum(count, 1), np.nan)
        return {"pixels": total, "wrong": total - correct,
                "error_rate": (total - correct) / total if total else float("nan"),
                "scores": scores,
                "ece": expected_calibration_error(count, right_c, conf),
                "reliability": {"edges": np.linspace(0.0, 1.0, ECE_BINS + 1),
                                "count": count, "accuracy": acc,
                                "confidence": mean_conf}}


# ----------------------------------------------------------------------------- output

def format_uncertainty(result: Mapping[str, object]) -> str:
    """A short text table of :meth:`UncertaintyMeter.compute` (no trailing newline)."""
    lines = [f"uncertainty: {result['wrong']} of {result['pixels']} labelled pixels wrong "
             f"({100 * result['error_rate']:.2f}%); error detection, wrong pixel = positive",
             f"{'score':<14}{'AUROC':>8}{'AUPR':>8}   binning error <= (AUROC, AUPR)"]
    for name in SCORES:
        s = result["scores"].get(name)
        if s is None:
            continue
        lines.append(f"{name:<14}{s['auroc']:>8.4f}{s['aupr']:>8.4f}   "
                     f"{s['auroc_err']:.1e}, {s['aupr_err']:.1e}")
    lines.append(f"ECE ({ECE_BINS} bins, softmax confidence): {100 * result['ece']:.3f}%")
    return "\n".join(lines)


def save_reliability_diagram(result: Mapping[str, object], path, title: str = "") -> None:
    """Write the reliability diagram PNG: accuracy per confidence bin against the diagonal,
    with the gap shaded and the pixel share per bin below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rel = result["reliability"]
    edges = np.asarray(rel["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc = np.nan_to_num(np.asarray(rel["accuracy"], dtype=np.float64))
    conf = np.asarray(rel["confidence"], dtype=np.float64)
    count = np.asarray(rel["count"], dtype=np.float64)
    share = count / max(count.sum(), 1.0)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(4.2, 5.2), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres, acc, width=width, color="#4a7fb5", edgecolor="black", linewidth=0.5,
           label="accuracy")
    filled = count > 0
    ax.bar(centres[filled], (np.nan_to_num(conf) - acc)[filled], bottom=acc[filled],
           width=width, color="#d9534f", alpha=0.35, edgecolor="#d9534f", label="gap")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"ECE {100 * result['ece']:.2f}%", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax2.bar(centres, share, width=width, color="#888", edgecolor="black", linewidth=0.5)
    ax2.set_xlabel("confidence (max softmax)")
    ax2.set_ylabel("pixels")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
