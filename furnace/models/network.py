"""The DUEB networks: one DeepLabv3+ branch with mean and variance heads, and the dual model.

State-dict keys equal the reference (``branch1.backbone.conv1.0.weight``, ...,
``branch1.head.aspp.map_convs.0.weight``, ``branch1.classifier.weight``,
``branch1.variancelayer.weight``), so reference checkpoints load here and ours load there.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .deeplab import Head, init_weights
from .resnet import RESNET_SPECS, ResNet, resnet_name
from .weights import load_backbone_weights

__all__ = ["SingleNetwork", "DualBranchNetwork", "build_network", "BACKBONES"]

BACKBONES = tuple(RESNET_SPECS)  # ('resnet18', 'resnet34', 'resnet50', 'resnet101')
OUTPUT_STRIDES = (8, 16)
EVAL_BRANCHES = (1, 2, "mean")
STEMS = ("deep", "classic")
# ASPP rates per output stride: the reference's (6, 12, 18) at 16, doubled at 8 (DeepLabv3) so
# the rates cover the same image area on the twice finer feature grid.
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}

PathLike = Union[str, os.PathLike]


def _check_choice(name: str, value, allowed) -> None:
    # `True in (1, 2)` holds in Python, so reject bools explicitly.
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_net_arguments(num_classes, backbone: str, **sizes) -> None:
    """ValueError naming the argument unless ``num_classes`` is an integer >= 2, ``backbone``
    a ResNet of :data:`RESNET_SPECS` and every ``sizes`` value (channel counts) an integer
    >= 1 (the networks of U2PL and LPL)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    if backbone not in RESNET_SPECS:
        raise ValueError(f"backbone must be one of {', '.join(map(repr, RESNET_SPECS))}; "
                         f"got {backbone!r}")
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _check_arguments(num_classes, backbone, output_stride, stem) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (the aleatoric loss perturbs "
                         f"class logits against each other); got {num_classes!r}")
    _check_choice("backbone", backbone, BACKBONES)
    _check_choice("output_stride", output_stride, OUTPUT_STRIDES)
    _check_choice("stem", stem, STEMS)


