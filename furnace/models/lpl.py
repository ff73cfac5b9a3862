"""LPL's DeepLabv3+ (spec ``methods/LPL.md`` sections 2.2, 2.3 and 10.1): a deep-stem ResNet at
output stride 8 with PyTorch-Encoding's dilation pattern (layer3 1,2,2,...; layer4 2,4,4) and
the reference's ASPP + decoder head.

The module tree follows the reference (``lib/net/deeplabv3plus.py``, ``operators/ASPP.py``),
so every ``state_dict`` key maps one to one::

    backbone.conv1.{0,1,3,4,6}.*, backbone.bn1.*, backbone.layer{1..4}.*
    aspp.branch{1..4}.{0,1}.*      1x1, then 3x3 with rate 6, 12, 18 (not doubled at OS 8)
    aspp.branch5_conv.weight, aspp.branch5_bn.*   image pooling
    aspp.conv_cat.{0,1}.*          1x1 -> head_channels + BN + ReLU + Dropout(0.5)
    shortcut_conv.{0,1}.*          3x3 layer1 -> shortcut_channels + BN + ReLU
    cat_conv.{0,1,3,4}.*           two 3x3 convs + BN + ReLU (no dropout)
    cls_conv.{weight,bias}         1x1 with bias

Head convs keep PyTorch's default init (the reference's kaiming line is commented out); head
BNs start at weight 1, bias 0. Widths follow ``head_channels`` and the backbone's channels, so
the CPU-sized demo (16-wide ResNet-18, 32 head channels) builds the same tree.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..resize import upsample as _upsample
from .network import check_net_arguments, norm_from_config
from .resnet import RESNET_SPECS, ResNet, resnet_name
from .weights import load_backbone_weights

__all__ = ["LPLASPP", "LPLHead", "LPLNet", "lpl_param_groups", "lpl_network_from_config",
           "reference_state_dict", "ASPP_RATES", "LR_MULTS"]

PathLike = Union[str, os.PathLike]
ASPP_RATES = (6, 12, 18)  # the reference's [0, 6, 12, 18]: 0 = the 1x1 branch
DROPOUT = 0.5
LR_MULTS = (1.0, 1.0, 10.0)  # backbone, head, cls_conv (TRAIN_LR_RATE)


def _conv_bn_relu(cin: int, cout: int, kernel_size: int, norm_layer,
                  dilation: int = 1) -> List[nn.Module]:
    # bias-free conv; padding = dilation * (k // 2) keeps the spatial size
    return [nn.Conv2d(cin, cout, kernel_size, padding=dilation * (kernel_size // 2),
                      dilation=dilation, bias=False),
            norm_layer(cout), nn.ReLU(inplace=True)]


class LPLASPP(nn.Module):
    """ASPP: 1x1 and three dilated 3x3 branches, an image-pooling branch (GAP, 1x1, BN, ReLU,
    upsampled with align_corners=True), concatenated in that order, then 1x1 -> ``channels``
    + BN + ReLU + Dropout(0.5). [B,in_channels,h,w] -> [B,channels,h,w]."""

    def __init__(self, in_channels: int, channels: int = 256,
                 rates: Sequence[int] = ASPP_RATES, norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        if len(rates) != 3:
            # branch2..branch4 are the reference's names for exactly three rates
            raise ValueError(f"rates must list 3 dilations, got {list(rates)}")
        self.branch1 = nn.Sequential(*_conv_bn_relu(in_channels, channels, 1, norm_layer))
        self.branch2, self.branch3, self.branch4 = (
            nn.Sequential(*_conv_bn_relu(in_channels, channels, 3, norm_layer, dilation=r))
            for r in rates)
        self.branch5_conv = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.branch5_bn = norm_layer(channels)
        self.branch5_relu = nn.ReLU(inplace=True)
        self.conv_cat = nn.Sequential(*_conv_bn_relu(5 * channels, channels, 1, norm_layer),
                                      nn.Dropout(DROPOUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.branch5_relu(self.branch5_bn(self.branch5_conv(
            F.adaptive_avg_pool2d(x, 1))))
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x),
                    _upsample(pooled, x.shape[-2:])]
        return self.conv_cat(torch.cat(branches, dim=1))


class LPLHead(nn.Module):
    """ASPP on layer4 + the decoder on layer1 + ``cls_conv``.

    ``forward(low [B,low_channels,h4,w4], high [B,high_channels,h8,w8])`` -> logits
    [B,num_classes,h4,w4] (not upsampled to the input).
    """

    def __init__(self, num_classes: int, low_channels: int, high_channels: int,
                 channels: int = 256, shortcut_channels: int = 48,
                 norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        self.aspp = LPLASPP(high_channels, channels, ASPP_RATES, norm_layer)
        self.shortcut_conv = nn.Sequential(
            *_conv_bn_relu(low_channels, shortcut_channels, 3, norm_layer))
        self.cat_conv = nn.Sequential(
            *_conv_bn_relu(channels + shortcut_channels, channels, 3, norm_layer),
            *_conv_bn_relu(channels, channels, 3, norm_layer))
        self.cls_conv = nn.Conv2d(channels, num_classes, 1, bias=True)
        _reset_norms(self)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return _decode(self, low, high)


def _decode(head: nn.Module, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The head's forward on any module holding ``aspp``, ``shortcut_conv``, ``cat_conv`` and
    ``cls_conv`` (an :class:`LPLHead`, or :class:`LPLNet`, which keeps them at top level)."""
    shortcut = head.shortcut_conv(low)
    context = _upsample(head.aspp(high), shortcut.shape[-2:])
    return head.cls_conv(head.cat_conv(torch.cat([context, shortcut], dim=1)))


