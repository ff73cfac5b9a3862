"""LPL's DeepLabv3+ (furnace.models.lpl): reference state-dict keys, PyTorch-Encoding dilations,
ASPP rates, shapes, parameter groups, checkpoint import and the LR check F of spec 10.3."""
import math

import pytest
import torch
from torch import nn

from furnace.config import Config
from furnace.engine.lr import ConstantLR, PolyLR, set_lr
from furnace.models.lpl import (LPLHead, LPLNet, lpl_network_from_config, lpl_param_groups,
                                reference_state_dict)
from furnace.models.resnet import RESNET_SPECS, ResNet, resnet18, resnet101


def _small(**kwargs):
    kwargs.setdefault("width", 16)
    kwargs.setdefault("head_channels", 32)
    return LPLNet(kwargs.pop("num_classes", 5), kwargs.pop("backbone", "resnet18"), **kwargs)


def _meta(*args, **kwargs):
    # the full-size network on the meta device: the module tree without allocating weights
    with torch.device("meta"):
        return LPLNet(*args, **kwargs)


def _conv_dilations(stage):
    """Dilation of every 3x3 conv of a stage, block by block."""
    return [[m.dilation[0] for m in block.modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)] for block in stage]


# --------------------------------------------------------------------------- keys

def test_reference_keys_at_resnet101():
    net = _meta(21)
    keys = list(net.state_dict())
    for key in ["backbone.conv1.0.weight", "backbone.conv1.1.running_var",
                "backbone.conv1.3.weight", "backbone.conv1.4.bias", "backbone.conv1.6.weight",
                "backbone.bn1.weight", "backbone.layer1.0.downsample.0.weight",
                "backbone.layer3.22.conv3.weight", "backbone.layer4.2.bn3.bias",
                "aspp.branch1.0.weight", "aspp.branch1.1.weight", "aspp.branch4.1.running_mean",
                "aspp.branch5_conv.weight", "aspp.branch5_bn.bias", "aspp.conv_cat.0.weight",
                "aspp.conv_cat.1.weight", "shortcut_conv.0.weight", "shortcut_conv.1.bias",
                "cat_conv.0.weight", "cat_conv.1.weight", "cat_conv.3.weight",
                "cat_conv.4.running_var", "cls_conv.weight", "cls_conv.bias"]:
        assert key in keys, key
    # no bias on any conv but cls_conv; no framework-only names
    assert not any(k.endswith(".0.bias") or k == "aspp.branch5_conv.bias" for k in keys)
    assert not any(k.startswith(("head.", "classifier.", "fc.")) for k in keys)
    with torch.device("meta"):
        plain = resnet101(stem="deep", output_stride=8)
    backbone_keys = [k[len("backbone."):] for k in keys if k.startswith("backbone.")]
    assert backbone_keys == list(plain.state_dict())
    head = {k for k in keys if not k.startswith("backbone.")}
    assert head == {"aspp.branch%d.%d.%s" % (b, i, s) for b in range(1, 5) for i, s in
                    [(0, "weight")] + [(1, s) for s in BN_KEYS]} \
        | {"aspp.branch5_conv.weight"} | {f"aspp.branch5_bn.{s}" for s in BN_KEYS} \
        | {"aspp.conv_cat.0.weight"} | {f"aspp.conv_cat.1.{s}" for s in BN_KEYS} \
        | {"shortcut_conv.0.weight"} | {f"shortcut_conv.1.{s}" for s in BN_KEYS} \
        | {"cat_conv.0.weight", "cat_conv.3.weight"} \
        | {f"cat_conv.{i}.{s}" for i in (1, 4) for s in BN_KEYS} \
        | {"cls_conv.weight", "cls_conv.bias"}


BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def test_head_shapes_follow_spec_widths():
    net = _meta(21)
    sd = net.state_dict()
    assert sd["aspp.branch1.0.weight"].shape == (256, 2048, 1, 1)
    assert sd["aspp.branch2.0.weight"].shape == (256, 2048, 3, 3)
    assert sd["aspp.branch5_conv.weight"].shape == (256, 2048, 1, 1)
    assert sd["aspp.conv_cat.0.weight"].shape == (256, 1280, 1, 1)
    assert sd["shortcut_conv.0.weight"].shape == (48, 256, 3, 3)  # 3x3, not 1x1
    assert sd["cat_conv.0.weight"].shape == (256, 304, 3, 3)
    assert sd["cat_conv.3.weight"].shape == (256, 256, 3, 3)
    assert sd["cls_conv.weight"].shape == (21, 256, 1, 1) and sd["cls_conv.bias"].shape == (21,)
    head_params = sum(p.numel() for n, p in net.named_parameters()
                      if not n.startswith("backbone."))
    bn = 2 * 256
    want = (2048 * 256 + 3 * 2048 * 256 * 9 + 2048 * 256 + 1280 * 256 + 6 * bn
            + 256 * 48 * 9 + 2 * 48 + 304 * 256 * 9 + 256 * 256 * 9 + 2 * bn + 256 * 21 + 21)
    assert head_params == want


def test_aspp_rates_and_dropout():
    net = _meta(21)
    assert net.aspp.branch1[0].kernel_size == (1, 1)
    for branch, rate in ((net.aspp.branch2, 6), (net.aspp.branch3, 12), (net.aspp.branch4, 18)):
        conv = branch[0]
        assert conv.kernel_size == (3, 3)
        assert conv.dilation == (rate, rate) and conv.padding == (rate, rate)  # not doubled
    drop = net.aspp.conv_cat[-1]
    assert isinstance(drop, nn.Dropout) and drop.p == 0.5
    assert not any(isinstance(m, nn.Dropout) for m in net.cat_conv)


# --------------------------------------------------------------------------- dilations

def test_encoding_dilation_pattern_resnet101():
    net = LPLNet(21, "resnet101", width=8, head_channels=8, shortcut_channels=8)
    bb = net.backbone
    assert _conv_dilations(bb.layer3) == [[1]] + [[2]] * 22
    assert _conv_dilations(bb.layer4) == [[2], [4], [4]]
    assert all(b.conv2.padding == b.conv2.dilation for b in list(bb.layer3) + list(bb.layer4))
    assert all(b.conv2.stride == (1, 1) for b in list(bb.layer3) + list(bb.layer4))
    assert bb.layer2[0].conv2.stride == (2, 2) and bb.output_stride == 8
    assert _conv_dilations(bb.layer1) == [[1]] * 3 and _conv_dilations(bb.layer2) == [[1]] * 4
    x = torch.randn(1, 3, 64, 48)
    feats = bb.eval()(x)
    assert [f.shape[-2:] for f in feats] == [(16, 12), (8, 6), (8, 6), (8, 6)]


def test_encoding_pattern_basic_block():
    bb = resnet18(output_stride=8, width=8, dilation_pattern="encoding")
    assert _conv_dilations(bb.layer3) == [[1, 1], [2, 2]]
    assert _conv_dilations(bb.layer4) == [[2, 2], [4, 4]]


def test_existing_resnet_defaults_unchanged():
    # the values every other method was built with before the 'encoding' option existed
    r16 = resnet101(width=8)
    assert r16.dilation_pattern == "multi_grid"
    assert _conv_dilations(r16.layer3) == [[1]] * 23
    assert _conv_dilations(r16.layer4) == [[2], [4], [8]]
    assert r16.layer3[0].conv2.stride == (2, 2)
    r8 = resnet101(width=8, output_stride=8)
    assert _conv_dilations(r8.layer3) == [[2]] * 23
    assert _conv_dilations(r8.layer4) == [[4], [8], [16]]
    r8tv = resnet101(width=8, output_stride=8, dilate_first_block=False)
    assert _conv_dilations(r8tv.layer3) == [[1]] + [[2]] * 22
    assert _conv_dilations(r8tv.layer4) == [[4], [8], [16]]
    r18 = resnet18(width=8, output_stride=8)
    assert _conv_dilations(r18.layer4) == [[4, 4], [8, 8]]
    # same seed, same weights as a network built without naming the option
    torch.manual_seed(0)
    a = resnet18(width=8)
    torch.manual_seed(0)
    b = resnet18(width=8, dilation_pattern="multi_grid")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_encoding_pattern_rejects_other_strides():
    with pytest.raises(ValueError, match="output_stride=8"):
        resnet18(output_stride=16, dilation_pattern="encoding")
    with pytest.raises(ValueError, match="dilate_first_block"):
        resnet18(output_stride=8, dilation_pattern="encoding", dilate_first_block=False)
    with pytest.raises(ValueError, match="dilation_pattern must be one of"):
        resnet18(output_stride=8, dilation_pattern="torchvision")


