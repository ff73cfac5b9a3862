"""Literal transcriptions of the reference DUEB losses (REFERENCE.md section 3).

These are the *baseline* for ``bench/losses.py`` and ``bench/train_step.py``: they follow the
reference algorithms statement by statement, with their costs (T autograd graphs kept alive,
host-side confusion matrix, per-class loops, full sort), so that the benchmark compares our
implementation against the reference formulation rather than against a straw man.  The only
departures are the ones needed to run at all without the reference repository: no ``.cuda()``
calls, ``sklearn.metrics.confusion_matrix`` replaced by the equivalent numpy ``np.add.at``
count on the host (same +1 diagonal trick), and maps created in the input dtype (the reference
relies on the default dtype, which breaks float64 runs).

Import from a script in ``bench/`` with ``from literal import ...`` or from elsewhere after
putting ``bench/`` on ``sys.path``.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("bench.literal")

__all__ = [
    "literal_aleatoric",
    "LiteralBayesCE",
    "literal_get_values",
    "literal_energy",
    "LiteralOhem",
    "literal_pseudo",
    "literal_unsup_ce",
    "LITERAL_CITY_WEIGHTS",
]

LITERAL_CITY_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786,
                        1.0023, 0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529,
                        1.0507]


# --------------------------------------------------------------------------- aleatoric (3.3)
class LiteralBayesCE(nn.Module):
    """``bayesian_categorical_crossentropy(T, num_classes)`` as in the reference.

    ``noise`` (optional, [T,B,C,H,W]) replaces the t-th ``Normal(0, std).sample((C,))`` after
    its transpose/squeeze, exactly as the golden vectors were produced.
    """

    def __init__(self, T: int = 10, num_classes: int = 19, ignore_index: int = 255):
        super().__init__()
        self.T = T
        self.num_classes = num_classes
        self.ce = nn.CrossEntropyLoss(ignore_index=ignore_index)

    def gaussian_categorical_crossentropy(self, pred, true, dist, undistorted_loss, t, noise):
        if noise is None:
            std_samples = torch.transpose(dist.sample((self.num_classes,)), 1, 0)
            std_samples = std_samples.squeeze()
        else:
            std_samples = noise[t].to(pred.dtype)
        distorted_loss = self.ce(pred + 1e-15 + std_samples, true)
        diff = undistorted_loss - distorted_loss
        return -F.elu(diff)

    def forward(self, logit, var, true, noise=None):
        std = torch.sqrt(var) + 1e-15
        variance_depressor = torch.exp(var) - torch.ones_like(var)
        undistorted_loss = self.ce(logit + 1e-15, true)
        dist = torch.distributions.normal.Normal(torch.zeros_like(std), std)
        monte_carlo_results = torch.stack(
            [self.gaussian_categorical_crossentropy(logit, true, dist, undistorted_loss, t, noise)
             for t in range(self.T)], dim=0)
        variance_loss = torch.mean(monte_carlo_results, dim=0) * undistorted_loss
        loss_final = variance_loss + undistorted_loss + variance_depressor
        return loss_final.mean()


def literal_aleatoric(logits, var, target, T=10, num_classes=None, noise=None, ignore_index=255):
    """A(z, v, y) computed the reference way (T graphs kept alive). Returns a scalar."""
    if num_classes is None:
        num_classes = logits.shape[1]
    return LiteralBayesCE(T, num_classes, ignore_index)(logits, var, target, noise)


# --------------------------------------------------------------------------- energy (3.4)
def literal_get_values(prob, target, n):
    """Per-class loop of the reference ``get_values``; keeps entries != 0.0 (1-D)."""
    out = torch.zeros_like(target) * torch.zeros((), dtype=prob.dtype)  # reference: * 0.0
    for c in range(n):
        m = target == c
        out[m] = prob[:, c][m]
    return out[out != 0.0]


def literal_energy(prob, target, n):
    """E = logsumexp(get_values(prob, target, n), 0): one scalar for the batch."""
    return torch.logsumexp(literal_get_values(prob, target, n), 0)


# --------------------------------------------------------------------------- OHEM (3.2)
class LiteralOhem(nn.Module):
    """``ProbOhemCrossEntropy2d(ignore_label, thresh, min_kept, use_weight)`` with a full sort."""

    def __init__(self, ignore_label=255, thresh=0.7, min_kept=100000, use_weight=True,
                 weight=None):
        super().__init__()
        self.ignore_label = ignore_label
        self.thresh = float(thresh)
        self.min_kept = int(min_kept)
        if use_weight:
            if weight is None:
                weight = torch.FloatTensor(LITERAL_CITY_WEIGHTS)
            self.criterion = nn.CrossEntropyLoss(reduction="mean", weight=weight,
                                                 ignore_index=ignore_label)
        else:
            self.criterion = nn.CrossEntropyLoss(reduction="mean", ignore_index=ignore_label)
        self.last_kept = None

    def forward(self, pred, target):
        b, c, h, w = pred.size()
        target = target.view(-1)
        valid_mask = target.ne(self.ignore_label)
        target = target * valid_mask.long()
        num_valid = valid_mask.sum()

        prob = F.softmax(pred, dim=1)
        prob = (prob.transpose(0, 1)).reshape(c, -1)

        if self.min_kept > num_valid:
            logger.info("Labels: {}".format(num_valid))
        elif num_valid > 0:
            prob = prob.masked_fill_(~valid_mask, 1)
            mask_prob = prob[target, torch.arange(len(target), dtype=torch.long,
                                                  device=target.device)]
            threshold = self.thresh
            if self.min_kept > 0:
                index = mask_prob.argsort()
                threshold_index = index[min(len(index), self.min_kept) - 1]
                if mask_prob[threshold_index] > self.thresh:
                    threshold = mask_prob[threshold_index]
                kept_mask = mask_prob.le(threshold)
                target = target * kept_mask.long()
                valid_mask = valid_mask * kept_mask

        target = target.masked_fill_(~valid_mask, self.ignore_label)
        target = target.view(b, h, w)
        self.last_kept = int(valid_mask.sum())
        if self.criterion.weight is not None and self.criterion.weight.dtype != pred.dtype:
            self.criterion.weight = self.criterion.weight.to(pred.dtype)
        return self.criterion(pred, target)


# --------------------------------------------------------------------------- pseudo (3.7/3.8)
def literal_pseudo(t1, t2, C, ignore_index=255):
    """Reference pseudo-label statements on the two mixed teacher logits.

    Returns a dict with the same fields as ``furnace.losses.pseudo_labels``: ``label1``,
    ``label2``, ``conf1``, ``conf2``, ``class_weight`` (float64 tensor), ``confusion``
    (numpy int64), ``overlap`` (python float), ``inter``, ``union``, ``weight_inter``,
    ``weight_union``.  ``inter``/``weight_inter`` feed the branch-1 unsup CE and
    ``union``/``weight_union`` the branch-2 one (see ``literal_unsup_ce``).
    """
    with torch.no_grad():
        ps_label_1 = torch.argmax(t1, dim=1).long()
        ps_label_2 = torch.argmax(t2, dim=1).long()
        loss_w_1 = torch.max(F.softmax(t1, dim=1), dim=1)[0]
        loss_w_2 = torch.max(F.softmax(t2, dim=1), dim=1)[0]

        # host-side confusion matrix, appended 0..C-1 as in the reference (sklearn there)
        y_true = np.concatenate([ps_label_1.cpu().numpy().flatten(), np.arange(C)])
        y_pred = np.concatenate([ps_label_2.cpu().numpy().flatten(), np.arange(C)])
        cm = np.zeros((C, C), dtype=np.int64)
        np.add.at(cm, (y_true, y_pred), 1)
        col = cm.sum(axis=0)
        row = cm.sum(axis=1)
        diag = np.diag(cm)
        w = (col - diag) / col + (row - diag) / row
        w = w / (w.sum() + 1e-6)
        overlap = float(np.trace(cm) / cm.sum())
        w = torch.from_numpy(w).to(t1.device)

        ps_label_inter = ps_label_1.clone()
        ps_label_inter[ps_label_1 != ps_label_2] = ignore_index

        disagree = ps_label_1 != ps_label_2
        first = w[ps_label_1] > w[ps_label_2]
        ps_label_union = ps_label_1.clone()
        take2 = disagree & ~first
        ps_label_union[take2] = ps_label_2[take2]

        weight_inter = (loss_w_1 + loss_w_2) / 2
        weight_union = weight_inter.clone()
        take1 = disagree & first
        weight_union[take1] = loss_w_1[take1]
        weight_union[take2] = loss_w_2[take2]
    return dict(label1=ps_label_1, label2=ps_label_2, conf1=loss_w_1, conf2=loss_w_2,
                class_weight=w, confusion=cm, overlap=overlap, inter=ps_label_inter,
                union=ps_label_union, weight_inter=weight_inter, weight_union=weight_union)


def literal_unsup_ce(logits, label, weight, ignore_index=255):
    """mean over all B*H*W pixels of CE_none(logits, label) * weight."""
    crit = nn.CrossEntropyLoss(reduction="none", ignore_index=ignore_index)
    return torch.mean(crit(logits, label) * weight)