def _reset_norms(module: nn.Module) -> None:
    """Norm layers weight 1, bias 0 (the reference's explicit head init; convs keep torch's)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class LPLNet(nn.Module):
    """LPL's segmentation network (HybridNet, PseudoNet and the retrained model alike).

    Args:
        num_classes: C (>= 2).
        backbone: ``'resnet18'``, ``'resnet34'``, ``'resnet50'`` or ``'resnet101'`` (reference).
        width: the ResNet's layer1 width (64 = reference; the demo uses 16).
        head_channels: ASPP and decoder width (256 = reference).
        shortcut_channels: channels of the layer1 shortcut (48 = reference).
        norm_layer: normalisation for backbone and head (SyncBN is applied later by
            ``nn.SyncBatchNorm.convert_sync_batchnorm``).
        pretrained: local backbone weights file (PyTorch-Encoding ``resnet101s`` or
            ``resnet101_v1c.pth``, same key layout) or None / '' for a random backbone. A
            missing or unfitting file raises at construction.
        pretrained_strict: see :func:`~furnace.models.load_backbone_weights`.

    The backbone keeps the framework's init (PyTorch defaults) when no weights are loaded;
    the reference draws N(0, sqrt(2/(k*k*out))) first but always overwrites it with ImageNet
    weights.

    Attributes ``backbone`` (:class:`~furnace.models.resnet.ResNet`, deep stem, output stride 8,
    ``dilation_pattern='encoding'``), ``aspp``, ``shortcut_conv``, ``cat_conv``, ``cls_conv``
    (top level, so the state-dict keys are the reference's).

    ``forward(x [B,3,H,W])`` -> logits [B,C,H,W], upsampled bilinearly (align_corners=True)
    from stride 4 to the input size, in train and eval mode alike.
    """

    @staticmethod
    def describe_state(state) -> dict:
        """Backbone name and class count of an LPL state dict (None where absent)."""
        cls = state.get("cls_conv.weight")
        return {"backbone": resnet_name(state, "backbone"),
                "num_classes": int(cls.shape[0]) if cls is not None else None}

    def __init__(self, num_classes: int, backbone: str = "resnet101", *, width: int = 64,
                 head_channels: int = 256, shortcut_channels: int = 48,
                 norm_layer=nn.BatchNorm2d, pretrained: Optional[PathLike] = None,
                 pretrained_strict: bool = True) -> None:
        super().__init__()
        check_net_arguments(num_classes, backbone, head_channels=head_channels,
                            shortcut_channels=shortcut_channels)
        self.num_classes = num_classes
        self.backbone_name = backbone

        block, layers = RESNET_SPECS[backbone]
        self.backbone = ResNet(block, layers, stem="deep", output_stride=8,
                               norm_layer=norm_layer, width=width, dilation_pattern="encoding")
        if pretrained is not None and str(pretrained) != "":
            load_backbone_weights(self.backbone, pretrained, strict=pretrained_strict)

        low_channels, high_channels = self.backbone.out_channels[0], self.backbone.out_channels[-1]
        head = LPLHead(num_classes, low_channels, high_channels, head_channels,
                       shortcut_channels, norm_layer)
        # the head's modules live at the top level: the reference's keys have no 'head.'
        self.aspp = head.aspp
        self.shortcut_conv = head.shortcut_conv
        self.cat_conv = head.cat_conv
        self.cls_conv = head.cls_conv

    def head_modules(self) -> List[nn.Module]:
        """The head, in the reference's construction order (aspp, shortcut, cat, cls)."""
        return [self.aspp, self.shortcut_conv, self.cat_conv, self.cls_conv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,3,H,W] -> logits [B,C,H,W]."""
        low, _, _, high = self.backbone(x)
        return _upsample(_decode(self, low, high), x.shape[-2:])


def lpl_param_groups(net: LPLNet, lr: float, mults: Tuple[float, float, float] = LR_MULTS,
                     weight_decay: float = 4e-5) -> List[Dict]:
    """The reference's three SGD groups (spec section 5).

    Args:
        net: an :class:`LPLNet`.
        lr: base learning rate (the engine later writes schedule_lr * lr_mult into each group).
        mults: multipliers of the backbone, head and ``cls_conv`` groups ((1, 1, 10)).
        weight_decay: applied to ALL parameters, BN weights and biases included (quirk 21).

    Returns:
        ``[{'name': 'backbone'|'head'|'cls', 'params': [...], 'lr': lr * mult,
        'lr_mult': mult, 'weight_decay': weight_decay}, ...]``; every parameter of ``net`` is
        in exactly one group.
    """
    if len(mults) != 3:
        raise ValueError(f"mults must give 3 multipliers (backbone, head, cls); got {mults!r}")
    groups: Dict[str, list] = {"backbone": [], "head": [], "cls": []}
    for name, p in net.named_parameters():
        if name.startswith("backbone."):
            groups["backbone"].append(p)
        elif name.startswith("cls_conv."):
            groups["cls"].append(p)
        else:
            groups["head"].append(p)
    return [dict(params=groups[name], lr=lr * float(mult), lr_mult=float(mult),
                 weight_decay=weight_decay, name=name)
            for name, mult in zip(("backbone", "head", "cls"), mults)]


def lpl_network_from_config(C, pretrained: bool = True) -> LPLNet:
    """The LPL network a config describes: keys ``num_classes``, ``backbone``,
    ``backbone_width`` (default 64), ``head_channels``, ``pretrained_model``,
    ``pretrained_strict`` and ``bn_eps`` / ``bn_momentum`` (through
    :func:`~furnace.models.network.norm_from_config`). ``pretrained=False`` skips the
    ImageNet weights (evaluation loads a checkpoint over them anyway)."""
    return LPLNet(C.num_classes, C.backbone, width=C.get("backbone_width", 64),
                  head_channels=C.head_channels, norm_layer=norm_from_config(C),
                  pretrained=C.pretrained_model if pretrained else None,
                  pretrained_strict=C.pretrained_strict)


def reference_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A reference checkpoint (README model zoo) as :class:`LPLNet` keys.

    The reference's names are LPLNet's; checkpoints saved from ``nn.DataParallel`` carry a
    ``module.`` prefix, which is stripped. A ``{'state_dict': ...}`` / ``{'model': ...}``
    wrapper is unwrapped. Non-tensor entries are dropped. Load the result with
    ``net.load_state_dict(..., strict=True)`` to catch any mismatch.
    """
    for wrapper in ("state_dict", "model"):
        inner = state.get(wrapper) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping):
            state = inner
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"an LPL checkpoint must be a state dict; got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out