# --------------------------------------------------------------------------- forward / init

def test_forward_shape_at_input_size_train_and_eval():
    torch.manual_seed(0)
    net = _small()
    for h, w in ((64, 64), (57, 43)):
        x = torch.randn(2, 3, h, w)
        net.train()
        assert net(x).shape == (2, 5, h, w)
        net.eval()
        with torch.no_grad():
            out = net(x)
            assert out.shape == (2, 5, h, w) and torch.equal(out, net(x))  # no dropout in eval
    # the head reads layer1's channels whatever the block type (BasicBlock: 16)
    assert net.shortcut_conv[0].in_channels == 16 and net.aspp.branch1[0].in_channels == 128


def test_head_init_pytorch_default_and_bn_ones():
    torch.manual_seed(0)
    net = _small()
    for name, m in net.named_modules():
        if name.startswith("backbone"):
            continue
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            # kaiming_uniform(a=sqrt 5) draws in +-1/sqrt(fan_in); kaiming_normal would not
            assert m.weight.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7, name
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.eq(1).all() and m.bias.eq(0).all(), name
    assert net.cls_conv.bias.abs().sum() > 0  # default bias init, not zeros


def test_lplhead_standalone_matches_network_head():
    torch.manual_seed(0)
    head = LPLHead(4, 16, 64, channels=32)
    low, high = torch.randn(1, 16, 12, 12), torch.randn(1, 64, 6, 6)
    assert head.eval()(low, high).shape == (1, 4, 12, 12)
    assert {k.split(".")[0] for k in head.state_dict()} == {"aspp", "shortcut_conv",
                                                             "cat_conv", "cls_conv"}


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        LPLNet(1, "resnet18")
    with pytest.raises(ValueError, match="backbone must be one of"):
        LPLNet(3, "resnet152")
    with pytest.raises(ValueError, match="head_channels"):
        LPLNet(3, "resnet18", head_channels=0)


# --------------------------------------------------------------------------- weights / import

def test_pretrained_backbone_loads_and_missing_file_is_one_error(tmp_path):
    torch.manual_seed(1)
    source = ResNet(*RESNET_SPECS["resnet18"], stem="deep", width=16)
    path = tmp_path / "resnet18_v1c.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)
    net = _small(pretrained=path)
    for k, v in source.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        _small(pretrained=tmp_path / "nothere.pth")
    torch.save({k: v for k, v in source.state_dict().items() if "layer4" not in k}, path)
    with pytest.raises(ValueError, match="lacks"):
        _small(pretrained=path)
    _small(pretrained=path, pretrained_strict=False)


def test_reference_state_dict_maps_dataparallel_checkpoint():
    torch.manual_seed(2)
    source = _small()
    source.train()(torch.randn(2, 3, 32, 32))  # move the BN statistics off their init
    ckpt = {"module." + k: v for k, v in source.state_dict().items()}
    mapped = reference_state_dict(ckpt)
    assert list(mapped) == list(source.state_dict())
    target = _small()
    target.load_state_dict(mapped, strict=True)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(target.eval()(x), source.eval()(x))
    assert list(reference_state_dict({"state_dict": ckpt})) == list(mapped)
    assert LPLNet.describe_state(mapped) == {"backbone": "resnet18", "num_classes": 5}
    with pytest.raises(ValueError, match="state dict"):
        reference_state_dict([1, 2])


