"""Supervised-only baseline: one DeepLabv3+ network trained on the labelled stream alone.

Checkpoint keys: ``model`` (``branch1.*``, the same layout as a DUEB branch 1, so DUEB
tooling and eval.py read it) and ``optimizer``. The legacy switch ``dueb.supervised_only=True``
selects this method.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import Config
from ..models import SingleNetwork
from ..models.network import branch_state_facts, norm_from_config
from ..precision import autocast, upcast
from .base import Method, MethodContext
from .common import make_sgd, sup_criterion
from .registry import register


class OneBranchNetwork(nn.Module):
    """One :class:`~furnace.models.SingleNetwork` as ``branch1``.

    ``model(x, step=1)`` (or any mode with ``step``) returns ``(feature, logits, var)``;
    eval-mode ``model(x)`` returns logits [B,C,H,W], as the dual network with eval_branch 1.
    """

    eval_branch = 1
    describe_state = staticmethod(branch_state_facts)

    def __init__(self, branch: SingleNetwork):
        super().__init__()
        self.branch1 = branch

    @property
    def num_classes(self) -> int:
        return self.branch1.num_classes

    def forward(self, x: torch.Tensor, step: Optional[int] = None):
        if step is not None or self.training:
            return self.branch1(x)
        return self.branch1(x)[1]


def one_branch_from_config(C: Config, pretrained: bool = True) -> OneBranchNetwork:
    """The single network of the config (backbone, output stride, stem, head width, weights)."""
    return OneBranchNetwork(SingleNetwork(
        C.num_classes, C.backbone, C.output_stride, stem=C.stem,
        pretrained=C.pretrained_model if pretrained else None,
        pretrained_strict=C.pretrained_strict, head_channels=C.head_channels,
        norm_layer=norm_from_config(C), backbone_width=C.get("backbone_width", 64)))


@register
class Supervised(Method):
    """Labelled data only, the config's supervised loss (CE or OHEM), one network."""

    name = "supervised"
    streams = ("labeled",)

    def __init__(self, C: Config, ctx: MethodContext):
        super().__init__(C, ctx)
        self.net = ctx.prepare(one_branch_from_config(C))
        self.modules = {"model": self.net}
        self.optimizers = {"optimizer": make_sgd(self.net.branch1, C)}
        self.criterion = sup_criterion(C, ctx.batch_per_process)

    def train_step(self, batches, *, iteration, epoch, backward):
        (lab,) = batches
        with autocast(lab["data"].device.type, self.ctx.amp):
            _, logits, var = self.net(lab["data"], step=1)
        logits = upcast(logits)
        loss = self.criterion(logits, lab["label"])
        backward(loss)
        loss = loss.detach()
        extras = {"image": lab["data"], "label": lab["label"], "logits": logits.detach(),
                  "var": upcast(var).detach()}
        return loss, {"loss_sup": loss, "loss": loss}, extras

    @classmethod
    def build_eval_model(cls, C: Config) -> nn.Module:
        return one_branch_from_config(C, pretrained=False)

    def log_line(self, values) -> str:
        return f"loss={values['loss']:.2f} [loss_sup={values['loss_sup']:.2f}]"
