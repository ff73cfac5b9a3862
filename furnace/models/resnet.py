"""ResNet backbones for DeepLabv3+: the "v1c" deep-stem variant and the torchvision layout.

The module tree (and therefore every ``state_dict`` key) matches the reference DUEB backbone
(``furnace/base_model/resnet.py`` of the TorchSeg lineage), so ``resnet50_v1c.pth`` files and
reference checkpoints load unchanged:

* ``stem='deep'`` (v1c): ``conv1`` is a Sequential of three 3x3 convs 64-64-128 (indices 0, 3, 6,
  with BatchNorms at 1 and 4), followed by ``bn1`` = BN(128) + ReLU + 3x3/2 max-pool.
* ``stem='classic'``: a single 7x7/2 ``conv1`` and ``bn1`` = BN(64), as in torchvision, so
  torchvision ResNet state dicts load.

Blocks put the stride on the 3x3 conv (v1b/v1c, torchvision's v1.5).

Output stride (the ratio input size / layer4 size):

* 32: plain ResNet, no dilation (mainly for comparing against torchvision).
* 16 (the reference): layer4 is not strided; its blocks use the multi-grid dilations 2, 4, 8
  (``2 * (1, 2, 4)``) on their 3x3 convs, and its downsample 1x1 conv has stride 1.
* 8: layer3 is also not strided and all its 3x3 convs use dilation 2; layer4 keeps the same
  multi-grid pattern scaled by two more, i.e. dilations 4, 8, 16, so that the receptive-field
  growth relative to the feature grid is the same as at output stride 16.

In a BasicBlock (ResNet-18/34) both 3x3 convs of a block get that block's dilation, which is what
the reference's dilation surgery does to every 3x3 conv of a block.

Two construction flags choose between conventions that share every parameter and state_dict
key (the defaults are DUEB's; U2PL's backbone, torchvision's ``replace_stride_with_dilation``
convention, sets both the other way):

* ``dilate_first_block`` (True): block 0 of a newly dilated stage takes the stage's dilation.
  False keeps the previous stage's, so at output stride 8 layer3's block 0 uses dilation 1 and
  its other blocks 2 (layer4 is 4, 8, 16 either way, and at output stride 16 both agree).
* ``ceil_pool`` (False): the stem max-pool floors; True rounds up (``ceil_mode``), so an even
  input such as 512 gives 129 at stride 4 (as 513 does) instead of 128.

``dilation_pattern`` names the dilation convention of the dilated stages: ``'multi_grid'`` (the
default, everything above) or ``'encoding'``, PyTorch-Encoding's dilated ResNet (LPL's backbone,
output stride 8 only): every block of a stage with dilation d uses d except block 0, which uses
1 if d <= 2 else d / 2, so layer3 is 1, 2, 2, ... and layer4 2, 4, 4 (no multi-grid). In a
BasicBlock both 3x3 convs take the block's dilation here, while PyTorch-Encoding gives a block 0's
second conv the stage's dilation (it only matters for ResNet-18/34, which LPL does not use).

``in_chans`` (3) is the number of input channels of the stem's first convolution (ELN's
error-localisation network reads image, logits and entropy together).
"""
from __future__ import annotations

import re
from typing import Callable, List, Mapping, Optional, Sequence, Type, Union

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "RESNET_SPECS",
    "resnet_name",
]

NormLayer = Callable[[int], nn.Module]

# Dilation of each block's 3x3 convs in layer4, relative to the dilation of the stage before it.
MULTI_GRID = (1, 2, 4)
DILATION_PATTERNS = ("multi_grid", "encoding")



def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 conv without bias; padding equals dilation so the spatial size only depends on stride."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride,
                     padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). ``dilation`` applies to both convs."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 expanding by 4 (ResNet-50/101)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


def _encoding_rule(dilation: int) -> Callable[[int], int]:
    """PyTorch-Encoding's stage rule: block 0 takes 1 (stage dilation <= 2) or half the
    stage's dilation, every later block the stage's dilation."""
    first = 1 if dilation <= 2 else dilation // 2
    return lambda i: first if i == 0 else dilation


