"""ELN's networks (spec methods/ELN.md section 2): the segmentation network (classic-stem
ResNet at output stride 16 + the jfzhang95-style DeepLabv3+ decoder with a cls and a
projection head), the auxiliary decoders (copies of that decoder) and the error-localisation
network (ResNet-34 on [image, entropy, logits], its own ASPP, decoder and a 1-channel
classifier).

Layouts and shapes (input H x W, stride-4 side ``floor((ceil(H/2) - 1) / 2) + 1``, e.g.
505 -> 127, 512 -> 128):

* :class:`ELNSegNet` ``encoder`` (ResNet, classic stem, output stride 16, layer4 multi-grid
  2/4/8) returns layer1 [B,256,h4,w4] and layer4 [B,2048,h16,w16]; ``decoder``
  (:class:`ELNDecoder`) maps them to (logits [B,C,h4,w4], embeddings [B,proj_dim,h4,w4]).
* :class:`ErrorLocalizationNet` maps (image [B,3,H,W], logits [B,C,h,w]) to one logit per
  pixel [B,1,h4,w4] (> 0: the prediction is kept as correct).

``gt_mode=True`` switches every dropout off (the teacher's and the ELN's pseudo-label passes).
Widths scale with ``width`` (the ResNet's layer1 width, 64 = reference) and ``inner`` (the
decoder width, 256 = reference) for CPU-sized runs.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..resize import upsample
from .resnet import RESNET_SPECS, BasicBlock, ResNet
from .weights import _extract_state_dict, load_backbone_weights

__all__ = ["ELNASPP", "ELNDecoder", "ELNSegNet", "ErrorLocalizationNet", "eln_input",
           "load_eln_backbone_weights", "reference_init"]

PathLike = Union[str, os.PathLike]
ASPP_RATES = (1, 6, 12, 18)
LOW_CHANNELS = 48


def reference_init(module: nn.Module) -> None:
    """The reference ResNet's own init: conv weights N(0, sqrt(2 / (k*k*out))), BN 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


def _kaiming(modules: Sequence[nn.Module]) -> None:
    """kaiming_normal_ (fan_in, gain sqrt 2) on every conv, BN 1/0; biases keep their default."""
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()


def _cbr(cin: int, cout: int, k: int, norm_layer, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2),
                                   dilation=dilation, bias=False),
                         norm_layer(cout), nn.ReLU(inplace=True))


class ELNASPP(nn.Module):
    """ASPP: a 1x1 branch and 3x3 atrous branches (``rates``, rate 1 = the 1x1 branch), an
    image-pooling branch (GAP, 1x1 conv, ReLU, no BN; upsampled with align_corners=True),
    concatenated in that order, then 1x1 -> ``inner`` + BN + ReLU + Dropout(``dropout``).
    All convs are bias-free. [B,in_ch,h,w] -> [B,inner,h,w]."""

    def __init__(self, in_ch: int, inner: int = 256, rates: Sequence[int] = ASPP_RATES,
                 dropout: float = 0.1, norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            _cbr(in_ch, inner, 1 if r == 1 else 3, norm_layer, dilation=r) for r in rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                  nn.Conv2d(in_ch, inner, 1, bias=False), nn.ReLU(inplace=True))
        self.project = _cbr((len(rates) + 1) * inner, inner, 1, norm_layer)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, gt_mode: bool = False) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(upsample(self.pool(x), x.shape[-2:]))
        y = self.project(torch.cat(outs, dim=1))
        return y if gt_mode else self.dropout(y)


class _Fuse(nn.Module):
    """The DeepLabv3+ decoder body: low-level 1x1 -> 48 + BN + ReLU; [ASPP up, low] ->
    3x3 + BN + ReLU, Dropout(0.5), 3x3 + BN + ReLU, Dropout(0.1), 1x1 (bias) -> ``inner``."""

    def __init__(self, low_ch: int, inner: int, norm_layer, low_out: int = LOW_CHANNELS,
                 dropouts: Tuple[float, float] = (0.5, 0.1)) -> None:
        super().__init__()
        self.low = _cbr(low_ch, low_out, 1, norm_layer)
        self.conv1 = _cbr(inner + low_out, inner, 3, norm_layer)
        self.drop1 = nn.Dropout(dropouts[0])
        self.conv2 = _cbr(inner, inner, 3, norm_layer)
        self.drop2 = nn.Dropout(dropouts[1])
        self.last = nn.Conv2d(inner, inner, 1, bias=True)

    def forward(self, context: torch.Tensor, low: torch.Tensor,
                gt_mode: bool = False) -> torch.Tensor:
        low = self.low(low)
        x = torch.cat([upsample(context, low.shape[-2:]), low], dim=1)
        x = self.conv1(x)
        if not gt_mode:
            x = self.drop1(x)
        x = self.conv2(x)
        if not gt_mode:
            x = self.drop2(x)
        return self.last(x)


