"""U2PL evaluation protocols (spec U2PL.md 5.4, 5.5, 9.1 item 12) against a direct computation
on a small fixed network: VOC centre-pad to a fixed crop (label pad 0 or 255), and Cityscapes
sliding windows with the window logits averaged."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from furnace.config import ConfigError, base_config, load_config
from furnace.data import build_eval_dataset
from furnace.eval import cli, loop
from furnace.eval.evaluator import SegEvaluator, normalization_lut
from furnace.eval.metrics import confusion_histogram

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NC = 4


class StrideFour(torch.nn.Module):
    """Logits at 1/4 of the input (as U2PL's decoder): 4x4 average pool, then a fixed 3x3
    convolution whose zero padding makes overlapping windows disagree near their borders."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(NC, 3, 3, 3, generator=g)
        self.b = torch.randn(NC, generator=g)

    def forward(self, x):
        return F.conv2d(F.avg_pool2d(x, 4), self.w, self.b, padding=1)


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return cv2.GaussianBlur(img, (0, 0), 3)          # smooth, so the classes form regions


def _normalised(img):
    """float32 [3, H, W] as the evaluator normalises (the table is tested elsewhere)."""
    lut = torch.from_numpy(normalization_lut(MEAN, STD))
    idx = torch.from_numpy(img).long().permute(2, 0, 1)
    return torch.gather(lut, 1, idx.reshape(3, -1)).reshape(idx.shape)


# ----------------------------------------------------------------------------- direct (U2PL)

def _pad_then_centre(t, crop, value):
    """U2PL's Crop(center): F.pad with (left, right, top, bottom) = floor/ceil halves, then a
    centre crop at (size - crop) // 2."""
    h, w = t.shape[-2:]
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    t = F.pad(t, (int(pw / 2), pw - int(pw / 2), int(ph / 2), ph - int(ph / 2)), value=value)
    y, x = (t.shape[-2] - crop) // 2, (t.shape[-1] - crop) // 2
    return t[..., y:y + crop, x:x + crop]


def u2pl_center_eval(net, img, label, crop, label_pad):
    x = _pad_then_centre(_normalised(img)[None], crop, 0.0)
    out = F.interpolate(net(x), (crop, crop), mode="bilinear", align_corners=True)
    lab = _pad_then_centre(torch.from_numpy(label).float()[None, None], crop, float(label_pad))
    return out[0], out[0].argmax(0), lab[0, 0].long()


def u2pl_slide(net, img, crop, stride_rate=2 / 3):
    """U2PL eval.py scale_crop_process for an image at least crop x crop: window logits
    upsampled to the crop, summed, divided by the window count."""
    x = _normalised(img)[None]
    h, w = x.shape[-2:]
    stride = int(np.ceil(crop * stride_rate))
    gh, gw = int(np.ceil((h - crop) / stride) + 1), int(np.ceil((w - crop) / stride) + 1)
    acc = torch.zeros(1, NC, h, w)
    cnt = torch.zeros(h, w)
    for i in range(gh):
        for j in range(gw):
            e_h, e_w = min(i * stride + crop, h), min(j * stride + crop, w)
            s_h, s_w = e_h - crop, e_w - crop
            out = F.interpolate(net(x[:, :, s_h:e_h, s_w:e_w]), (crop, crop), mode="bilinear",
                                align_corners=True)
            acc[:, :, s_h:e_h, s_w:e_w] += out
            cnt[s_h:e_h, s_w:e_w] += 1
    return (acc / cnt)[0], cnt


# ----------------------------------------------------------------------------- centre pad

@pytest.mark.parametrize("hw", [(30, 22), (52, 36), (41, 60)])
@pytest.mark.parametrize("label_pad", [0, 255])
def test_center_pad_matches_u2pl_val(hw, label_pad):
    net = StrideFour()
    img = _image(*hw, seed=hw[0])
    label = np.random.default_rng(1).integers(0, NC, hw).astype(np.uint8)
    label[:3] = 255
    ev = SegEvaluator(net, NC, crop_size=40, mode="center_pad", label_pad=label_pad,
                      mean=MEAN, std=STD)
    out = ev.predict(img)
    score, pred, lab = u2pl_center_eval(net, img, label, 40, label_pad)
    assert out.pred.shape == (40, 40)
    torch.testing.assert_close(out.score, score, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.pred, pred)
    assert torch.equal(ev.eval_label(torch.from_numpy(label)).long(), lab)
    # the composite picture: padded with the mean colour
    pic = ev.eval_image(img)
    assert pic.shape == (40, 40, 3)
    if hw[0] < 40:
        assert tuple(pic[0, 0]) == tuple(int(round(m * 255)) for m in MEAN)


def test_center_pad_miou_end_to_end(tmp_path):
    """evaluate_model (the training-time and eval.py path) with eval_mode=center_pad."""
    sizes = [(30, 22), (52, 36), (33, 40)]
    (tmp_path / "val" / "image").mkdir(parents=True)
    (tmp_path / "val" / "label").mkdir(parents=True)
    imgs, labels = [], []
    for i, hw in enumerate(sizes):
        img = _image(*hw, seed=10 + i)
        lab = np.random.default_rng(i).integers(0, NC, hw).astype(np.uint8)
        lab[:2, :5] = 255
        cv2.imwrite(str(tmp_path / "val" / "image" / f"v{i}.png"), img[:, :, ::-1])
        cv2.imwrite(str(tmp_path / "val" / "label" / f"v{i}.png"), lab)
        imgs.append(img)
        labels.append(lab)
    (tmp_path / "val.txt").write_text("v0\nv1\nv2\n")
    net = StrideFour()
    for label_pad in (0, 255):
        C = base_config()
        C.update(dataset_path=str(tmp_path), num_classes=NC, eval_crop_size=40,
                 eval_mode="center_pad", eval_label_pad=label_pad, num_workers=0)
        res = loop.evaluate_model(net, C, "cpu", build_eval_dataset(C))
        want = sum(confusion_histogram(u2pl_center_eval(net, im, lb, 40, label_pad)[1],
                                       u2pl_center_eval(net, im, lb, 40, label_pad)[2], NC)
                   for im, lb in zip(imgs, labels)).numpy()
        assert np.array_equal(res["hist"], want)
        labelled = sum(int((lb != 255).sum()) for lb in labels)
        if label_pad == 255:       # clean: the padding is left out, the crop cut drops rows
            assert res["hist"].sum() < labelled
        else:                      # U2PL: every padded pixel counts as background
            padded = sum(40 * 40 - min(h, 40) * min(w, 40) for h, w in sizes)
            assert res["hist"].sum() > padded


def test_center_pad_is_single_scale():
    with pytest.raises(ValueError, match="single-scale"):
        SegEvaluator(StrideFour(), NC, crop_size=40, mode="center_pad", scales=[1, 1.5])
    with pytest.raises(ValueError, match="eval_label_pad"):
        SegEvaluator(StrideFour(), NC, crop_size=40, mode="center_pad", label_pad=-1)


# ----------------------------------------------------------------------------- sliding, averaged

@pytest.mark.parametrize("hw", [(60, 100), (40, 41), (76, 76)])
def test_slide_logit_average_matches_u2pl_eval(hw):
    net = StrideFour()
    img = _image(*hw, seed=3)
    want, cnt = u2pl_slide(net, img, 40)
    avg = SegEvaluator(net, NC, crop_size=40, mean=MEAN, std=STD, average="logits",
                       batch_windows=3).predict(img)
    torch.testing.assert_close(avg.score, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(avg.pred, want.argmax(0))
    # the default sums the windows (the reference): the same argmax, score x count
    summed = SegEvaluator(net, NC, crop_size=40, mean=MEAN, std=STD).predict(img)
    torch.testing.assert_close(summed.score, want * cnt, rtol=1e-5, atol=1e-4)
    assert torch.equal(summed.pred, avg.pred)
    if hw == (60, 100):
        assert (int(cnt.min()), int(cnt.max())) == (1, 6)   # stride ceil(40*2/3) = 27


def test_city_protocol_grid_is_2x4_stride_513():
    from furnace.eval.evaluator import sliding_windows
    g = sliding_windows(1024, 2048, 769, 2 / 3)
    assert g.stride == 513 and g.grid == (2, 4)
    assert sorted({w[0] for w in g.windows}) == [0, 255]           # last row flush
    assert sorted({w[2] for w in g.windows}) == [0, 513, 1026, 1279]


def test_logit_average_with_flip_and_uncertainty_is_a_mean():
    net = StrideFour()
    img = _image(50, 70, seed=4)
    plain = SegEvaluator(net, NC, crop_size=40, average="logits", uncertainty=True).predict(img)
    torch.testing.assert_close(plain.logits, plain.score)
    flip = SegEvaluator(net, NC, crop_size=40, average="logits", flip=True).predict(img)
    flip_sum = SegEvaluator(net, NC, crop_size=40, flip=True).predict(img)
    _, cnt = u2pl_slide(net, img, 40)
    torch.testing.assert_close(flip.score * 2 * cnt, flip_sum.score, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- config / --set

CONFIG = """
from furnace.config import base_config
config = C = base_config()
C.dataset_path = {root!r}
C.num_classes = 4
"""


def test_eval_keys_from_set(tmp_path, capsys):
    (tmp_path / "config.py").write_text(CONFIG.format(root=str(tmp_path)))
    C = load_config(tmp_path, ["eval_mode=center_pad", "eval_label_pad=0",
                               "eval_average=logits", "eval_crop_size=513"])
    assert (C.eval_mode, C.eval_label_pad, C.eval_average) == ("center_pad", 0, "logits")
    ev = SegEvaluator.from_config(StrideFour(), C, channels_last=False)
    assert (ev.mode, ev.label_pad, ev.average, ev.crop) == ("center_pad", 0, "logits", 513)
    d = load_config(tmp_path)
    assert (d.eval_mode, d.eval_label_pad, d.eval_average) == ("slide", 255, "sum")
    with pytest.raises(ConfigError, match=r"'eval_average' expects one of sum, logits"):
        load_config(tmp_path, ["eval_average=probs"])
    with pytest.raises(ConfigError, match=r"'eval_mode' expects one of slide, whole, center_pad"):
        load_config(tmp_path, ["eval_mode=centre"])
    with pytest.raises(ConfigError, match=r"'eval_label_pad' must be an integer in 0\.\.255"):
        load_config(tmp_path, ["eval_label_pad=256"])
    with pytest.raises(ConfigError, match=r"eval_scale_array.*center_pad"):
        load_config(tmp_path, ["eval_mode=center_pad", "eval_scale_array=[1,1.5]"])
    # eval.py takes them with --set
    cli.main(tmp_path, ["--set", "eval_mode=center_pad", "eval_label_pad=0", "--print-config"])
    out = capsys.readouterr().out
    assert "eval_mode = 'center_pad'" in out and "eval_label_pad = 0" in out