def _stage_plan(output_stride: int, dilate_first_block: bool = True,
                dilated: bool = True, dilation_pattern: str = "multi_grid") -> List[tuple]:
    """(stride, per-block dilation rule) for layer1..layer4 at the given output stride.

    The rule is a function ``block_index -> dilation``. ``dilated=False`` keeps the strides
    of ``output_stride`` but dilation 1 everywhere. ``dilation_pattern='encoding'`` is
    PyTorch-Encoding's output-stride-8 pattern (layer3 1,2,2,...; layer4 2,4,4).
    """
    def plain(_i: int) -> int:
        return 1

    if dilation_pattern not in DILATION_PATTERNS:
        raise ValueError(f"dilation_pattern must be one of {', '.join(DILATION_PATTERNS)}; "
                         f"got {dilation_pattern!r}")
    if dilation_pattern == "encoding":
        if output_stride != 8 or not dilated or not dilate_first_block:
            raise ValueError(
                "dilation_pattern='encoding' is PyTorch-Encoding's output-stride-8 pattern: "
                f"it needs output_stride=8 (got {output_stride!r}), dilated=True (got "
                f"{dilated!r}) and leaves dilate_first_block at its default (got "
                f"{dilate_first_block!r})")
        return [(1, plain), (2, plain), (1, _encoding_rule(2)), (1, _encoding_rule(4))]

    if not dilated:
        strides = {32: (1, 2, 2, 2), 16: (1, 2, 2, 1), 8: (1, 2, 1, 1)}.get(output_stride)
        if strides is None:
            raise ValueError(f"output_stride must be one of 8, 16, 32, got {output_stride!r}")
        return [(s, plain) for s in strides]

    if output_stride == 8 and not dilate_first_block:
        # torchvision convention: block 0 of the newly dilated layer3 still sees the stride-8
        # grid's previous dilation (1); only the blocks after it are dilated by 2.
        return [(1, plain), (2, plain), (1, lambda i: 1 if i == 0 else 2),
                (1, lambda i: 4 * MULTI_GRID[i % len(MULTI_GRID)])]

    if output_stride == 32:
        return [(1, plain), (2, plain), (2, plain), (2, plain)]
    if output_stride == 16:
        return [(1, plain), (2, plain), (2, plain),
                (1, lambda i: 2 * MULTI_GRID[i % len(MULTI_GRID)])]
    if output_stride == 8:
        return [(1, plain), (2, plain), (1, lambda _i: 2),
                (1, lambda i: 4 * MULTI_GRID[i % len(MULTI_GRID)])]
    raise ValueError(f"output_stride must be one of 8, 16, 32, got {output_stride!r}")


