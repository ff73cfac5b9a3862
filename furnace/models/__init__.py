"""Models of the DUEB framework: ResNet backbones, DeepLabv3+ head, dual-branch network.

Public API::

    build_network(num_classes, backbone='resnet50', output_stride=16, pretrained=None, *,
                  stem='deep', eval_branch=1, learn_variance=False, pretrained_strict=True,
                  norm_layer=nn.BatchNorm2d) -> DualBranchNetwork
    param_groups(branch, lr, weight_decay=1e-4, learn_variance=None) -> list of SGD groups
    load_backbone_weights(backbone, path, strict=True) -> LoadResult
"""
from .deeplab import ASPP, Head
from .network import (BACKBONES, DualBranchNetwork, SingleNetwork, build_network,
                      network_from_config)
from .param_groups import param_groups
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101
from .u2pl import U2PLNetwork, u2pl_network_from_config
from .weights import LoadResult, load_backbone_weights

__all__ = [
    "ASPP",
    "BACKBONES",
    "DualBranchNetwork",
    "Head",
    "LoadResult",
    "ResNet",
    "SingleNetwork",
    "U2PLNetwork",
    "build_network",
    "load_backbone_weights",
    "network_from_config",
    "param_groups",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "u2pl_network_from_config",
]
