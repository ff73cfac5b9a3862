"""SGD parameter groups of one branch, as the reference ``group_weight`` builds them.

For ``backbone``, ``head`` and ``classifier`` in that order, two groups each:

1. decay: conv / linear weights, with ``weight_decay``;
2. no-decay (``weight_decay=0``): conv / linear biases and normalisation weights and biases
   (BatchNorm, SyncBatchNorm, GroupNorm, LayerNorm).

For ResNet-50 the sizes are 55/110, 10/12, 1/1. The variance head is in no group unless
``learn_variance`` (reference: never optimised); then it adds a decay and a no-decay group.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn

__all__ = ["param_groups"]

_WEIGHT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _split(name: str, module: nn.Module) -> tuple:
    """(decay, no_decay) parameter lists of ``module``, in ``modules()`` order."""
    decay, no_decay = [], []
    for m in module.modules():
        if isinstance(m, _WEIGHT_TYPES):
            decay.append(m.weight)
            if m.bias is not None:
                no_decay.append(m.bias)
        elif isinstance(m, _NORM_TYPES):
            no_decay.extend(p for p in (m.weight, m.bias) if p is not None)

    # Every parameter must land in exactly one group: one that is left out would silently stay
    # frozen, one that is listed twice makes torch.optim raise far from the cause.
    grouped = [id(p) for p in decay + no_decay]
    if len(grouped) != len(set(grouped)):
        raise RuntimeError(f"param_groups: a parameter of '{name}' is shared between modules")
    grouped_ids = set(grouped)
    left_out = [n for n, p in module.named_parameters() if id(p) not in grouped_ids]
    if left_out:
        raise RuntimeError(f"param_groups: parameters of '{name}' in modules of unsupported "
                           f"types (neither conv/linear nor normalisation): {left_out}")
    return decay, no_decay


def param_groups(branch: nn.Module, lr: float, weight_decay: float = 1e-4,
                 learn_variance: Optional[bool] = None) -> List[Dict]:
    """Parameter groups of one :class:`~furnace.models.SingleNetwork` for ``torch.optim.SGD``.

    Args:
        branch: a SingleNetwork (``model.branch1`` or ``model.branch2``).
        lr: learning rate written into every group.
        weight_decay: L2 factor of the decay groups (the no-decay groups get 0).
        learn_variance: include the variance head (two more groups at the end). None (default)
            follows ``branch.learn_variance``, which is False for the reference setting.

    Returns:
        A list of dicts with keys ``params``, ``lr``, ``weight_decay`` and ``name``
        (``'backbone.decay'``, ``'backbone.no_decay'``, ``'head.decay'``, ...): 6 groups, or
        8 with the variance head.
    """
    if learn_variance is None:
        learn_variance = getattr(branch, "learn_variance", False)
    names = ["backbone", "head", "classifier"] + (["variancelayer"] if learn_variance else [])
    groups = []
    for name in names:
        decay, no_decay = _split(name, getattr(branch, name))
        groups.append(dict(params=decay, lr=lr, weight_decay=weight_decay,
                           name=f"{name}.decay"))
        groups.append(dict(params=no_decay, lr=lr, weight_decay=0.0, name=f"{name}.no_decay"))
    return groups
