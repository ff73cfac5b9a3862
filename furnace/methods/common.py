"""Pieces several methods share: the supervised criterion, the reference SGD groups and the
mean teacher's EMA step."""
from __future__ import annotations

import torch

from ..losses import CITYSCAPES_CLASS_WEIGHTS, OhemCrossEntropy, SupervisedCrossEntropy
from ..models import param_groups

IGNORE = 255


def sup_criterion(C, batch_per_process: int) -> torch.nn.Module:
    """CE (``sup_loss=ce``, VOC) or OHEM (``sup_loss=ohem``, Cityscapes) with ignore 255.

    OHEM's min_kept scales with the batch each process sees (50000 x B in the reference)."""
    if C.sup_loss == "ohem":
        weight = CITYSCAPES_CLASS_WEIGHTS if C.ohem_class_weight else None
        if weight is not None and len(weight) != C.num_classes:
            raise ValueError(f"config ohem_class_weight=True uses the 19 Cityscapes class "
                             f"weights but num_classes is {C.num_classes}; set "
                             "ohem_class_weight=False")
        min_kept = C.ohem_min_kept * batch_per_process // C.batch_size
        return OhemCrossEntropy(IGNORE, C.ohem_thresh, min_kept, weight)
    return SupervisedCrossEntropy(ignore_index=IGNORE)  # 0, not NaN, on an all-255 batch


def make_sgd(branch: torch.nn.Module, C, learn_variance: bool = False) -> torch.optim.SGD:
    """SGD over the reference's parameter groups of one branch (backbone / head, no decay on
    norm layers), momentum and weight decay from the config."""
    groups = param_groups(branch, C.lr, C.weight_decay, learn_variance=learn_variance)
    return torch.optim.SGD(groups, lr=C.lr, momentum=C.momentum, weight_decay=C.weight_decay)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """theta_t <- decay theta_t + (1 - decay) theta_s, in place, over parameters only (BN
    buffers not: U2PL's and ELN's teachers keep their own statistics)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s, alpha=1.0 - decay)
