"""DeepLabv3+ head of the reference DUEB network: ASPP and decoder.

Module names reproduce the reference state_dict keys (``head.aspp.map_convs.0.weight``,
``head.aspp.global_pooling_bn.*``, ``head.reduce.0.weight``, ``head.last_conv.4.*``, ...), and
modules are created in the reference order so that default-init random draws happen in the
same sequence.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ASPP", "Head", "init_weights"]

NormLayer = Callable[[int], nn.Module]

# Norm layers whose affine parameters get weight 1 / bias 0 (BatchNorm, SyncBatchNorm, GroupNorm).
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with an additive global-pooling branch.

    x [B, in_channels, h, w] -> [B, out_channels, h, w]:

    * four parallel convs (1x1 and three dilated 3x3), concatenated -> BN -> LeakyReLU -> 1x1;
    * global average of x -> 1x1 -> BN -> LeakyReLU -> 1x1, added at every position;
    * BN -> LeakyReLU(0.01).

    Note: in train mode the pooled-branch BN sees one value per channel and sample, so a batch
    of one sample fails (as in the reference).
    """

    def __init__(self, in_channels: int, out_channels: int = 256,
                 dilation_rates: Sequence[int] = (6, 12, 18), hidden_channels: int = 256,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_channels, hidden_channels, 1, bias=False)]
            + [nn.Conv2d(in_channels, hidden_channels, 3, padding=r, dilation=r, bias=False)
               for r in dilation_rates])
        self.map_bn = norm_layer(hidden_channels * len(self.map_convs))
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.global_pooling_bn = norm_layer(hidden_channels)
        self.red_conv = nn.Conv2d(hidden_channels * len(self.map_convs), out_channels, 1,
                                  bias=False)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)
        self.red_bn = norm_layer(out_channels)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([conv(x) for conv in self.map_convs], dim=1)
        out = self.red_conv(self.act(self.map_bn(out)))

        pool = x.mean(dim=(2, 3), keepdim=True)  # global pooling, in train and eval alike
        pool = self.act(self.global_pooling_bn(self.global_pooling_conv(pool)))
        pool = self.pool_red_conv(pool)

        # Broadcasting [B,C,1,1] over [B,C,h,w] equals the reference's repeat().
        return self.act(self.red_bn(out + pool))


class Head(nn.Module):
    """DeepLabv3+ decoder: ASPP on the last stage, fused with the stride-4 stage.

    Args:
        in_channels: channels of the last backbone stage (2048 for ResNet-50/101, 512 for 18/34).
        low_channels: channels of the first stage (256 for ResNet-50/101, 64 for 18/34).
        dilation_rates: ASPP rates, (6, 12, 18) at output stride 16.
        channels: ASPP and decoder width (256).
        low_reduced: channels the low-level features are reduced to (48).

    forward(features) takes the backbone's list of stage outputs and returns the decoder
    feature [B, channels, H1, W1] at the resolution of ``features[0]`` (stride 4).
    """

    def __init__(self, in_channels: int = 2048, low_channels: int = 256,
                 dilation_rates: Sequence[int] = (6, 12, 18), channels: int = 256,
                 low_reduced: int = 48, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, channels, dilation_rates, channels, norm_layer)
        self.reduce = nn.Sequential(
            nn.Conv2d(low_channels, low_reduced, 1, bias=False),
            norm_layer(low_reduced),
            nn.ReLU(),
        )
        self.last_conv = nn.Sequential(
            nn.Conv2d(channels + low_reduced, channels, 3, padding=1, bias=False),
            norm_layer(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            norm_layer(channels),
            nn.ReLU(),
        )

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        high = self.aspp(features[-1])
        low = self.reduce(features[0])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat([high, low], dim=1))


def init_weights(modules: Iterable[nn.Module]) -> None:
    """The reference ``init_weight``: kaiming-normal conv weights, norm weight 1 / bias 0.

    Conv weights get ``kaiming_normal_(mode='fan_in', nonlinearity='relu')`` (std sqrt(2/fan_in)),
    drawn in ``named_modules()`` order of each module in turn; conv biases keep their PyTorch
    default init.
    """
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, _NORM_TYPES):
                if getattr(m, "weight", None) is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
