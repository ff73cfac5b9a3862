"""The U2PL network: ResNet (U2PL's dilation and stem pool, output stride 8) + U2PL's DeepLabv3+ decoder.

Spec: ``shared/methods/U2PL.md`` sections 2.1-2.4. This decoder is *not* the framework's
DeepLabv3+ head (:mod:`furnace.models.deeplab`): its ASPP has no 1x1 projection after the
concatenation, the low-level branch keeps ``inner_planes`` channels (no 48-channel reduction),
and the classifier is two 3x3 Conv-BN-ReLU-Dropout blocks before the final 1x1 conv. A second
head of the same shape (``representation``) gives the pixel embeddings of the contrastive loss.

Parameter names start with ``encoder.`` (the backbone learning-rate group), ``decoder.`` and
``aux.`` (the head group). Inside the decoder the module tree follows the reference
(``aspp.conv1`` = image pooling, ``aspp.conv2`` = 1x1, ``aspp.conv3..5`` = dilated 3x3;
``head``, ``low_conv``, ``classifier``, ``representation`` as Sequentials), so reference
decoder keys map one to one; the reference's auxiliary head keys ``auxor.aux.*`` are ``aux.*``
here.

All decoder and auxiliary layers keep PyTorch's default init, as the reference does.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .network import check_net_arguments, norm_from_config
from .resnet import RESNET_SPECS, ResNet, resnet_name
from .weights import load_backbone_weights

__all__ = ["U2PLASPP", "U2PLDecoder", "U2PLNetwork", "u2pl_network_from_config",
           "aux_head"]

PathLike = Union[str, os.PathLike]
AUX_CHANNELS = 256  # hidden width of the auxiliary head (fixed in the reference)
DROPOUT = 0.1


def _conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int, norm_layer, *, bias: bool,
                  dilation: int = 1) -> List[nn.Module]:
    # padding = dilation * (k // 2) keeps the spatial size for 1x1 and (dilated) 3x3 convs.
    return [nn.Conv2d(in_ch, out_ch, kernel_size, padding=dilation * (kernel_size // 2),
                      dilation=dilation, bias=bias),
            norm_layer(out_ch), nn.ReLU(inplace=True)]


class U2PLASPP(nn.Module):
    """ASPP with image pooling and no output projection.

    x [B,in_channels,h,w] -> [B,(2 + len(dilations)) * inner_planes,h,w], the branches
    concatenated in the order: image pooling, 1x1, then one dilated 3x3 per rate.
    Every conv is bias-free and followed by norm + ReLU.
    """

    def __init__(self, in_channels: int, inner_planes: int = 256,
                 dilations: Sequence[int] = (12, 24, 36), norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        if len(dilations) != 3:
            # the branch names conv3..conv5 (reference key layout) assume three rates
            raise ValueError(f"dilations must list 3 rates, got {list(dilations)}")
        self.conv1 = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                   *_conv_bn_relu(in_channels, inner_planes, 1, norm_layer,
                                                  bias=False))
        self.conv2 = nn.Sequential(*_conv_bn_relu(in_channels, inner_planes, 1, norm_layer,
                                                  bias=False))
        self.conv3, self.conv4, self.conv5 = (
            nn.Sequential(*_conv_bn_relu(in_channels, inner_planes, 3, norm_layer, bias=False,
                                         dilation=d))
            for d in dilations)
        self.out_channels = (2 + len(dilations)) * inner_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,C_in,h,w] -> [B,out_channels,h,w]."""
        pooled = F.interpolate(self.conv1(x), size=x.shape[-2:], mode="bilinear",
                               align_corners=True)
        return torch.cat([pooled, self.conv2(x), self.conv3(x), self.conv4(x), self.conv5(x)],
                         dim=1)


def _two_block_head(in_channels: int, inner_planes: int, out_channels: int,
                    norm_layer) -> nn.Sequential:
    """3x3(in->inner)+BN+ReLU+Drop, 3x3(inner->inner)+BN+ReLU+Drop, 1x1(inner->out), all biased."""
    return nn.Sequential(
        *_conv_bn_relu(in_channels, inner_planes, 3, norm_layer, bias=True),
        nn.Dropout2d(DROPOUT),
        *_conv_bn_relu(inner_planes, inner_planes, 3, norm_layer, bias=True),
        nn.Dropout2d(DROPOUT),
        nn.Conv2d(inner_planes, out_channels, kernel_size=1, bias=True),
    )


