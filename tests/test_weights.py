"""Tests of load_backbone_weights on files built in tmp_path (nothing is downloaded)."""
import logging

import pytest
import torch
import torchvision

from furnace.models import build_network, load_backbone_weights, resnet18, resnet50, resnet101


def _randomise(model, seed=0):
    """Give every tensor (BN statistics included) distinct values, so copies are detectable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.rand(t.shape, generator=g, dtype=t.dtype)
                t.copy_(0.5 + r if key.endswith("running_var") else r - 0.5)
    return model


def _empty(factory, **kwargs):
    """A backbone with uninitialised storage (skips the default init of tensors that a test
    overwrites anyway)."""
    with torch.device("meta"):
        model = factory(**kwargs)
    return model.to_empty(device="cpu")


def _assert_same_state(a, b, keys=None):
    sa, sb = a.state_dict(), b.state_dict()
    for key in keys or sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def r18_source():
    return _randomise(resnet18(), seed=1)


@pytest.mark.parametrize("layout", ["plain", "model_wrapper", "module_prefix", "no_nbt"])
def test_v1c_round_trip(tmp_path, r18_source, layout):
    state = r18_source.state_dict()
    if layout == "model_wrapper":
        obj = {"model": dict(state), "epoch": 3}
    elif layout == "module_prefix":
        obj = {"module." + k: v for k, v in state.items()}
    elif layout == "no_nbt":  # old v1c files predate num_batches_tracked
        obj = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    else:
        obj = dict(state)
    obj_fc = obj["model"] if layout == "model_wrapper" else obj
    obj_fc["fc.weight"] = torch.zeros(1000, 512)  # the ImageNet classifier is ignored
    path = tmp_path / "resnet18_v1c.pth"
    torch.save(obj, path)

    target = resnet18()
    result = load_backbone_weights(target, path)
    keys = [k for k in state if layout != "no_nbt" or not k.endswith("num_batches_tracked")]
    _assert_same_state(r18_source, target, keys)
    assert result.unexpected == []
    assert len(result.loaded) == len(keys)


def test_torchvision_resnet50_into_classic_stem(tmp_path):
    torch.manual_seed(0)
    tv = _randomise(torchvision.models.resnet50(weights=None), seed=2).eval()
    path = tmp_path / "tv_resnet50.pth"
    torch.save(tv.state_dict(), path)

    ours = _empty(resnet50, stem="classic", output_stride=32).eval()
    result = load_backbone_weights(ours, path)
    assert result.unexpected == [] and result.missing == []  # fc.* dropped silently

    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        feats = ours(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for stage, f in zip((tv.layer1, tv.layer2, tv.layer3, tv.layer4), feats):
            y = stage(y)
            torch.testing.assert_close(f, y, rtol=0, atol=0)

    # the dilated (output stride 16) variant loads the same file; stages 1-3 are unchanged
    os16 = _empty(resnet50, stem="classic", output_stride=16).eval()
    load_backbone_weights(os16, path)
    with torch.no_grad():
        f16 = os16(x)
    for a, b in zip(f16[:3], feats[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert f16[3].shape[-2:] == (3, 3) and feats[3].shape[-2:] == (2, 2)


def test_resnet101_file_into_resnet50(tmp_path, caplog):
    # The reference VOC config loads resnet101_v1c.pth into a ResNet-50: every R-50 tensor
    # exists in R-101 with the same shape, so R-50 takes R-101's first 6 layer3 blocks.
    src = _randomise(_empty(resnet101), seed=3)
    path = tmp_path / "resnet101_v1c.pth"
    torch.save(src.state_dict(), path)
    del src
    target = _empty(resnet50)
    with caplog.at_level(logging.INFO, logger="furnace.models"):
        result = load_backbone_weights(target, path, strict=True)
    assert result.missing == []
    assert len(result.loaded) == len(target.state_dict())
    # layer3 blocks 6..22 of R-101: 3 convs + 3 BatchNorms (5 entries each) per block
    assert len(result.unexpected) == 17 * (3 + 3 * 5)
    assert all(k.startswith("layer3.") for k in result.unexpected)
    assert "not used by this backbone" in caplog.text and "layer3.6." in caplog.text
    saved = torch.load(path, weights_only=True)
    assert torch.equal(target.layer3[5].conv2.weight, saved["layer3.5.conv2.weight"])


def test_build_network_loads_both_branches(tmp_path, r18_source):
    path = tmp_path / "r18.pth"
    torch.save(r18_source.state_dict(), path)
    model = build_network(3, "resnet18", pretrained=path)
    _assert_same_state(model.branch1.backbone, r18_source)
    _assert_same_state(model.branch2.backbone, r18_source)
    # the reference keeps layer4 dilated at output stride 16 after loading
    assert model.branch1.backbone.layer4[1].conv2.dilation == (4, 4)


def test_missing_file_message(tmp_path):
    path = tmp_path / "nope" / "resnet50_v1c.pth"
    with pytest.raises(FileNotFoundError) as info:
        load_backbone_weights(resnet18(), path)
    msg = str(info.value)
    assert str(path) in msg and "DATA/pytorch-weight/" in msg
    assert "resnet50_v1c.pth" in msg and "pretrained_model=None" in msg
    with pytest.raises(FileNotFoundError, match="DATA/pytorch-weight/"):
        build_network(3, "resnet18", pretrained=path)


def test_shape_mismatch_message(tmp_path, r18_source):
    state = dict(r18_source.state_dict())
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_backbone_weights(resnet18(), path)
    msg = str(info.value)
    assert str(path) in msg
    assert "layer2.0.conv1.weight: file [128, 64, 1, 1] vs model [128, 64, 3, 3]" in msg
    with pytest.raises(ValueError, match="layer2.0.conv1.weight"):  # also when not strict
        load_backbone_weights(resnet18(), path, strict=False)


def test_deep_stem_file_into_classic_stem_is_rejected(tmp_path, r18_source):
    path = tmp_path / "resnet18_v1c.pth"
    torch.save(r18_source.state_dict(), path)
    with pytest.raises(ValueError, match=r"bn1.weight: file \[128\] vs model \[64\]"):
        load_backbone_weights(resnet18(stem="classic"), path)


def test_empty_match_message(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3), "decoder.bias": torch.zeros(2)}, path)
    for strict in (True, False):
        with pytest.raises(ValueError) as info:
            load_backbone_weights(resnet18(), path, strict=strict)
        msg = str(info.value)
        assert str(path) in msg and "shares no key" in msg
        assert "decoder.bias" in msg and "conv1.0.weight" in msg


def test_partial_match_strict_and_non_strict(tmp_path, r18_source, caplog):
    state = {k: v for k, v in r18_source.state_dict().items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_backbone_weights(resnet18(), path)
    assert str(path) in str(info.value) and "layer4.0.conv1.weight" in str(info.value)
    assert "pretrained_strict=False" in str(info.value)

    target = resnet18()
    with caplog.at_level(logging.WARNING, logger="furnace.models"):
        result = load_backbone_weights(target, path, strict=False)
    assert result.missing and all(k.startswith("layer4.") for k in result.missing)
    assert "keep their random init" in caplog.text and "layer4.0.conv1.weight" in caplog.text
    _assert_same_state(r18_source, target, list(state))


def test_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read backbone weights file .*garbage.pth"):
        load_backbone_weights(resnet18(), garbage)
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(ValueError, match="tensor.pth' holds a Tensor"):
        load_backbone_weights(resnet18(), tensor_file)
