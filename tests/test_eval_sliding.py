"""Sliding-window inference against the reference recordings (golden §6) and its invariants."""
import copy
import json

import cv2
import numpy as np
import pytest
import torch

from furnace.precision import amp_dtype
from furnace.eval.evaluator import SegEvaluator, normalization_lut, sliding_windows

GOLDEN_MEAN = (0.485, 0.456, 0.406)
GOLDEN_STD = (0.229, 0.224, 0.225)


class Stub(torch.nn.Module):
    """The golden stub: out[c] = sum_k A[c,k] x[k] + B[c] * mean(x), per sample, float32."""

    def __init__(self, A, B, ramp=0.0):
        super().__init__()
        self.A = torch.as_tensor(A, dtype=torch.float32)
        self.B = torch.as_tensor(B, dtype=torch.float32)
        self.ramp = ramp          # position-dependent bias along x: breaks flip equivariance
        self.calls = []

    def forward(self, x):
        self.calls.append(x.detach().clone())
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        out = torch.einsum("ck,bkhw->bchw", self.A, x) + self.B.view(1, -1, 1, 1) * m
        if self.ramp:
            xs = torch.arange(x.shape[-1], dtype=torch.float32)
            out = out + self.ramp * xs.view(1, 1, 1, -1) * torch.arange(
                1, out.shape[1] + 1, dtype=torch.float32).view(1, -1, 1, 1)
        return out


@pytest.fixture(scope="module")
def stub_npz(golden_dir):
    return np.load(golden_dir / "sliding_stub.npz")


def _stub(z, **kw):
    return Stub(z["stub_A"], z["stub_B"], **kw)


# ----------------------------------------------------------------------------- golden

def test_grid_matches_every_golden_case(golden_dir):
    data = json.loads((golden_dir / "sliding_grid.json").read_text())
    assert len(data["cases"]) == 7
    for case in data["cases"]:
        g = sliding_windows(*case["image_hw"], case["crop"], case["stride_rate"])
        where = f"case {case['image_hw']} crop {case['crop']}"
        assert g.mode == case["mode"], where
        assert list(g.margin) == case["margin_top_bottom_left_right"], where
        assert list(g.padded_hw) == case["padded_hw"], where
        assert [list(w) for w in g.windows] == case["windows_y0_y1_x0_x1"], where
        assert list(g.crop_back) == case["crop_back_y0_y1_x0_x1"], where
        if case["mode"] == "sliding":
            assert g.stride == case["stride"], where
            assert list(g.grid) == case["grid_rows_cols"], where


def test_city_grid_is_2x4_stride_534():
    g = sliding_windows(1024, 2048, 800, 2 / 3)
    assert g.stride == 534 and g.grid == (2, 4)
    assert sorted({w[0] for w in g.windows}) == [0, 224]
    assert sorted({w[2] for w in g.windows}) == [0, 534, 1068, 1248]


@pytest.mark.parametrize("name", ["slide", "slidepad", "single"])
@pytest.mark.parametrize("batch", [1, 4, 0])
def test_stub_scores_match_reference(stub_npz, name, batch):
    z = stub_npz
    img = z[f"{name}_img"]
    stub = _stub(z)
    ev = SegEvaluator(stub, 3, crop_size=48, mean=z["image_mean"], std=z["image_std"],
                      batch_windows=batch)
    out = ev.predict(img)
    score = out.score.permute(1, 2, 0).numpy()
    np.testing.assert_allclose(score, z[f"{name}_score"], rtol=1e-6,
                               atol=1e-6 * np.abs(z[f"{name}_score"]).max())
    np.testing.assert_array_equal(out.pred.numpy(), z[f"{name}_pred"])
    g = sliding_windows(img.shape[0], img.shape[1], 48, 2 / 3)
    np.testing.assert_array_equal(np.array(g.windows), z[f"{name}_windows"])
    np.testing.assert_array_equal(np.array(g.margin), z[f"{name}_margin"])
    # the stub saw exactly the reference's per-window inputs: float32 [1|k, 3, 48, 48]
    seen = torch.cat(stub.calls)
    assert seen.dtype == torch.float32 and seen.shape == (len(g.windows), 3, 48, 48)