def test_from_config():
    cfg = Config(num_classes=4, backbone="resnet18", backbone_width=16, head_channels=24,
                 pretrained_model="/nonexistent/resnet101s.pth", pretrained_strict=True,
                 bn_eps=1e-5, bn_momentum=0.01)
    net = lpl_network_from_config(cfg, pretrained=False)
    assert net.cls_conv.out_channels == 4 and net.cat_conv[0].out_channels == 24
    assert net.shortcut_conv[0].in_channels == 16
    assert all(m.momentum == 0.01 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(FileNotFoundError, match="resnet101s.pth"):
        lpl_network_from_config(cfg)


# --------------------------------------------------------------------------- groups and LR

def test_param_groups():
    net = _small()
    groups = lpl_param_groups(net, 0.001)
    assert [g["name"] for g in groups] == ["backbone", "head", "cls"]
    assert [g["lr_mult"] for g in groups] == [1.0, 1.0, 10.0]
    assert [g["lr"] for g in groups] == pytest.approx([0.001, 0.001, 0.01], rel=1e-15)
    assert all(g["weight_decay"] == 4e-5 for g in groups)
    params = dict(net.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    names = [[by_id[id(p)] for p in g["params"]] for g in groups]
    assert len(names[0]) == len(list(net.backbone.parameters()))
    assert names[2] == ["cls_conv.weight", "cls_conv.bias"]
    assert len(names[1]) == len(params) - len(names[0]) - 2
    assert all(n.startswith("backbone.") for n in names[0])
    assert not any(n.startswith(("backbone.", "cls_conv.")) for n in names[1])
    assert sorted(sum(names, [])) == sorted(params)  # each parameter exactly once
    # weight decay on BN weights and biases too (quirk 21)
    assert "backbone.bn1.weight" in names[0] and "aspp.conv_cat.1.bias" in names[1]
    opt = torch.optim.SGD(groups, lr=0.001, momentum=0.9)
    assert [g["weight_decay"] for g in opt.param_groups] == [4e-5] * 3
    assert [len(g["params"]) for g in opt.param_groups] == [len(n) for n in names]
    custom = lpl_param_groups(net, 0.007, mults=(1, 2, 3), weight_decay=0.0)
    assert [g["lr"] for g in custom] == pytest.approx([0.007, 0.014, 0.021])


def _spec_poly(base, t, total):
    return base * (1 - t / (total + 1e-5)) ** 0.9


def test_f_learning_rates():
    net = _small()
    hybrid = torch.optim.SGD(lpl_param_groups(net, 0.001), lr=0.001, momentum=0.9)
    pseudo = torch.optim.SGD(lpl_param_groups(_small(), 0.001), lr=0.001, momentum=0.9)
    h_sched, p_sched = PolyLR(0.001, 0.9, 20000, eps=1e-5), ConstantLR(0.001)
    want = {0: 0.001, 10000: 5.3589e-4, 19999: 1.3461e-7}
    for t, value in want.items():
        set_lr([hybrid], h_sched.get_lr(t))
        set_lr([pseudo], p_sched.get_lr(t))
        lrs = [g["lr"] for g in hybrid.param_groups]
        exact = _spec_poly(0.001, t, 20000)
        assert lrs == pytest.approx([exact, exact, 10 * exact], rel=1e-9)
        assert lrs[0] == pytest.approx(value, rel=1e-4)
        assert [g["lr"] for g in pseudo.param_groups] == pytest.approx([0.001, 0.001, 0.01])
    retrain = PolyLR(0.007, 0.9, 30000, eps=1e-5)
    assert retrain.get_lr(15000) == pytest.approx(_spec_poly(0.007, 15000, 30000), rel=1e-9)
    assert retrain.get_lr(15000) == pytest.approx(3.7512e-3, rel=1e-4)
    # without eps the last step differs by ~9e-6 relative: the option is needed for F
    plain = PolyLR(0.001, 0.9, 20000)
    assert plain.eps == 0.0
    assert abs(plain.get_lr(19999) / _spec_poly(0.001, 19999, 20000) - 1) > 1e-6
    assert plain.get_lr(10000) == 0.001 * 0.5 ** 0.9  # default arithmetic unchanged
    with pytest.raises(ValueError, match="eps"):
        PolyLR(0.001, 0.9, 10, eps=-1.0)
