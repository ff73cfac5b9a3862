"""Tests of furnace.models: golden state-dict keys and forward pass, shapes, dual-branch
behaviour, initialisation, argument validation and SGD parameter groups."""
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from furnace.models import (BACKBONES, DualBranchNetwork, SingleNetwork, build_network,
                            param_groups, resnet18, resnet50)


def _key_lines(model):
    return [f"{k}\t{list(v.shape)}\t{str(v.dtype).replace('torch.', '')}"
            for k, v in model.state_dict().items()]


def _meta_network(*args, **kwargs):
    # Building on the meta device checks the module tree without allocating ~0.5 GB of weights.
    with torch.device("meta"):
        return build_network(*args, **kwargs)


# --------------------------------------------------------------------------- golden keys

@pytest.mark.parametrize("num_classes, backbone, fname, n_params", [
    (21, "resnet50", "keys_r50_c21.txt", 80_952_428),
    (19, "resnet101", "keys_r101_c19.txt", 118_935_656),
])
def test_state_dict_matches_golden_keys(golden_dir, num_classes, backbone, fname, n_params):
    model = _meta_network(num_classes, backbone)
    expected = (golden_dir / fname).read_text().splitlines()
    assert _key_lines(model) == expected
    assert sum(p.numel() for p in model.parameters()) == n_params


# --------------------------------------------------------------------------- golden forward

