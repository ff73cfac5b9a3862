"""The one resize of logit and feature maps that U2PL, ELN, LPL and the evaluator share."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[B,K,h,w] -> [B,K,*size], bilinear with align_corners=True (those references' resize
    of every logit and feature map)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
