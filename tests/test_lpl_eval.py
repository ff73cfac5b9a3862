"""LPL's evaluation as generic evaluator options (LPL spec 4.1, 4.2, 4.4, 10.3 H, 11): the
normalised-bicubic multi-scale protocol, class-restricted prediction, mIoU with absent classes
as 0, DenseCRF (optional pydensecrf2) and the resumable pseudo-label export."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from furnace.config import ConfigError, base_config, finalize, load_config
from furnace.eval.crf import crf_image, dense_crf
from furnace.eval.evaluator import SegEvaluator, normalization_lut, restricted_argmax, \
    scaled_size
from furnace.data.image_labels import image_level_label
from furnace.eval.loop import evaluate_indices, evaluate_model
from furnace.eval.metrics import compute_metrics

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCALES = [0.5, 0.75, 1.0, 1.25, 1.5]


class TinyNet(torch.nn.Module):
    """Deterministic conv net at input resolution; records the input sizes it sees."""

    def __init__(self, num_classes=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, num_classes, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.conv2(torch.tanh(self.conv1(x)))


def _image(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def _lpl_evaluator(model, num_classes=4, **kw):
    opts = dict(crop_size=512, scales=SCALES, flip=True, mean=MEAN, std=STD, mode="whole",
                average="logits", resize="normalized_cubic")
    opts.update(kw)
    return SegEvaluator(model.eval(), num_classes, **opts)


# ----------------------------------------------------------------------------- protocol

def test_scaled_size_is_opencvs_half_to_even():
    assert scaled_size(17, 17, 0.5) == (8, 8)
    assert scaled_size(21, 21, 1.5) == (32, 32)
    assert scaled_size(27, 27, 1.5) == (40, 40)
    x = np.zeros((17, 27, 3), np.float32)
    for s in SCALES:
        h, w = cv2.resize(x, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC).shape[:2]
        assert (h, w) == scaled_size(17, 27, s)


def test_normalized_cubic_matches_explicit_recomputation():
    torch.manual_seed(0)
    H, W = 17, 27
    img = _image(H, W)
    model = TinyNet()
    ev = _lpl_evaluator(model)
    out = ev.predict(img)
    # every scale went through the network at OpenCV's size, each twice (flip) in one batch
    assert model.sizes == [scaled_size(H, W, s) for s in SCALES]

    # the reference's test, written out: normalise, bicubic per scale, forward, bilinear
    # align_corners=True back to H x W, flip back, mean of the 10 logit maps
    norm = ((img.astype(np.float32) / np.float32(255)).astype(np.float64)
            - np.array(MEAN)) / np.array(STD)
    norm = norm.astype(np.float32)
    maps = []
    with torch.no_grad():
        for s in SCALES:
            xs = cv2.resize(norm, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
            x = torch.from_numpy(xs.transpose(2, 0, 1).copy())[None]
            for flip in (False, True):
                y = model(x.flip(-1) if flip else x)
                y = F.interpolate(y, (H, W), mode="bilinear", align_corners=True)
                maps.append(y.flip(-1) if flip else y)
    mean = torch.cat(maps).mean(0)
    assert out.score.shape == (4, H, W)
    torch.testing.assert_close(out.score.float() / len(SCALES), mean, atol=2e-5, rtol=1e-5)
    assert torch.equal(out.pred, mean.argmax(0))

    # the default protocol (uint8 bilinear, cv2 back) gives other logits on the same image
    other = _lpl_evaluator(TinyNet(), resize="image").predict(img)
    assert (other.score.float() / len(SCALES) - mean).abs().max() > 1e-3


def test_default_evaluator_unchanged_by_the_new_options():
    img = _image(20, 24, seed=3)
    a = SegEvaluator(TinyNet().eval(), 4, crop_size=16, scales=[0.75, 1.0], flip=True)
    b = SegEvaluator(TinyNet().eval(), 4, crop_size=16, scales=[0.75, 1.0], flip=True,
                     resize="image", crf=False)
    pa, pb = a.predict(img), b.predict(img, classes=None)
    assert torch.equal(pa.score, pb.score) and torch.equal(pa.pred, pb.pred)


# ----------------------------------------------------------------------------- class mask

def test_restricted_argmax_picks_best_present_class():
    # LPL spec 10.3 H: the absent class has the largest value at the pixel
    score = torch.tensor([[[1.0, 3.0]], [[5.0, 0.0]], [[2.0, 3.0]]])     # [C=3, 1, 2]
    assert restricted_argmax(score, [1, 0, 1]).tolist() == [[2, 0]]       # tie -> lowest
    assert restricted_argmax(score, np.array([True, True, True])).tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="no class"):
        restricted_argmax(score, [0, 0, 0])
    with pytest.raises(ValueError, match="3 flags"):
        restricted_argmax(score, [1, 0])


def test_predict_with_classes_and_class_mask_in_the_loop():
    model = TinyNet(num_classes=4)
    ev = _lpl_evaluator(model, scales=[1.0])
    img = _image(12, 14, seed=1)
    free = ev.predict(img)
    assert len(free.pred.unique()) > 2          # the free argmax uses several classes
    classes = np.array([0, 1, 0, 1], bool)
    out = ev.predict(img, classes=torch.tensor(classes))
    assert torch.equal(out.score, free.score)   # only the argmax is restricted
    masked = free.score.clone()
    masked[[0, 2]] = -np.inf
    assert torch.equal(out.pred, masked.argmax(0))

    # eval_class_mask in the loop: each image's prediction stays inside its GT classes
    C = base_config()
    C.num_classes = 4
    C.update(eval_mode="whole", eval_average="logits", eval_resize="normalized_cubic",
             eval_scale_array=[1.0], eval_flip=True, eval_class_mask=True, num_workers=0)
    labels = [np.full((12, 14), 255, np.uint8), np.zeros((12, 14), np.uint8)]
    labels[0][:6] = 3                              # classes {0 (from 255), 3}
    labels[1][:, :7] = 2                           # classes {0, 2}
    data = [{"data": _image(12, 14, seed=i), "label": lab, "fn": f"x{i}"}
            for i, lab in enumerate(labels)]
    per_image = []
    evaluate_indices(model, C, data, range(2), "cpu",
                     on_image=lambda h: per_image.append(h.numpy()))
    for hist, lab in zip(per_image, labels):
        used = np.flatnonzero(hist.sum(0))
        assert set(used) <= set(np.flatnonzero(image_level_label(lab, 4)))
    assert set(np.flatnonzero(per_image[1].sum(0))) == {0, 2}


# ----------------------------------------------------------------------------- mIoU

def test_absent_class_iou_skip_and_zero():
    hist = np.array([[3, 1, 0, 0],
                     [1, 2, 0, 0],
                     [0, 0, 0, 0],        # class 2: no ground truth, no prediction
                     [2, 0, 0, 0]])       # class 3: ground truth, never predicted
    skip = compute_metrics(hist)            # today's behaviour, the default
    assert np.isnan(skip["iou"][2]) and skip["iou"][3] == 0
    assert skip["miou"] == pytest.approx((3 / 7 + 0.5 + 0) / 3)
    zero = compute_metrics(hist, absent_iou="zero")
    assert zero["iou"].tolist() == pytest.approx([3 / 7, 0.5, 0.0, 0.0])
    assert zero["miou"] == pytest.approx((3 / 7 + 0.5) / 4)
    assert zero["miou_no_back"] == pytest.approx(0.5 / 3)
    assert zero["pixel_acc"] == skip["pixel_acc"] == pytest.approx(5 / 9)
    with pytest.raises(ValueError, match="eval_absent_iou"):
        compute_metrics(hist, absent_iou="nan")


def test_absent_iou_option_reaches_evaluate_model():
    C = base_config()
    C.num_classes = 4
    C.update(eval_mode="whole", num_workers=0)
    data = [{"data": _image(8, 8), "label": np.zeros((8, 8), np.uint8), "fn": "a"}]
    model = torch.nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0, 0, 0]))     # predicts class 0 everywhere
    assert evaluate_model(model, C, dataset=data)["miou"] == pytest.approx(1.0)
    C.eval_absent_iou = "zero"
    assert evaluate_model(model, C, dataset=data)["miou"] == pytest.approx(0.25)


def test_config_keys_checked():
    def config(**kw):
        C = base_config()
        C.dataset_path = str(ROOT)
        C.update(kw)
        return C
    for kw, key in ((dict(eval_crf=True), "eval_crf"),
                    (dict(eval_crf=True, eval_average="logits", eval_mode="center_pad",
                          eval_scale_array=[1]), "eval_crf"),
                    (dict(eval_resize="bicubic"), "eval_resize"),
                    (dict(eval_absent_iou="nan"), "eval_absent_iou"),
                    (dict(eval_class_mask="yes"), "eval_class_mask")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            finalize(config(**kw))
    C = config()
    finalize(C)
    assert (C.eval_resize, C.eval_class_mask, C.eval_crf, C.eval_absent_iou) == \
        ("image", False, False, "skip")


# ----------------------------------------------------------------------------- CRF

def test_crf_image_truncates():
    levels = np.arange(256, dtype=np.uint8)
    img = np.stack([levels, levels[::-1], np.roll(levels, 7)], -1)[None]    # [1, 256, 3]
    lut = normalization_lut(MEAN, STD)
    norm = np.stack([lut[c][img[..., c]] for c in range(3)], 0)            # [3, 1, 256]
    back = crf_image(norm, MEAN, STD)
    assert back.shape == img.shape and back.dtype == np.uint8
    diff = img.astype(int) - back.astype(int)
    assert set(np.unique(diff)) == {0, 1}        # never rounded up, at most one below
    assert 0.05 < (diff == 1).mean() < 0.4       # spec 11: about 1 value in 6
    # where the float32 value lies just below an integer, rounding would give it back but
    # the cast truncates
    f = np.stack([(norm[c] * np.float32(STD[c]) + np.float32(MEAN[c])) * np.float32(255)
                  for c in range(3)], -1)
    below = (f >= 0) & (f < img) & (np.rint(f) == img)
    assert below.any() and (back[below] == img[below].astype(int) - 1).all()


def _no_densecrf(monkeypatch):
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)     # import now raises ImportError


def test_missing_pydensecrf_is_one_config_error(monkeypatch):
    _no_densecrf(monkeypatch)
    prob = np.full((2, 4, 4), 0.5, np.float32)
    with pytest.raises(ConfigError) as e:
        dense_crf(np.zeros((4, 4, 3), np.uint8), prob)
    msg = str(e.value)
    assert "pip install pydensecrf2" in msg and "'eval_crf'" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="pip install pydensecrf2"):
        _lpl_evaluator(TinyNet(), crf=True)
    with pytest.raises(ValueError, match="eval_average='logits'"):
        _lpl_evaluator(TinyNet(), crf=True, average="sum")
    C = base_config()                  # a config that asks for CRF fails when it is loaded
    C.update(dataset_path=str(ROOT), eval_crf=True, eval_average="logits", eval_mode="whole")
    with pytest.raises(ConfigError, match="'eval_crf'.*pip install pydensecrf2"):
        finalize(C)


def test_dense_crf_smooths_an_outlier():
    pytest.importorskip("pydensecrf.densecrf")
    img = np.zeros((20, 20, 3), np.uint8)
    img[:, :10] = (200, 30, 30)
    img[:, 10:] = (30, 30, 200)
    prob = np.zeros((2, 20, 20), np.float32)
    prob[0, :, :10], prob[1, :, :10] = 0.9, 0.1
    prob[0, :, 10:], prob[1, :, 10:] = 0.1, 0.9
    prob[:, 10, 4] = (0.4, 0.6)                  # a wrong, unsure pixel inside the red half
    q = dense_crf(img, prob)
    assert q.shape == (2, 20, 20) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1, atol=1e-5)
    assert prob.argmax(0)[10, 4] == 1 and q.argmax(0)[10, 4] == 0
    assert (q.argmax(0)[:, :10] == 0).all() and (q.argmax(0)[:, 12:] == 1).all()


def test_evaluator_crf_applies_after_softmax_of_mean_logits():
    pytest.importorskip("pydensecrf.densecrf")
    img = _image(14, 18, seed=2)
    model = TinyNet()
    plain = _lpl_evaluator(model).predict(img)
    out = _lpl_evaluator(model, crf=True).predict(img)
    assert torch.equal(out.score, plain.score)
    prob = torch.softmax(plain.score.float() / len(SCALES), 0).numpy()
    lut = normalization_lut(MEAN, STD)
    norm = np.stack([lut[c][img[..., c]] for c in range(3)], 0)
    q = dense_crf(crf_image(norm, MEAN, STD), prob)
    assert np.array_equal(out.pred.numpy(), q.argmax(0))
    masked = _lpl_evaluator(model, crf=True).predict(img, classes=[1, 0, 0, 1])
    q[[1, 2]] = -1
    assert np.array_equal(masked.pred.numpy(), q.argmax(0))


# ----------------------------------------------------------------------------- export

N_TRAIN = 10


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    """Tiny demo data (10 train images of 32 px) and a checkpoint of the supervised method
    saved as the engine does (format 2, method, weights, recorded config)."""
    from furnace.data.demo import generate
    from furnace.engine.checkpoint import FORMAT, atomic_save
    from furnace.methods import get_method
    base = tmp_path_factory.mktemp("lplexport")
    root = base / "demo"
    generate(root, n_train=N_TRAIN, n_val=2, size=32, verbose=False)
    sets = [f"dataset_path={root}", "generate_demo_data=false", "num_workers=0",
            "eval_mode=whole", "eval_average=logits", "eval_resize=normalized_cubic",
            "eval_scale_array=[0.5,1.0,1.5]", "eval_flip=true", "method=supervised"]
    C = load_config(ROOT / "exp_demo", sets)
    torch.manual_seed(0)
    net = get_method("supervised").build_eval_model(C)
    with torch.no_grad():                         # a non-degenerate head: several classes
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ckpt = base / "ckpt.pth"
    atomic_save({"format": FORMAT, "method": "supervised", "model": net.state_dict(),
                 "epoch": 0, "iteration": 0, "config": C.to_dict()}, ckpt)
    ids = (root / "train_aug.txt").read_text().split()
    keep = base / "labelled.txt"
    keep.write_text("".join(i + "\n" for i in ids[:2]))
    return {"root": root, "ckpt": ckpt, "C": C, "net": net.eval(), "ids": ids, "keep": keep,
            "base": base}


def _export_cmd(d, out):
    return [sys.executable, str(ROOT / "exp_demo" / "export.py"), "-e", str(d["ckpt"]),
            "--list", "train_aug.txt", "--out", str(out), "--keep-labelled", str(d["keep"]),
            "-d", "cpu", "--set", f"dataset_path={d['root']}", "generate_demo_data=false",
            "num_workers=0"]


def test_export_is_resumable_and_readable(demo_ckpt):
    from furnace.data.datasets import VOCDataset, read_label
    from furnace.eval.export import STOP_AFTER_ENV, png_is_valid
    d = demo_ckpt
    out = d["base"] / "pseudo"
    env = dict(os.environ, OMP_NUM_THREADS="1", **{STOP_AFTER_ENV: "3"})
    first = subprocess.Popen(_export_cmd(d, out), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _, err = first.communicate(timeout=120)
    assert first.returncode == -9, err                  # killed after 3 images
    done = sorted(out.glob("*.png"))
    assert len(done) == 3 and all(png_is_valid(p) for p in done)
    assert not (d["base"] / "train_aug_pseudo.txt").exists()     # no list before the end
    stamp = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done}

    stale = out / f".{d['ids'][5]}.png.tmp{first.pid}"      # a write the kill interrupted
    stale.write_bytes(b"\x89PNG partial")
    env.pop(STOP_AFTER_ENV)
    second = subprocess.run(_export_cmd(d, out), env=env, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stderr
    assert "skipped 3" in second.stderr                     # the progress bar says so
    for p in done:                                          # finished PNGs not rewritten
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp[p.name]
    assert not stale.exists()
    pngs = sorted(out.iterdir())
    assert [p.name for p in pngs] == sorted(f"{i}.png" for i in d["ids"])   # no temporaries
    assert all(png_is_valid(p) for p in pngs)

    # the list: labelled ids keep their ground truth, the others point at their PNG
    listed = d["base"] / "train_aug_pseudo.txt"
    lines = listed.read_text().splitlines()
    assert lines[:2] == d["ids"][:2]
    assert lines[2:] == [f"{i}\t./pseudo/{i}.png" for i in d["ids"][2:]]
    C = d["C"]
    ds = VOCDataset(str(d["root"]), str(listed), mode="eval", num_classes=C.num_classes)
    assert ds.names == d["ids"]
    for i in range(len(ds)):
        img_path, lab_path = ds.paths(i)
        expect = out / f"{d['ids'][i]}.png" if i >= 2 else \
            d["root"] / "train_aug" / "label" / f"{d['ids'][i]}.png"
        assert Path(lab_path).resolve() == expect.resolve()
        item = ds[i]
        assert item["label"].shape == item["data"].shape[:2]
        assert item["label"].max() < C.num_classes

    # each PNG is the configured protocol's prediction restricted to the image's GT classes
    ev = SegEvaluator.from_config(d["net"], C, channels_last=False)
    for i in (2, N_TRAIN - 1):
        img, gt = ds.load(i)
        gt = read_label(str(d["root"] / "train_aug" / "label" / f"{d['ids'][i]}.png"))
        want = ev.predict(img, image_level_label(gt, C.num_classes)).pred.numpy()
        assert np.array_equal(read_label(str(out / f"{d['ids'][i]}.png")), want)


def test_export_class_mask_needs_the_masks(demo_ckpt, tmp_path):
    import copy

    from furnace.data.datasets import DataError, read_label
    from furnace.eval.export import export_pseudo_labels
    d = demo_ckpt
    root = tmp_path / "demo"
    (root / "train_aug").mkdir(parents=True)
    for sub in ("image", "label"):
        (root / "train_aug" / sub).mkdir()
        for i in d["ids"][:2]:
            os.link(d["root"] / "train_aug" / sub / f"{i}.png",
                    root / "train_aug" / sub / f"{i}.png")
    (root / "train_aug.txt").write_text("".join(i + "\n" for i in d["ids"][:2]))
    missing = root / "train_aug" / "label" / f"{d['ids'][1]}.png"
    missing.unlink()
    C = copy.deepcopy(d["C"])
    C.dataset_path = str(root)
    with pytest.raises(DataError, match=str(missing)):
        export_pseudo_labels(C, d["ckpt"], "train_aug.txt", tmp_path / "p1")
    listed = export_pseudo_labels(C, d["ckpt"], "train_aug.txt", tmp_path / "p2",
                                  class_mask=False)
    assert listed == tmp_path / "train_aug_p2.txt"
    for i in d["ids"][:2]:
        assert read_label(str(tmp_path / "p2" / f"{i}.png")).shape == (32, 32)
    other = tmp_path / "keep_other.txt"
    other.write_text("not_an_id\n")
    with pytest.raises(DataError, match="not_an_id"):
        export_pseudo_labels(C, d["ckpt"], "train_aug.txt", tmp_path / "p3", class_mask=False,
                             keep_labelled=str(other))


def test_eval_cli_with_class_mask_and_absent_zero(demo_ckpt, tmp_path):
    """eval.py of the checkpoint with stage-1 evaluation (image-level labels, absent classes
    as IoU 0): the keys reach the evaluator and the metric through the command line."""
    from furnace.data.datasets import read_label
    from furnace.eval import cli
    d = demo_ckpt
    args = ["-e", str(d["ckpt"]), "-d", "cpu", "--set", f"dataset_path={d['root']}",
            "generate_demo_data=false", "num_workers=0", f"log_dir={tmp_path / 'log'}"]
    plain, = cli.main(str(ROOT / "exp_demo"), args)
    stage1, = cli.main(str(ROOT / "exp_demo"), args + ["eval_class_mask=true",
                                                      "eval_absent_iou=zero"])
    gt_classes = set()
    for i in (d["root"] / "val.txt").read_text().split():
        gt_classes |= set(np.unique(read_label(str(d["root"] / "val" / "label" / f"{i}.png"))))
    hist = stage1["hist"]
    assert set(np.flatnonzero(hist.sum(0))) <= gt_classes | {0}      # no absent class predicted
    assert not np.array_equal(hist, plain["hist"])
    assert not np.isnan(stage1["iou"]).any()
    assert stage1["miou"] == pytest.approx(np.mean(stage1["iou"]))
    assert stage1["miou"] == pytest.approx(compute_metrics(hist, "zero")["miou"])