def _head(inner: int, out: int) -> nn.Sequential:
    """1x1 (bias) + ReLU + 1x1 (bias), PyTorch's default init."""
    return nn.Sequential(nn.Conv2d(inner, inner, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(inner, out, 1))


class ELNDecoder(nn.Module):
    """ASPP (dropout 0.1) + decoder body + ``cls`` (-> C) and ``proj`` (-> proj_dim) heads.

    ``forward(high, low, gt_mode=False, with_proj=True)`` -> (logits [B,C,h4,w4],
    embeddings [B,proj_dim,h4,w4] or None)."""

    def __init__(self, num_classes: int, low_ch: int, high_ch: int, inner: int = 256,
                 proj_dim: int = 128, norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        self.aspp = ELNASPP(high_ch, inner, ASPP_RATES, 0.1, norm_layer)
        self.fuse = _Fuse(low_ch, inner, norm_layer)
        _kaiming([self.aspp, self.fuse])
        self.cls = _head(inner, num_classes)
        self.proj = _head(inner, proj_dim)

    def forward(self, high: torch.Tensor, low: torch.Tensor, gt_mode: bool = False,
                with_proj: bool = True):
        f = self.fuse(self.aspp(high, gt_mode), low, gt_mode)
        return self.cls(f), (self.proj(f) if with_proj else None)


class ELNSegNet(nn.Module):
    """The segmentation network ``encoder`` + ``decoder`` (student and teacher alike).

    ``forward(x, gt_mode=False, raw=None)``; ``raw`` defaults to ``self.training``: raw gives
    (logits, embeddings) at stride 4, otherwise the logits upsampled (align_corners=True) to
    the input size (what the evaluator calls)."""

    def __init__(self, num_classes: int, backbone: str = "resnet101", *, width: int = 64,
                 inner: int = 256, proj_dim: int = 128, norm_layer=nn.BatchNorm2d,
                 pretrained: Optional[PathLike] = None, pretrained_strict: bool = True) -> None:
        super().__init__()
        if backbone not in RESNET_SPECS:
            raise ValueError(f"backbone must be one of {', '.join(RESNET_SPECS)}; "
                             f"got {backbone!r}")
        block, layers = RESNET_SPECS[backbone]
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.encoder = ResNet(block, layers, stem="classic", output_stride=16,
                              norm_layer=norm_layer, width=width)
        reference_init(self.encoder)
        if pretrained is not None and str(pretrained) != "":
            load_backbone_weights(self.encoder, pretrained, strict=pretrained_strict)
        ch = self.encoder.out_channels
        self.decoder = ELNDecoder(num_classes, ch[0], ch[3], inner, proj_dim, norm_layer)

    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(layer4, layer1) of the encoder."""
        f = self.encoder(x)
        return f[3], f[0]

    def forward(self, x: torch.Tensor, gt_mode: bool = False, raw: Optional[bool] = None,
                with_proj: bool = True):
        if raw is None:
            raw = self.training
        high, low = self.features(x)
        logits, emb = self.decoder(high, low, gt_mode, with_proj=with_proj and raw)
        if not raw:
            return upsample(logits, x.shape[-2:])
        return logits, emb


def eln_input(image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The ELN backbone's input [B, 3+1+C, H, W]: the image, the natural-log entropy of the
    softmax of the upsampled logits, and the raw upsampled logits (align_corners=True)."""
    up = upsample(logits.to(image.dtype), image.shape[-2:])
    logp = F.log_softmax(up, dim=1)
    ent = -(logp.exp() * logp).sum(dim=1, keepdim=True)
    return torch.cat([image, ent, up], dim=1)


def load_eln_backbone_weights(backbone: ResNet, path: PathLike,
                              load_shortcuts: bool = False) -> List[str]:
    """Load a torchvision ResNet-34 file into the ELN backbone as the reference does: every
    tensor but the stem conv (the backbone's reads 3+1+C channels) and, unless
    ``load_shortcuts``, the projection shortcuts (``layerN.0.downsample``: named ``shortcut``
    in the reference, so never loaded there). Returns the loaded keys; a missing file or
    a file lacking a needed tensor raises one clear line."""
    if not os.path.isfile(str(path)):
        raise FileNotFoundError(
            f"ELN backbone weights not found: '{path}'. Put torchvision's "
            "resnet34-333f7ec4.pth there, or set eln.eln_pretrained=None to train the ELN "
            "backbone from scratch.")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read ELN backbone weights file '{path}': {exc}") from exc
    state = _extract_state_dict(obj, path)
    own = backbone.state_dict()
    skip = {"conv1.weight"}
    if not load_shortcuts:
        skip |= {k for k in own if ".0.downsample." in k}
    want = [k for k in own if k not in skip and not k.endswith("num_batches_tracked")]
    missing = [k for k in want if k not in state]
    bad = [k for k in want if k in state and state[k].shape != own[k].shape]
    if missing or bad:
        raise ValueError(f"ELN backbone weights file '{path}' does not fit a ResNet-34: "
                         f"missing {missing[:3]}, shape mismatch {bad[:3]}")
    loaded = [k for k in own if k not in skip and k in state]
    backbone.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return loaded


class ErrorLocalizationNet(nn.Module):
    """The ELN: ResNet-34 (classic stem over 3+1+C channels, strides 1/2/2/1, no dilation)
    -> ASPP (rates 1/6/12/18, dropout 0.5) -> decoder body (64-ch low level) -> classifier
    1x1 + ReLU + 1x1 -> 1 channel.

    ``forward(image, logits, gt_mode=False)`` -> [B,1,h4,w4] logits ("correct" where > 0).
    ``pretrained``: a torchvision resnet34 file, loaded by :func:`load_eln_backbone_weights`
    (``load_shortcuts`` False = reference); the stem conv keeps PyTorch's default init."""

    def __init__(self, num_classes: int, *, width: int = 64, inner: int = 256,
                 norm_layer=nn.BatchNorm2d, pretrained: Optional[PathLike] = None,
                 load_shortcuts: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = ResNet(BasicBlock, (3, 4, 6, 3), stem="classic", output_stride=16,
                               dilated=False, norm_layer=norm_layer, width=width,
                               in_chans=4 + num_classes)
        reference_init(self.backbone)
        if pretrained is not None and str(pretrained) != "":
            load_eln_backbone_weights(self.backbone, pretrained, load_shortcuts)
        self.backbone.conv1.reset_parameters()   # the new stem: PyTorch's default init
        ch = self.backbone.out_channels
        self.aspp = ELNASPP(ch[3], inner, ASPP_RATES, 0.5, norm_layer)
        self.fuse = _Fuse(ch[0], inner, norm_layer)
        _kaiming([self.aspp, self.fuse])
        self.classifier = _head(inner, 1)

    def head_modules(self) -> List[nn.Module]:
        return [self.aspp, self.fuse, self.classifier]

    def forward(self, image: torch.Tensor, logits: torch.Tensor,
                gt_mode: bool = False) -> torch.Tensor:
        f = self.backbone(eln_input(image, logits.detach()))
        x = self.fuse(self.aspp(f[3], gt_mode), f[0], gt_mode)
        return self.classifier(x)


def count_tensors(modules: Sequence[nn.Module]) -> Dict[str, int]:
    """Conv and BN parameter-tensor counts of ``modules`` (diagnostics, tests)."""
    conv = sum(len(list(m.parameters(recurse=False))) for mod in modules
               for m in mod.modules() if isinstance(m, nn.Conv2d))
    bn = sum(len(list(m.parameters(recurse=False))) for mod in modules
             for m in mod.modules() if isinstance(m, nn.BatchNorm2d))
    return {"conv": conv, "bn": bn}