def test_stub_inputs_are_the_reference_windows(stub_npz):
    """Window k of the padded image, normalised in numpy as the reference does."""
    z = stub_npz
    for name in ("slide", "slidepad", "single"):
        img = z[f"{name}_img"]
        stub = _stub(z)
        SegEvaluator(stub, 3, crop_size=48, mean=z["image_mean"], std=z["image_std"],
                     batch_windows=2).predict(img)
        seen = torch.cat(stub.calls).numpy()
        t, b, l, r = (int(v) for v in z[f"{name}_margin"])

        def norm(a):
            return ((a.astype(np.float32) / 255.0 - z["image_mean"]) / z["image_std"])

        if name == "single":    # normalise, then pad with 0
            ref = np.pad(norm(img), ((t, b), (l, r), (0, 0)))
        else:                   # pad the raw image with 0, then normalise
            ref = norm(np.pad(img, ((t, b), (l, r), (0, 0))))
        for k, (y0, y1, x0, x1) in enumerate(z[f"{name}_windows"]):
            want = ref[y0:y1, x0:x1].transpose(2, 0, 1).astype(np.float32)
            np.testing.assert_array_equal(seen[k], want)


def test_normalization_lut_is_the_reference_formula():
    lut = normalization_lut(GOLDEN_MEAN, GOLDEN_STD)
    v = np.arange(256, dtype=np.uint8)
    ref = ((v.astype(np.float32)[:, None] / 255.0 - np.array(GOLDEN_MEAN))
           / np.array(GOLDEN_STD)).astype(np.float32)
    np.testing.assert_array_equal(lut, ref.T)


# ----------------------------------------------------------------------------- invariants

