"""ELN's data: the weak/strong unlabelled sample (one geometry, colour jitter + grayscale on
the strong view), the VOC fixed-resize transform and the resize evaluation protocol."""
import numpy as np
import torch
import torch.nn.functional as F

from furnace.data.cutmix import SEED_KEY
from furnace.data.strong import WeakStrongCollate, strong_view
from furnace.data.transforms import TrainTransform
from furnace.eval.evaluator import SegEvaluator

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(h=37, w=53, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), \
        rng.integers(0, 5, (h, w), dtype=np.uint8)


def test_resize_transform_is_a_fixed_resize_and_flip():
    img, lab = _image()
    t = TrainTransform((20, 24), scale_mode="resize", mean=MEAN, std=STD)
    outs = [t(img, lab, np.random.default_rng(s)) for s in range(8)]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    ref = F.interpolate(x, size=(20, 24), mode="bilinear", align_corners=False)[0]
    ref = (ref - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    ref_lab = F.interpolate(torch.from_numpy(lab)[None, None].float(), size=(20, 24),
                            mode="nearest")[0, 0].long()
    flips = set()
    for data, label in outs:
        assert data.shape == (3, 20, 24) and label.shape == (20, 24)
        d, lb = torch.from_numpy(data), torch.from_numpy(label)
        if torch.allclose(d, ref, atol=1e-4):
            assert torch.equal(lb, ref_lab)
            flips.add(False)
        else:
            assert torch.allclose(d, ref.flip(-1), atol=1e-4)
            assert torch.equal(lb, ref_lab.flip(-1))
            flips.add(True)
    assert flips == {False, True}


def _samples(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    out = []
    for i in range(n):
        raw = torch.rand(3, 16, 16, generator=g)
        out.append({"data": (raw - mean) / std, "fn": f"x{i}", "n": torch.tensor(n),
                    SEED_KEY: (1, 1, 0, i)})
    return out


def test_strong_view_shares_the_geometry_and_is_reproducible():
    collate = WeakStrongCollate(MEAN, STD)
    a, b = collate(_samples()), collate(_samples())
    assert a["strong"].shape == a["data"].shape == (3, 3, 16, 16)
    assert torch.equal(a["strong"], b["strong"]), "draws come from the samples' seeds"
    assert not torch.allclose(a["strong"], a["data"], atol=1e-3)
    assert SEED_KEY not in a
    # no jitter, no grayscale: the strong view is the weak one
    plain = WeakStrongCollate(MEAN, STD, jitter=(0, 0, 0, 0), gray_p=0.0)(_samples())
    assert torch.allclose(plain["strong"], plain["data"], atol=1e-5)


def test_strong_view_options_reach_the_collate():
    """eln.strong_jitter / eln.strong_gray_p (the reference's by default) choose the strong
    view; a bad jitter is one error naming the key."""
    import pytest
    from furnace.config import ConfigError, base_config
    from furnace.data.strong import weak_strong_collate
    from furnace.methods.eln_options import check
    C = base_config()
    C.image_mean, C.image_std = MEAN, STD
    assert (weak_strong_collate(C).jitter, weak_strong_collate(C).gray_p) == \
        ((0.4, 0.4, 0.4, 0.1), 0.2)
    C.eln.strong_jitter, C.eln.strong_gray_p = [0, 0, 0, 0], 0.0
    plain = weak_strong_collate(C)(_samples())
    assert torch.allclose(plain["strong"], plain["data"], atol=1e-5)
    C.eln.strong_jitter = [0.4, 0.4, 0.4, 0.7]
    with pytest.raises(ConfigError, match="eln.strong_jitter"):
        check(C)


def test_grayscale_probability():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 4, 4)
    gray = sum(bool(torch.allclose(v[0], v[1]) and torch.allclose(v[1], v[2]))
               for v in (strong_view(img, g) for _ in range(400)))
    assert 50 < gray < 110     # p = 0.2


class _Const(torch.nn.Module):
    def forward(self, x):
        out = torch.zeros(x.shape[0], 2, x.shape[2] // 4, x.shape[3] // 4)
        out[:, 1] = 1.0
        return out


def test_resize_evaluation_protocol():
    img, lab = _image(30, 50)
    ev = SegEvaluator(_Const(), 2, crop_size=16, mode="resize")
    pred = ev.predict(img).pred
    assert tuple(pred.shape) == (16, 16) and bool((pred == 1).all())
    gt = ev.eval_label(torch.from_numpy(lab).long())
    assert tuple(gt.shape) == (16, 16)
    ref = F.interpolate(torch.from_numpy(lab)[None, None].float(), size=(16, 16),
                        mode="nearest")[0, 0].long()
    assert torch.equal(gt, ref)
    assert ev.eval_image(img).shape == (16, 16, 3)