class U2PLDecoder(nn.Module):
    """U2PL's DeepLabv3+ decoder (``dec_deeplabv3_plus``) with optional representation head.

    Args:
        num_classes: C.
        low_channels: channels of the stride-4 feature (layer1: 256 for ResNet-50/101).
        high_channels: channels of the stride-8 feature (layer4: 2048 for ResNet-50/101).
        inner_planes: width of every ASPP branch, of ``head``, ``low_conv`` and both heads.
        dilations: the three ASPP rates.
        rep_head: build ``representation``.
        rep_dim: output channels of the representation head.
        norm_layer: normalisation layer, called as ``norm_layer(channels)``.

    ``forward([x1, x2, x3, x4])`` with x1 [B,low_channels,h,w] and x4 [B,high_channels,h8,w8]
    returns ``{'pred': [B,C,h,w]}`` plus ``'rep': [B,rep_dim,h,w]`` if built
    (``with_rep=False`` skips it).
    """

    def __init__(self, num_classes: int, low_channels: int, high_channels: int,
                 inner_planes: int = 256, dilations: Sequence[int] = (12, 24, 36),
                 rep_head: bool = True, rep_dim: int = 256, norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        self.rep_head = bool(rep_head)
        self.low_conv = nn.Sequential(*_conv_bn_relu(low_channels, inner_planes, 1, norm_layer,
                                                     bias=True))
        self.aspp = U2PLASPP(high_channels, inner_planes, dilations, norm_layer)
        self.head = nn.Sequential(
            *_conv_bn_relu(self.aspp.out_channels, inner_planes, 3, norm_layer, bias=False),
            nn.Dropout2d(DROPOUT))
        # both heads read the [low_feat, aspp] concatenation: 2 * inner_planes channels
        self.classifier = _two_block_head(2 * inner_planes, inner_planes, num_classes,
                                          norm_layer)
        if self.rep_head:
            self.representation = _two_block_head(2 * inner_planes, inner_planes, rep_dim,
                                                  norm_layer)

    def forward(self, feats: Sequence[torch.Tensor],
                with_rep: bool = True) -> Dict[str, torch.Tensor]:
        """feats = [layer1 [B,C1,h,w], layer2, layer3, layer4 [B,C4,h8,w8]] -> dict (see class)."""
        low, high = feats[0], feats[-1]
        low_feat = self.low_conv(low)
        context = self.head(self.aspp(high))
        context = F.interpolate(context, size=low_feat.shape[-2:], mode="bilinear",
                                align_corners=True)
        fused = torch.cat([low_feat, context], dim=1)
        out = {"pred": self.classifier(fused)}
        if self.rep_head and with_rep:
            out["rep"] = self.representation(fused)
        return out


def aux_head(in_channels: int, num_classes: int, norm_layer=nn.BatchNorm2d) -> nn.Sequential:
    """Auxiliary head on layer3: 3x3(in->256, bias)+BN+ReLU+Dropout2d(0.1)+1x1(256->C, bias).

    [B,in_channels,h8,w8] -> [B,C,h8,w8].
    """
    return nn.Sequential(*_conv_bn_relu(in_channels, AUX_CHANNELS, 3, norm_layer, bias=True),
                         nn.Dropout2d(DROPOUT),
                         nn.Conv2d(AUX_CHANNELS, num_classes, kernel_size=1, bias=True))


class U2PLNetwork(nn.Module):
    """U2PL segmentation network: ``encoder`` (ResNet with ``dilate_first_block=False`` and
    ``ceil_pool=True``, output stride 8), ``decoder`` (:class:`U2PLDecoder`) and, if ``aux``,
    ``aux`` (:func:`aux_head` on layer3).

    Args:
        num_classes: C (>= 2).
        backbone: ``'resnet18'``, ``'resnet34'``, ``'resnet50'`` or ``'resnet101'`` (reference).
        stem: ``'deep'`` (v1c, reference) or ``'classic'``.
        norm_layer: normalisation layer for encoder, decoder and aux head (SyncBN is applied
            later by ``nn.SyncBatchNorm.convert_sync_batchnorm``).
        inner_planes: decoder width (256 = reference; the decoder's ``low_conv`` maps layer1's
            channels to it, so ResNet-18/34 work too).
        dilations: ASPP rates (12, 24, 36 = reference).
        rep_head: build the representation head (U2PL: True; SupOnly: False).
        rep_dim: representation channels (256).
        aux: build the auxiliary head on layer3 (the reference's Cityscapes configs).
        pretrained: local backbone weights file (e.g. U2PL's ``resnet101.pth`` or a v1c file)
            loaded into the encoder, or None / '' to keep the random init.
        pretrained_strict: see :func:`~furnace.models.load_backbone_weights`.

    ``forward(x, raw=None)`` with x [B,3,H,W]; ``raw`` defaults to ``self.training``:

    * raw=True: ``{'pred': [B,C,h,w]}`` logits at stride 4, *not* upsampled
      (h = floor(ceil(H/2)/2) + 1, i.e. 129 for 513 and 193 for 769), plus
      ``'rep': [B,rep_dim,h,w]`` if ``rep_head`` and ``'aux': [B,C,h8,w8]`` (stride 8) if ``aux``.
    * raw=False: the ``pred`` logits upsampled bilinearly (align_corners=True) to [B,C,H,W]
      (what the evaluator calls in eval mode); the representation and aux heads are skipped.
    """

    @staticmethod
    def describe_state(state) -> dict:
        """Backbone name and class count of a U2PL state dict (``encoder.*``, the last 1x1
        conv ``decoder.classifier.8``; None where absent), for the load error."""
        cls = state.get("decoder.classifier.8.weight")
        return {"backbone": resnet_name(state, "encoder"),
                "num_classes": int(cls.shape[0]) if cls is not None else None}

    def __init__(self, num_classes: int, backbone: str = "resnet101", *, stem: str = "deep",
                 norm_layer=nn.BatchNorm2d, inner_planes: int = 256,
                 dilations: Sequence[int] = (12, 24, 36), rep_head: bool = True,
                 rep_dim: int = 256, aux: bool = False,
                 pretrained: Optional[PathLike] = None, pretrained_strict: bool = True,
                 backbone_width: int = 64) -> None:
        super().__init__()
        check_net_arguments(num_classes, backbone, inner_planes=inner_planes, rep_dim=rep_dim)
        self._num_classes = num_classes
        self.backbone_name = backbone

        block, layers = RESNET_SPECS[backbone]
        # torchvision's dilation convention and a ceil-mode stem pool (U2PL's backbone)
        self.encoder = ResNet(block, layers, stem=stem, output_stride=8, norm_layer=norm_layer,
                              dilate_first_block=False, ceil_pool=True, width=backbone_width)
        if pretrained is not None and str(pretrained) != "":
            load_backbone_weights(self.encoder, pretrained, strict=pretrained_strict)

        low_ch, _, mid_ch, high_ch = self.encoder.out_channels
        self.decoder = U2PLDecoder(num_classes, low_ch, high_ch, inner_planes, dilations,
                                   rep_head=rep_head, rep_dim=rep_dim, norm_layer=norm_layer)
        self.aux = aux_head(mid_ch, num_classes, norm_layer) if aux else None

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def rep_head(self) -> bool:
        return self.decoder.rep_head

    @property
    def has_aux(self) -> bool:
        return self.aux is not None

    def backbone_parameters(self) -> List[nn.Parameter]:
        """Encoder parameters (the reference's backbone learning-rate group)."""
        return list(self.encoder.parameters())

    def head_parameters(self) -> List[nn.Parameter]:
        """Aux head (if any) then decoder parameters, incl. the representation head (the
        reference's head group, in its order)."""
        modules = ([self.aux] if self.aux is not None else []) + [self.decoder]
        return [p for m in modules for p in m.parameters()]

    def forward(self, x: torch.Tensor, raw: Optional[bool] = None):
        """x [B,3,H,W] -> dict (raw) or logits [B,C,H,W]; see the class docstring."""
        if raw is None:
            raw = self.training
        feats = self.encoder(x)
        out = self.decoder(feats, with_rep=raw)
        if not raw:
            return F.interpolate(out["pred"], size=x.shape[-2:], mode="bilinear",
                                 align_corners=True)
        if self.aux is not None:
            out["aux"] = self.aux(feats[2])
        return out


def u2pl_network_from_config(C, pretrained: bool = True) -> U2PLNetwork:
    """The U2PL network an experiment config describes.

    Keys: ``num_classes``, ``backbone``, ``backbone_width``, ``stem``, ``head_channels``
    (-> ``inner_planes``),
    ``u2pl.rep_head``, ``u2pl.rep_dim``, ``u2pl.aux_weight`` (> 0 builds the aux head),
    ``pretrained_model``, ``pretrained_strict``, and ``bn_eps`` / ``bn_momentum`` through
    :func:`~furnace.models.network.norm_from_config`. ``pretrained=False`` skips the ImageNet
    weights (evaluation loads a checkpoint over them anyway).
    """
    u = C.u2pl
    return U2PLNetwork(C.num_classes, C.backbone, stem=C.stem, norm_layer=norm_from_config(C),
                       inner_planes=C.head_channels, rep_head=u.rep_head, rep_dim=u.rep_dim,
                       aux=u.aux_weight > 0,
                       pretrained=C.pretrained_model if pretrained else None,
                       pretrained_strict=C.pretrained_strict,
                       backbone_width=C.get("backbone_width", 64))