class ResNet(nn.Module):
    """ResNet feature extractor returning the outputs of the four stages.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        stem: ``'deep'`` (v1c, three 3x3 convs 64-64-128) or ``'classic'`` (one 7x7 conv).
        output_stride: 8, 16 (reference) or 32; see the module docstring.
        norm_layer: called as ``norm_layer(num_channels)``; default ``nn.BatchNorm2d``
            (eps 1e-5, momentum 0.1, as in the reference).
        dilate_first_block: False leaves layer3's block 0 undilated at output stride 8.
        ceil_pool: the stem max-pool rounds up (``ceil_mode=True``).
        in_chans: input channels of the stem's first convolution.
        dilation_pattern: ``'multi_grid'`` (default) or ``'encoding'`` (PyTorch-Encoding's
            output-stride-8 pattern, LPL); see the module docstring.
        dilated: False keeps the strides of ``output_stride`` without any dilation (ELN's
            error-localisation ResNet-34: layer4 at stride 1 and dilation 1).
        width: channels of layer1's blocks (64 = the reference); the stages have width x
            (1, 2, 4, 8) and the stem scales with it (a CPU-sized option, e.g. the demo's 16).

    Attributes:
        out_channels: channels of the four stage outputs, e.g. ``[256, 512, 1024, 2048]``.
        output_stride: the stride of layer4 relative to the input.
    """

    def __init__(self, block: Block, layers: Sequence[int], *, stem: str = "deep",
                 output_stride: int = 16, norm_layer: NormLayer = nn.BatchNorm2d,
                 stem_width: Optional[int] = None, dilate_first_block: bool = True,
                 ceil_pool: bool = False, in_chans: int = 3, width: int = 64,
                 dilated: bool = True, dilation_pattern: str = "multi_grid") -> None:
        super().__init__()
        if stem not in ("deep", "classic"):
            raise ValueError(f"stem must be 'deep' or 'classic', got {stem!r}")
        if len(layers) != 4:
            raise ValueError(f"layers must list 4 stage depths, got {list(layers)}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        plan = _stage_plan(output_stride, dilate_first_block, dilated, dilation_pattern)
        stem_width = width if stem_width is None else stem_width
        self.stem = stem
        self.output_stride = output_stride
        self.dilation_pattern = dilation_pattern

        if stem == "deep":
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_chans, stem_width, 3, stride=2, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, 3, stride=1, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, 2 * stem_width, 3, stride=1, padding=1, bias=False),
            )
            self.inplanes = 2 * stem_width
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=7, stride=2, padding=3,
                                   bias=False)
            self.inplanes = stem_width
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        # ceil_mode only matters for an even-sized stem output (e.g. 256 from a 512 input, pooled
        # to 129 instead of 128); U2PL rounds up so that 512 and 513 crops share one grid.
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=ceil_pool)

        planes = [width * k for k in (1, 2, 4, 8)]
        self.layer1 = self._make_layer(block, planes[0], layers[0], *plan[0], norm_layer)
        self.layer2 = self._make_layer(block, planes[1], layers[1], *plan[1], norm_layer)
        self.layer3 = self._make_layer(block, planes[2], layers[2], *plan[2], norm_layer)
        self.layer4 = self._make_layer(block, planes[3], layers[3], *plan[3], norm_layer)
        self.out_channels = [p * block.expansion for p in planes]

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int,
                    dilation_of: Callable[[int], int], norm_layer: NormLayer) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        stage = [block(self.inplanes, planes, stride, dilation_of(0), downsample, norm_layer)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, 1, dilation_of(i), None, norm_layer)
                  for i in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x [B,3,H,W] -> [layer1 (stride 4), layer2 (8), layer3 (16 or 8), layer4 (OS)].

        Entry i is [B, out_channels[i], ceil(H/s_i), ceil(W/s_i)] with s_i its stride in pixels
        (``ceil_pool=False``). ``ceil_pool=True`` rounds the stem pool up: layer1 has side
        floor(ceil(H/2) / 2) + 1 (513 -> 129, 512 -> 129, 769 -> 193), and each stride-2
        stage after it maps n to ceil(n/2) (129 -> 65, 193 -> 97).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(x)
        return feats


# name -> (block type, blocks per stage)
RESNET_SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


def resnet_name(state: Mapping[str, torch.Tensor], prefix: str) -> Optional[str]:
    """The RESNET_SPECS name of the ResNet whose keys start with ``prefix.`` in ``state``
    (layer3's block count and the block type), or None when unknown."""
    blocks = {int(m.group(1)) for k in state
              for m in [re.match(re.escape(prefix) + r"\.layer3\.(\d+)\.", k)] if m}
    bottleneck = f"{prefix}.layer1.0.conv3.weight" in state
    for name, (block, layers) in RESNET_SPECS.items():
        if (layers[2], block is Bottleneck) == (len(blocks), bottleneck):
            return name
    return None


def _build(name: str, **kwargs) -> ResNet:
    block, layers = RESNET_SPECS[name]
    return ResNet(block, layers, **kwargs)


def resnet18(**kwargs) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2); keyword arguments as :class:`ResNet`."""
    return _build("resnet18", **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3); keyword arguments as :class:`ResNet`."""
    return _build("resnet34", **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3); keyword arguments as :class:`ResNet`."""
    return _build("resnet50", **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (Bottleneck, 3-4-23-3); keyword arguments as :class:`ResNet`."""
    return _build("resnet101", **kwargs)