def deterministic_fill(state_dict):
    """The fill of golden README section 2: values from crc32-seeded float64 draws per key."""
    out = {}
    for key in sorted(state_dict):
        shape = state_dict[key].shape
        if key.endswith(".num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.int64)
            continue
        g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
        n = torch.randn(shape, generator=g, dtype=torch.float64)
        if key.endswith(".running_mean"):
            value = 0.1 * n
        elif key.endswith(".running_var"):
            value = 1 + 0.1 * n.abs()
        elif key.endswith(".weight") and n.ndim == 4:
            value = n * (1.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        elif key.endswith(".weight") and n.ndim == 1:
            value = 1 + 0.1 * n
        elif key.endswith(".bias"):
            value = 0.1 * n
        else:
            raise AssertionError(f"no fill rule for {key}")
        out[key] = value
    return out


@pytest.fixture(scope="module")
def golden_net(golden_dir):
    data = np.load(golden_dir / "network_r50_c21.npz")
    model = _meta_network(21, "resnet50").double().to_empty(device="cpu")
    fill = deterministic_fill(model.state_dict())
    return model, fill, data


# golden/README.md section 2: float64 convolution kernels differ between CPU instruction sets
# (AVX2, AVX-512) and train-mode BatchNorm over tiny maps amplifies that to ~5e-13 of a map's
# maximum, so absolute tolerances scale with the map, never a fixed number.
PROBE_RTOL, PROBE_ATOL_OF_MAX = 1e-10, 1e-11


def _close_map(actual, data, name, probe_idx):
    g = data[name]
    a = actual.detach().numpy()
    assert a.shape == g.shape
    scale = np.abs(g).max()
    assert np.abs(a - g.astype(np.float64)).max() <= 1e-6 * scale, name
    np.testing.assert_allclose(a.reshape(-1)[probe_idx], data[name + "__probe_f64"],
                               rtol=PROBE_RTOL, atol=PROBE_ATOL_OF_MAX * scale, err_msg=name)


def test_fill_matches_golden_sums(golden_net):
    _, fill, data = golden_net
    keys = list(data["fill_keys"])
    assert keys == sorted(fill)
    sums = np.array([fill[k].sum().item() for k in keys])
    sumsq = np.array([(fill[k].double() ** 2).sum().item() for k in keys])
    np.testing.assert_allclose(sums, data["fill_sum"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(sumsq, data["fill_sumsq"], rtol=1e-12, atol=0)
    for name in data.files:
        if name.startswith("fill_head8__"):
            key = name[len("fill_head8__"):]
            np.testing.assert_array_equal(fill[key].reshape(-1)[:8].numpy(), data[name])


def test_golden_forward_eval(golden_net):
    model, fill, data = golden_net
    model.load_state_dict(fill, strict=True)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with torch.no_grad():
        logits = model(torch.from_numpy(data["x"]))
    _close_map(logits, data, "eval_logits", data["probe_idx_logits"])
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("step", [1, 2])
def test_golden_forward_train(golden_net, step):
    model, fill, data = golden_net
    model.load_state_dict(fill, strict=True)  # fresh fill for each step
    model.train()
    with torch.no_grad():
        feature, logits, var = model(torch.from_numpy(data["x"]), step=step)
    assert feature.shape == (2, 256, 17, 21)
    pre = f"train_step{step}_"
    _close_map(logits, data, pre + "logits", data["probe_idx_logits"])
    _close_map(var, data, pre + "var", data["probe_idx_var"])
    np.testing.assert_allclose(feature.sum().item(), data[pre + "feature_sum"], rtol=1e-10)

    state = model.state_dict()
    checked = 0
    for name in data.files:
        if name.startswith(pre + "after__"):
            key = name[len(pre + "after__"):]
            want = data[name]
            np.testing.assert_allclose(state[key].numpy(), want, rtol=PROBE_RTOL,
                                       atol=PROBE_ATOL_OF_MAX * np.abs(want).max(), err_msg=key)
            checked += 1
    assert checked == 12
    other = "branch2." if step == 1 else "branch1."  # the other branch is untouched
    assert all(torch.equal(v, fill[k]) for k, v in state.items() if k.startswith(other))


# --------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("factory, channels", [(resnet50, [256, 512, 1024, 2048]),
                                               (resnet18, [64, 128, 256, 512])])
@pytest.mark.parametrize("output_stride, sizes", [(16, [24, 12, 6, 6]), (8, [24, 12, 12, 12])])
def test_backbone_feature_sizes(factory, channels, output_stride, sizes):
    # ResNet-50 runs on the meta device (exact shape inference, no compute) to keep the test
    # fast; ResNet-18 computes for real.
    device = "meta" if factory is resnet50 else "cpu"
    with torch.device(device), torch.no_grad():
        backbone = factory(output_stride=output_stride).eval()
        feats = backbone(torch.randn(1, 3, 96, 96))
    assert backbone.out_channels == channels
    assert [tuple(f.shape[1:]) for f in feats] == [(c, s, s) for c, s in zip(channels, sizes)]


def _dilations(stage, attr="conv2"):
    return [getattr(block, attr).dilation[0] for block in stage]


def test_dilation_layout():
    with torch.device("meta"):
        os16, os8 = resnet50(output_stride=16), resnet50(output_stride=8)
        r18 = resnet18(output_stride=16)
    assert _dilations(os16.layer3) == [1] * 6 and os16.layer3[0].conv2.stride == (2, 2)
    assert _dilations(os16.layer4) == [2, 4, 8]
    assert [b.conv2.padding[0] for b in os16.layer4] == [2, 4, 8]
    assert os16.layer4[0].conv2.stride == (1, 1)
    assert os16.layer4[0].downsample[0].stride == (1, 1)
    assert _dilations(os8.layer3) == [2] * 6 and os8.layer3[0].downsample[0].stride == (1, 1)
    assert _dilations(os8.layer4) == [4, 8, 16]
    # BasicBlock: both 3x3 convs of a block are dilated
    assert _dilations(r18.layer4, "conv1") == _dilations(r18.layer4, "conv2") == [2, 4]
    assert _meta_network(3, "resnet18", 8).branch1.head.aspp.map_convs[3].dilation == (36, 36)


# --------------------------------------------------------------------------- dual network

@pytest.fixture(scope="module")
def tiny_dual():
    torch.manual_seed(0)
    return build_network(5, "resnet18")


def test_dual_resnet18_train_and_eval(tiny_dual):
    model = tiny_dual
    x = torch.randn(2, 3, 32, 48)
    model.train()
    for step in (1, 2):
        feature, logits, var = model(x, step=step)
        assert feature.shape == (2, 256, 8, 12)
        assert logits.shape == (2, 5, 32, 48) and var.shape == (2, 1, 32, 48)
        assert (var >= 0).all()
    (logits.sum() + var.sum()).backward()  # gradients flow into branch 2 only
    assert model.branch2.backbone.conv1[0].weight.grad is not None
    assert model.branch1.backbone.conv1[0].weight.grad is None
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        out = model(x)
        _, l1, v1 = model.branch1(x)  # the visualisation helper: logits + var in eval mode
        _, l2, _ = model(x, step=2)
        assert torch.equal(out, l1) and v1.shape == (2, 1, 32, 48)
        model.eval_branch = 2
        assert torch.equal(model(x), l2)
        model.eval_branch = "mean"
        torch.testing.assert_close(model(x), (l1 + l2) / 2, rtol=0, atol=0)
    model.eval_branch = 1


def test_head_channels_sets_decoder_width():
    """head_channels narrows ASPP, decoder and both heads; 256 is the reference layout."""
    torch.manual_seed(0)
    narrow = build_network(5, "resnet18", head_channels=64)
    ref = build_network(5, "resnet18")
    sd = narrow.state_dict()
    assert list(sd) == list(ref.state_dict())              # same keys, smaller shapes
    assert sd["branch1.head.aspp.map_convs.0.weight"].shape == (64, 512, 1, 1)
    assert sd["branch1.head.last_conv.3.weight"].shape == (64, 64, 3, 3)
    assert sd["branch2.classifier.weight"].shape == (5, 64, 1, 1)
    assert sd["branch2.variancelayer.weight"].shape == (1, 64, 1, 1)
    assert ref.state_dict()["branch1.classifier.weight"].shape == (5, 256, 1, 1)
    narrow.train()
    feature, logits, var = narrow(torch.randn(2, 3, 32, 32), step=1)
    assert feature.shape == (2, 64, 8, 8) and logits.shape == (2, 5, 32, 32)
    n_narrow = sum(p.numel() for p in narrow.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_narrow < n_ref


def test_backbone_width_scales_every_stage():
    """backbone_width w: stem w-w-2w (deep) or w (classic), stages w x (1, 2, 4, 8); 64 is the
    reference layout, and the keys stay the reference's."""
    from furnace.models.resnet import resnet18, resnet50
    from furnace.models.u2pl import U2PLNetwork
    with torch.device("meta"):
        assert resnet18(width=16).out_channels == [16, 32, 64, 128]
        assert resnet50(width=16).out_channels == [64, 128, 256, 512]
        assert resnet18().out_channels == [64, 128, 256, 512]
        deep, classic = resnet18(width=16), resnet18(width=16, stem="classic")
    assert [deep.conv1[i].out_channels for i in (0, 3, 6)] == [16, 16, 32]
    assert classic.conv1.out_channels == 16 and classic.bn1.num_features == 16
    narrow = build_network(5, "resnet18", head_channels=16, backbone_width=16)
    assert list(narrow.state_dict()) == list(build_network(5, "resnet18").state_dict())
    sd = narrow.state_dict()
    assert sd["branch1.backbone.layer4.1.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["branch1.head.aspp.map_convs.0.weight"].shape == (16, 128, 1, 1)
    assert sd["branch1.head.reduce.0.weight"].shape[1] == 16   # low-level features of layer1
    narrow.train()
    _, logits, _ = narrow(torch.randn(2, 3, 32, 32), step=1)
    assert logits.shape == (2, 5, 32, 32)
    u2pl = U2PLNetwork(5, "resnet18", inner_planes=16, rep_dim=8, backbone_width=8)
    assert u2pl.encoder.out_channels == [8, 16, 32, 64]
    with pytest.raises(ValueError, match="width must be a positive integer"):
        resnet18(width=0)


def test_eval_branch1_does_not_run_branch2(tiny_dual):
    model = tiny_dual.eval()
    calls = []
    handle = model.branch2.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        assert calls == []
        model.eval_branch = "mean"
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        assert calls == [1]
    finally:
        handle.remove()
        model.eval_branch = 1


def test_train_mode_needs_step(tiny_dual):
    tiny_dual.train()
    with pytest.raises(ValueError, match="step=1"):
        tiny_dual(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="step must be one of 1, 2; got 3"):
        tiny_dual(torch.randn(2, 3, 32, 32), step=3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(backbone="resnet152"), "backbone must be one of 'resnet18', 'resnet34'"),
    (dict(output_stride=32), "output_stride must be one of 8, 16; got 32"),
    (dict(num_classes=1), "num_classes must be an integer >= 2"),
    (dict(num_classes=2.0), "num_classes must be an integer >= 2"),
    (dict(eval_branch=3), "eval_branch must be one of 1, 2, 'mean'; got 3"),
    (dict(eval_branch="avg"), "eval_branch must be one of"),
    (dict(stem="wide"), "stem must be one of 'deep', 'classic'"),
    (dict(head_channels=0), "head_channels must be a positive integer; got 0"),
])
def test_build_network_validates_arguments(kwargs, match):
    kwargs = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_network(**kwargs)


def test_eval_branch_setter_validates(tiny_dual):
    with pytest.raises(ValueError, match="eval_branch"):
        tiny_dual.eval_branch = 0
    assert tiny_dual.eval_branch == 1
    assert BACKBONES == ("resnet18", "resnet34", "resnet50", "resnet101")
    assert isinstance(tiny_dual, DualBranchNetwork)


# --------------------------------------------------------------------------- initialisation

def test_init_is_deterministic_and_follows_reference():
    torch.manual_seed(12345)
    a = build_network(4, "resnet18")
    head = a.branch1.head
    # kaiming normal, fan_in: std sqrt(2 / fan_in)
    w = head.last_conv[0].weight
    assert abs(w.std().item() / (2.0 / w[0].numel()) ** 0.5 - 1) < 0.02
    assert torch.all(head.aspp.red_bn.weight == 1) and torch.all(head.aspp.red_bn.bias == 0)
    # the two heads are independent draws
    assert not torch.equal(a.branch1.classifier.weight, a.branch2.classifier.weight)
    # variance head keeps PyTorch's default init (uniform within 1/sqrt(fan_in) = 1/16)
    assert a.branch1.variancelayer.weight.abs().max() <= 1 / 16
    # Same seed, same weights; and the reference order: both branches built (default init),
    # then the heads initialised, branch 1 before branch 2.
    torch.manual_seed(12345)
    c1 = SingleNetwork(4, "resnet18", init_head=False)
    c2 = SingleNetwork(4, "resnet18", init_head=False)
    c1.init_head_weights()
    c2.init_head_weights()
    expected = {**{f"branch1.{k}": v for k, v in c1.state_dict().items()},
                **{f"branch2.{k}": v for k, v in c2.state_dict().items()}}
    for k, v in a.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_learn_variance_initialises_variance_head():
    torch.manual_seed(0)
    net = SingleNetwork(4, "resnet18", learn_variance=True)
    w = net.variancelayer.weight
    # kaiming normal std sqrt(2/256) = 0.088 exceeds the default init bound 1/16
    assert w.abs().max() > 1 / 16
    assert net.business_layers[-1] is net.variancelayer


# --------------------------------------------------------------------------- param groups

def _meta_branch(backbone="resnet50", **kwargs):
    with torch.device("meta"):
        return SingleNetwork(21, backbone, **kwargs)


def test_param_group_sizes_resnet50():
    branch = _meta_branch()
    groups = param_groups(branch, lr=0.005)
    assert [len(g["params"]) for g in groups] == [55, 110, 10, 12, 1, 1]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0] * 3
    assert all(g["lr"] == 0.005 for g in groups)
    assert [g["name"] for g in groups][::2] == ["backbone.decay", "head.decay",
                                                "classifier.decay"]

    ids = [id(p) for g in groups for p in g["params"]]
    var_ids = {id(p) for p in branch.variancelayer.parameters()}
    assert len(ids) == len(set(ids))
    assert not var_ids & set(ids)  # reference: the variance head is never optimised
    assert set(ids) | var_ids == {id(p) for p in branch.parameters()}
    # decay groups hold only conv weights, no-decay groups only 1-d tensors
    assert all(p.ndim == 4 for g in groups[::2] for p in g["params"])
    assert all(p.ndim == 1 for g in groups[1::2] for p in g["params"])


def test_param_groups_learn_variance():
    branch = _meta_branch(learn_variance=True)
    groups = param_groups(branch, lr=0.01, weight_decay=5e-4)
    assert [len(g["params"]) for g in groups] == [55, 110, 10, 12, 1, 1, 1, 1]
    assert groups[6]["params"][0] is branch.variancelayer.weight
    assert groups[7]["params"][0] is branch.variancelayer.bias
    assert groups[6]["weight_decay"] == 5e-4 and groups[7]["weight_decay"] == 0.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in branch.parameters())
    # an explicit flag overrides the branch attribute
    assert len(param_groups(branch, lr=0.01, learn_variance=False)) == 6


def test_param_groups_work_with_syncbn_and_sgd():
    branch = nn.SyncBatchNorm.convert_sync_batchnorm(SingleNetwork(3, "resnet18"))
    groups = param_groups(branch, lr=0.1)
    assert [len(g["params"]) for g in groups] == [23, 46, 10, 12, 1, 1]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert len(opt.param_groups) == 6


def test_param_groups_reject_unknown_modules():
    branch = _meta_branch("resnet18")
    branch.head.extra = nn.PReLU()
    with pytest.raises(RuntimeError, match="head.*extra.weight"):
        param_groups(branch, lr=0.1)