class SingleNetwork(nn.Module):
    """One DUEB branch: ResNet backbone, DeepLabv3+ head, classifier and variance head.

    Args:
        num_classes: number of classes C (>= 2).
        backbone: one of ``BACKBONES``.
        output_stride: 16 (reference) or 8.
        stem: ``'deep'`` (v1c, reference) or ``'classic'`` (torchvision layout).
        norm_layer: normalisation layer, called as ``norm_layer(channels)``.
        learn_variance: if True the variance head is initialised like the classifier (and
            :func:`~furnace.models.param_groups` optimises it); if False (reference) it keeps
            the PyTorch default init and is never optimised.
        pretrained: local backbone weights file, or None to train from scratch.
        pretrained_strict: see :func:`~furnace.models.load_backbone_weights`.
        init_head: run :meth:`init_head_weights` at the end of construction. The dual network
            passes False and initialises both branches after building both, as the reference.
        head_channels: ASPP and decoder width (256 = reference); smaller widths make CPU-sized
            runs (the demo) cheaper.
        backbone_width: the ResNet's layer1 width (64 = reference; see ``ResNet``'s ``width``).

    ``forward(x)`` works in train and eval mode alike and returns ``(feature, logits, var)``:
    x [B,3,H,W] -> feature [B,head_channels,ceil(H/4),ceil(W/4)], logits [B,C,H,W]
    (unnormalised class scores) and var [B,1,H,W] (softplus variance of the logits, >= 0).
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", output_stride: int = 16,
                 *, stem: str = "deep", norm_layer=nn.BatchNorm2d, learn_variance: bool = False,
                 pretrained: Optional[PathLike] = None, pretrained_strict: bool = True,
                 init_head: bool = True, head_channels: int = 256,
                 backbone_width: int = 64) -> None:
        super().__init__()
        _check_arguments(num_classes, backbone, output_stride, stem)
        if isinstance(head_channels, bool) or not isinstance(head_channels, int) \
                or head_channels < 1:
            raise ValueError(f"head_channels must be a positive integer; got {head_channels!r}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.output_stride = output_stride
        self.learn_variance = bool(learn_variance)

        block, layers = RESNET_SPECS[backbone]
        self.backbone = ResNet(block, layers, stem=stem, output_stride=output_stride,
                               norm_layer=norm_layer, width=backbone_width)
        if pretrained is not None and str(pretrained) != "":
            load_backbone_weights(self.backbone, pretrained, strict=pretrained_strict)

        low_channels, high_channels = self.backbone.out_channels[0], self.backbone.out_channels[-1]
        self.head = Head(high_channels, low_channels, ASPP_RATES[output_stride],
                         channels=head_channels, norm_layer=norm_layer)
        self.classifier = nn.Conv2d(head_channels, num_classes, kernel_size=1, bias=True)
        self.variancelayer = nn.Conv2d(head_channels, 1, kernel_size=1, bias=True)
        self.softplus = nn.Softplus()  # beta 1, threshold 20, as the reference
        if init_head:
            self.init_head_weights()

    @property
    def business_layers(self) -> list:
        """The modules that get the kaiming init (and the 'head' lr schedule): head, classifier,
        plus the variance head when it is learned."""
        layers = [self.head, self.classifier]
        if self.learn_variance:
            layers.append(self.variancelayer)
        return layers

    def init_head_weights(self) -> None:
        """Re-draw the head weights (kaiming normal convs, norm weight 1 bias 0).

        Draws come from the global torch RNG, head first, then classifier (then variance head).
        """
        init_weights(self.business_layers)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,3,H,W] -> (feature [B,head_channels,H/4,W/4], logits [B,C,H,W], var [B,1,H,W])."""
        size = x.shape[-2:]
        feature = self.head(self.backbone(x))
        logits = self.classifier(feature)
        var = self.softplus(self.variancelayer(feature))  # softplus before upsampling
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        var = F.interpolate(var, size=size, mode="bilinear", align_corners=True)
        return feature, logits, var


def branch_state_facts(state) -> dict:
    """Backbone name and class count of a state dict with DUEB's branch keys
    (``branch1.backbone.*``, ``branch1.classifier.weight``; None where absent): what a
    checkpoint of this family was trained with, for the load error."""
    cls = state.get("branch1.classifier.weight")
    return {"backbone": resnet_name(state, "branch1.backbone"),
            "num_classes": int(cls.shape[0]) if cls is not None else None}


class DualBranchNetwork(nn.Module):
    """Two independent :class:`SingleNetwork` branches (``branch1``, ``branch2``).

    * ``model(x, step=1|2)`` returns the chosen branch's ``(feature, logits, var)``, in train
      and eval mode. In train mode ``step`` is required.
    * ``model(x)`` in eval mode returns the logits [B,C,H,W] of ``eval_branch``: 1 (reference),
      2, or ``'mean'`` (average of both branches' logits). Only the needed branches run.
    """

    describe_state = staticmethod(branch_state_facts)

    def __init__(self, branch1: SingleNetwork, branch2: SingleNetwork,
                 eval_branch: Union[int, str] = 1) -> None:
        super().__init__()
        self.branch1 = branch1
        self.branch2 = branch2
        self.eval_branch = eval_branch

    @property
    def eval_branch(self) -> Union[int, str]:
        return self._eval_branch

    @eval_branch.setter
    def eval_branch(self, value: Union[int, str]) -> None:
        _check_choice("eval_branch", value, EVAL_BRANCHES)
        self._eval_branch = value

    @property
    def num_classes(self) -> int:
        return self.branch1.num_classes

    def branch(self, step: int) -> SingleNetwork:
        """Branch 1 or 2."""
        _check_choice("step", step, (1, 2))
        return self.branch1 if step == 1 else self.branch2

    def forward(self, x: torch.Tensor, step: Optional[int] = None):
        """See the class docstring. x [B,3,H,W]."""
        if step is not None:
            return self.branch(step)(x)
        if self.training:
            raise ValueError("DualBranchNetwork in train mode needs the branch: call "
                             "model(x, step=1) or model(x, step=2) (or model.eval() first)")
        if self.eval_branch == "mean":
            return (self.branch1(x)[1] + self.branch2(x)[1]) / 2
        return self.branch(self.eval_branch)(x)[1]