def _rand_img(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def test_scale_one_equals_no_scaling(stub_npz):
    z = stub_npz
    img = z["slide_img"]
    a = SegEvaluator(_stub(z), 3, crop_size=48, scales=[1]).predict(img)
    b = SegEvaluator(_stub(z), 3, crop_size=48, scales=[1.0]).predict(img)
    ev = SegEvaluator(_stub(z), 3, crop_size=48)
    direct, _ = ev.scale_process(torch.from_numpy(img))
    torch.testing.assert_close(a.score, direct, rtol=0, atol=0)
    torch.testing.assert_close(a.score, b.score, rtol=0, atol=0)
    # two scales of 1: float64 sum, same prediction
    c = SegEvaluator(_stub(z), 3, crop_size=48, scales=[1, 1]).predict(img)
    assert c.score.dtype == torch.float64
    torch.testing.assert_close(c.score, 2 * a.score.double(), rtol=0, atol=0)
    assert torch.equal(c.pred, a.pred)


def test_multi_scale_is_sum_of_cv2_resized_scales(stub_npz):
    z = stub_npz
    img = _rand_img(50, 70, 3)
    ev = SegEvaluator(_stub(z), 3, crop_size=48, scales=[0.5, 1.25])
    out = ev.predict(img)
    total = np.zeros((50, 70, 3))
    for s in (0.5, 1.25):
        im = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
        sc, _ = SegEvaluator(_stub(z), 3, crop_size=48).scale_process(torch.from_numpy(im))
        total += cv2.resize(sc.permute(1, 2, 0).numpy(), (70, 50),
                            interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(out.score.permute(1, 2, 0).numpy(), total, rtol=1e-12)
    np.testing.assert_array_equal(out.pred.numpy(), total.argmax(2))


def test_flip_with_equivariant_stub_doubles_the_score(stub_npz):
    z = stub_npz
    for img in (z["slide_img"], z["single_img"]):
        plain = SegEvaluator(_stub(z), 3, crop_size=48).predict(img)
        flip = SegEvaluator(_stub(z), 3, crop_size=48, flip=True).predict(img)
        torch.testing.assert_close(flip.score, 2 * plain.score, rtol=1e-6, atol=1e-5)
        assert torch.equal(flip.pred, plain.pred)


def test_flip_makes_a_symmetric_input_symmetric(stub_npz):
    """A stub with an x-ramp bias is not flip-equivariant; flip TTA cancels the ramp, so a
    mirror-symmetric image gets a mirror-symmetric score (crop margins are symmetric here)."""
    z = stub_npz
    half = _rand_img(30, 20, 5)
    img = np.concatenate([half, half[:, ::-1]], axis=1)          # 30x40, symmetric
    plain = SegEvaluator(_stub(z, ramp=0.05), 3, crop_size=48).predict(img).score
    flip = SegEvaluator(_stub(z, ramp=0.05), 3, crop_size=48, flip=True).predict(img).score
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-3)
    torch.testing.assert_close(flip, flip.flip(-1), rtol=1e-5, atol=1e-5)


def test_whole_mode_is_one_forward_on_the_normalised_image(stub_npz):
    z = stub_npz
    img = z["slide_img"]
    stub = _stub(z)
    out = SegEvaluator(stub, 3, crop_size=48, mode="whole", mean=z["image_mean"],
                       std=z["image_std"]).predict(img)
    assert len(stub.calls) == 1 and stub.calls[0].shape == (1, 3, 70, 100)
    lut = normalization_lut(z["image_mean"], z["image_std"])
    x = torch.from_numpy(np.stack([lut[c][img[..., c]] for c in range(3)]))[None]
    torch.testing.assert_close(out.score, _stub(z)(x)[0], rtol=0, atol=0)


def test_class_count_mismatch_is_reported(stub_npz):
    with pytest.raises(ValueError, match="num_classes"):
        SegEvaluator(_stub(stub_npz), 5, crop_size=48).predict(stub_npz["single_img"])


def test_amp_resolution():
    assert amp_dtype("auto", torch.device("cpu")) is None
    # one resolver for training and evaluation: an explicit choice holds on every device
    assert amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert amp_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert amp_dtype("fp16", torch.device("cuda")) is torch.float16
    assert amp_dtype("off", torch.device("cuda")) is None
    with pytest.raises(ValueError):
        amp_dtype("fp8", torch.device("cpu"))


# ----------------------------------------------------------------------------- real network

@pytest.fixture(scope="module")
def tiny_net():
    from furnace.models import build_network
    torch.manual_seed(0)
    return build_network(4, "resnet18", 16, None).eval()


def test_batched_equals_per_window_on_a_dual_network(tiny_net):
    img = _rand_img(40, 50, 1)
    outs = [SegEvaluator(tiny_net, 4, crop_size=32, batch_windows=b).predict(img)
            for b in (1, 0)]
    assert sliding_windows(40, 50, 32).grid == (2, 2)
    # channels-last layout (what eval.py uses) converts the model in place: use a copy
    outs.append(SegEvaluator(copy.deepcopy(tiny_net), 4, crop_size=32, batch_windows=0,
                             channels_last=True).predict(img))
    for o in outs[1:]:
        assert torch.equal(o.pred, outs[0].pred)
        torch.testing.assert_close(o.score, outs[0].score, rtol=1e-5, atol=1e-5)


def test_variance_map_and_branch_choice(tiny_net):
    img = _rand_img(30, 40, 2)
    x_out = SegEvaluator(tiny_net, 4, crop_size=32).predict(img)
    v_out = SegEvaluator(tiny_net, 4, crop_size=32, with_var=True).predict(img)
    # the branch path gives the same logits as model(x)
    torch.testing.assert_close(v_out.score, x_out.score, rtol=1e-5, atol=1e-5)
    assert v_out.var.shape == (30, 40) and bool((v_out.var > 0).all())
    assert x_out.var is None
    b2 = SegEvaluator(tiny_net, 4, crop_size=32, with_var=True, branch=2).predict(img)
    assert not torch.allclose(b2.score, v_out.score)