def build_network(num_classes: int, backbone: str = "resnet50", output_stride: int = 16,
                  pretrained: Optional[PathLike] = None, *, stem: str = "deep",
                  eval_branch: Union[int, str] = 1, learn_variance: bool = False,
                  pretrained_strict: bool = True, head_channels: int = 256,
                  norm_layer=nn.BatchNorm2d, backbone_width: int = 64) -> DualBranchNetwork:
    """Build the DUEB dual-branch network.

    Args:
        num_classes: number of classes C (>= 2).
        backbone: ``'resnet18'``, ``'resnet34'``, ``'resnet50'`` (reference) or ``'resnet101'``.
        output_stride: 16 (reference: only layer4 dilated, 2/4/8) or 8.
        pretrained: local backbone weights file loaded into both branches, or None.
        stem: ``'deep'`` (v1c files) or ``'classic'`` (torchvision files).
        eval_branch: what eval-mode ``model(x)`` returns: 1, 2 or ``'mean'``.
        learn_variance: initialise (and let :func:`param_groups` optimise) the variance head.
        pretrained_strict: False accepts a file covering only part of the backbone.
        head_channels: ASPP and decoder width (256 = reference).
        norm_layer: normalisation layer for backbone and head (SyncBN is applied later by
            ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``).
        backbone_width: the ResNet's layer1 width (64 = reference).

    As in the reference, both branches are built first (PyTorch default init, pretrained
    weights) and the heads are then initialised, branch 1 before branch 2, so a fixed
    ``torch.manual_seed`` gives the same weights on every run.
    """
    _check_arguments(num_classes, backbone, output_stride, stem)
    _check_choice("eval_branch", eval_branch, EVAL_BRANCHES)
    kwargs = dict(stem=stem, norm_layer=norm_layer, learn_variance=learn_variance,
                  pretrained=pretrained, pretrained_strict=pretrained_strict, init_head=False,
                  head_channels=head_channels, backbone_width=backbone_width)
    branch1 = SingleNetwork(num_classes, backbone, output_stride, **kwargs)
    branch2 = SingleNetwork(num_classes, backbone, output_stride, **kwargs)
    branch1.init_head_weights()
    branch2.init_head_weights()
    return DualBranchNetwork(branch1, branch2, eval_branch=eval_branch)


def norm_from_config(C):
    """BatchNorm2d with the config's ``bn_eps`` and ``bn_momentum`` (the reference's 1e-5 and
    0.1 are torch's defaults), for backbone and head alike as the reference."""
    eps, momentum = C.get("bn_eps", 1e-5), C.get("bn_momentum", 0.1)
    if eps == 1e-5 and momentum == 0.1:
        return nn.BatchNorm2d
    return functools.partial(nn.BatchNorm2d, eps=eps, momentum=momentum)


def network_from_config(C, pretrained: bool = True) -> "DualBranchNetwork":
    """The dual-branch network an experiment config describes (keys ``num_classes``,
    ``backbone``, ``output_stride``, ``stem``, ``eval_branch``,
    ``dueb.aleatoric.learn_variance``, ``pretrained_model``, ``pretrained_strict``,
    ``head_channels``, ``backbone_width``, ``bn_eps``, ``bn_momentum``). ``pretrained=False``
    skips the ImageNet weights (evaluation loads a checkpoint over them anyway)."""
    return build_network(C.num_classes, C.backbone, C.output_stride,
                         C.pretrained_model if pretrained else None, stem=C.stem,
                         eval_branch=C.eval_branch,
                         learn_variance=C.dueb.aleatoric.learn_variance,
                         pretrained_strict=C.pretrained_strict,
                         head_channels=C.head_channels, norm_layer=norm_from_config(C),
                         backbone_width=C.get("backbone_width", 64))
