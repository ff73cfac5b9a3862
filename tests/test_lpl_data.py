"""LPL's data layer (spec methods/LPL.md 3.1, 6.2-6.5, 10.3 D, E, G, section 11): image-level
labels, the strong and weak pipelines, the two stage-1 stream datasets, the StreamSpec dataset
hook, the split lists and the demo's lists."""
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from easydict import EasyDict
from PIL import Image

from furnace.config import ConfigError, load_config
from furnace.data import DataError, StreamSpec, TrainLoaders, read_label
from furnace.data.demo import generate, is_complete
from furnace.data.image_labels import (classes_line, image_level_label, read_image_label_list)
from furnace.data.lpl import LPLDataset, lpl_strong_dataset, lpl_weak_dataset
from furnace.data import lpl_aug
from furnace.data.lpl_aug import (StrongTransform, WeakTransform, border_fill, mirror,
                                  normalise_crop, rotate_by, scale_by, shear_by, shear_matrix,
                                  strong_transform_from_config)
from furnace.data.lpl_splits import lpl_lists, main as splits_main
from furnace.data.transforms import normalize

from helpers import make_city

ROOT = Path(__file__).resolve().parents[1]
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
U2PL_1464 = ROOT / "exp_voc" / "splits_u2pl" / "1464" / "labeled.txt"


# ----------------------------------------------------------------------------- image-level labels

def test_image_level_label_rule_check_d():
    """10.3 D: {0, 15, 255} -> {0, 15}; {15, 255} -> {0, 15} (255 counts as background);
    {15} -> {15}."""
    def classes(values):
        mask = np.array(values, dtype=np.uint8).reshape(1, -1)
        y = image_level_label(mask, 21)
        assert y.dtype == np.float32 and y.shape == (21,) and set(np.unique(y)) <= {0.0, 1.0}
        return set(np.flatnonzero(y).tolist())
    assert classes([0, 15, 255, 15]) == {0, 15}
    assert classes([15, 255, 255]) == {0, 15}
    assert classes([15, 15]) == {15}
    mask = np.array([[15, 255]], np.uint8)
    image_level_label(mask, 21)
    assert mask.tolist() == [[15, 255]]  # the mask itself is not changed
    with pytest.raises(DataError, match=r"label x/a\.png has values \[21\] outside \[0, 21\)"):
        image_level_label(np.array([[0, 21, 255]], np.uint8), 21, "x/a.png")


def test_image_label_list_reader_and_its_errors(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("# id classes\n\n2007_000032 0 1 15  # a comment\n2007_000039\t0 20\n")
    table = read_image_label_list(str(p), 21)
    assert set(table) == {"2007_000032", "2007_000039"}
    assert np.flatnonzero(table["2007_000032"]).tolist() == [0, 1, 15]
    assert classes_line("2007_000039", table["2007_000039"]) == "2007_000039 0 20"

    def error(text):
        p.write_text(text)
        with pytest.raises(DataError) as e:
            read_image_label_list(str(p), 21)
        msg = str(e.value)
        assert "\n" not in msg
        return msg
    assert error("a 0\nb 0 x\n").startswith(f"{p}:2: class 'x' is not an integer")
    assert error("a 0\n\nb\n").startswith(f"{p}:3: 'b' names no class")
    assert error("a 0 21\n").startswith(f"{p}:1: class 21 of 'a' is outside [0, 21)")
    assert error("a -1\n").startswith(f"{p}:1: class -1")
    assert error("a 0\n# c\nb 1\na 2\n").startswith(
        f"{p}:4: id 'a' is listed again (first at line 1)")
    with pytest.raises(DataError, match="image-label list not found"):
        read_image_label_list(str(tmp_path / "none.txt"), 21)


# ----------------------------------------------------------------------------- ops

def _img(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_resize_rounds_half_to_even_as_opencv():
    """Section 11: the scaled size is round-half-even (17 x 0.5 -> 8, 21 x 1.5 -> 32,
    27 x 1.5 -> 40); labels stay class indices (nearest)."""
    for (h, w), s, out in (((17, 21), 0.5, (8, 10)), ((21, 27), 1.5, (32, 40)),
                           ((27, 17), 1.5, (40, 26))):
        rng = np.random.default_rng(0)
        lab = rng.choice(np.array([0, 3, 255], np.uint8), (h, w))
        img, lab2 = scale_by(_img(rng, h, w), lab, s)
        assert img.shape == out + (3,) and img.dtype == np.uint8 and lab2.shape == out
        assert set(np.unique(lab2)) <= {0, 3, 255}


def test_flip_mirrors_and_is_drawn_from_rng():
    rng = np.random.default_rng(1)
    img, lab = _img(rng, 5, 7), rng.integers(0, 3, (5, 7)).astype(np.uint8)
    flipped, seen = 0, set()
    for seed in range(40):
        r = np.random.default_rng(seed)
        flip = np.random.default_rng(seed).random() < lpl_aug.DATA_RANDOMFLIP
        a, b = lpl_aug.random_flip(img, lab, r, (0, 0, 0))
        ref = (img[:, ::-1], lab[:, ::-1]) if flip else (img, lab)
        assert np.array_equal(a, ref[0]) and np.array_equal(b, ref[1])
        flipped += flip
        seen.add(flip)
    assert seen == {True, False} and 10 < flipped < 30
    assert np.array_equal(mirror(img, None)[0][:, 0], img[:, -1])


def test_posterize_keeps_the_top_bits():
    img = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2))
    bits_seen = set()
    for seed in range(60):
        bits = int(np.random.default_rng(seed).integers(1, 9))
        out = np.asarray(lpl_aug.posterize(img, np.random.default_rng(seed)))
        keep = np.uint8((0xFF << (8 - bits)) & 0xFF)
        assert np.array_equal(out, np.asarray(img) & keep)
        bits_seen.add(bits)
    assert bits_seen == set(range(1, 9))  # U{1..8}, both ends


def test_colour_ops_ranges():
    rng = np.random.default_rng(2)
    arr = _img(rng, 12, 12)
    img = Image.fromarray(arr)
    for seed in range(20):
        t = np.random.default_rng(seed).uniform(*lpl_aug.DATA_RANDOMSOLARIZE) * 255
        out = np.asarray(lpl_aug.solarize(img, np.random.default_rng(seed))).astype(int)
        assert np.array_equal(out, np.where(arr < t, arr, 255 - arr.astype(int)))
        # invert blends towards the original: alpha in [0, 1] keeps values between the two
        inv = np.asarray(lpl_aug.invert(img, np.random.default_rng(seed))).astype(int)
        lo = np.minimum(arr, 255 - arr.astype(int))
        hi = np.maximum(arr, 255 - arr.astype(int))
        assert ((inv >= lo - 1) & (inv <= hi + 1)).all()
    for name, op in lpl_aug.COLOUR_OPS.items():
        out = op(img, np.random.default_rng(3))
        assert out.mode == "RGB" and out.size == img.size, name
    assert len(lpl_aug.COLOUR_OPS) == 9 and list(lpl_aug.GEOMETRIC_OPS) == [
        "scale", "flip", "shear", "rotate"]


def test_rotation_and_shear_fill_the_border_with_the_mean_colour():
    fill = border_fill(MEAN)
    assert fill == (123, 116, 103)
    img = np.full((30, 40, 3), 200, np.uint8)
    lab = np.full((30, 40), 2, np.uint8)
    a, b = rotate_by(img, lab, 45, fill)
    assert a[0, 0].tolist() == [123, 116, 103] and b[0, 0] == 255
    assert a[15, 20].tolist() == [200, 200, 200] and b[15, 20] == 2
    assert set(np.unique(b)) == {2, 255}
    # x' = x + 0.3 (y - 20): the top row moves left by 6, the bottom row right by 2.7
    a, b = shear_by(img, lab, 0.3, 0.0, fill)
    assert a[0, 39].tolist() == [123, 116, 103] and b[0, 39] == 255 and b[0, 0] == 2
    assert a[29, 0].tolist() == [123, 116, 103] and b[29, 0] == 255 and b[29, 39] == 2
    # random rotation: an integer angle in [-45, 45], drawn from rng
    for seed in range(5):
        a, b = lpl_aug.random_rotate(img, lab, np.random.default_rng(seed), fill)
        angle = int(np.random.default_rng(seed).integers(-45, 46))
        assert np.array_equal(a, rotate_by(img, lab, angle, fill)[0])


def test_shear_pivot_of_section_11():
    """x' = x + a_x (y - W/2), y' = y + a_y (x - H/2): the point (x = H/2, y = W/2) stays."""
    h, w = 30, 50
    m = shear_matrix(0.2, -0.1, h, w)
    assert m.dtype == np.float32
    p = np.array([h / 2, w / 2, 1.0])
    assert np.allclose(m.astype(np.float64) @ p, p[:2], atol=1e-5)
    c = np.array([w / 2, h / 2, 1.0])  # the centre moves on a non-square image
    assert not np.allclose(m.astype(np.float64) @ c, c[:2], atol=1e-2)


def test_scale_op_range():
    img = np.zeros((40, 40, 3), np.uint8)
    sides = [lpl_aug.random_scale(img, None, np.random.default_rng(s), (0, 0, 0))[0].shape[0]
             for s in range(60)]
    assert 20 <= min(sides) < 35 and 60 < max(sides) <= 80


# ----------------------------------------------------------------------------- pipelines

def test_crop_pads_image_with_zero_and_label_with_255_at_a_random_offset():
    rng = np.random.default_rng(4)
    img, lab = _img(rng, 10, 12), rng.integers(0, 3, (10, 12)).astype(np.uint8)
    norm = normalize(img, MEAN, STD).transpose(2, 0, 1)
    offsets = set()
    for seed in range(30):
        data, out = normalise_crop(img, lab, (16, 20), MEAN, STD, np.random.default_rng(seed))
        assert data.shape == (3, 16, 20) and data.dtype == np.float32
        assert out.shape == (16, 20) and out.dtype == np.uint8
        ys, xs = np.nonzero(out != 255)
        y0, x0 = ys.min(), xs.min()
        offsets.add((y0, x0))
        assert 0 <= y0 <= 6 and 0 <= x0 <= 8
        inside = np.zeros((16, 20), bool)
        inside[y0:y0 + 10, x0:x0 + 12] = True
        assert np.array_equal(out[inside].reshape(10, 12), lab)
        assert (out[~inside] == 255).all() and (data[:, ~inside] == 0.0).all()
        assert np.array_equal(data[:, y0:y0 + 10, x0:x0 + 12], norm)
    assert len(offsets) > 5  # placed at random offsets, not centred
    # a larger image is cropped: every pixel comes from it, nothing is padded
    big = _img(rng, 30, 40)
    data, out = WeakTransform((16, 20), MEAN, STD)(big, np.zeros((30, 40), np.uint8),
                                                  np.random.default_rng(0))
    assert (out == 0).all()
    full = normalize(big, MEAN, STD).transpose(2, 0, 1)
    hits = [(y, x) for y in range(15) for x in range(21)
            if np.array_equal(full[:, y:y + 16, x:x + 20], data)]
    assert len(hits) == 1


def test_strong_pipeline_deterministic_from_rng_and_shapes():
    rng = np.random.default_rng(5)
    t = StrongTransform((24, 24), MEAN, STD)
    for h, w in ((17, 30), (40, 33), (24, 24)):
        img = _img(rng, h, w)
        lab = rng.choice(np.array([0, 1, 2, 255], np.uint8), (h, w))
        outs = []
        random.seed(0)
        np.random.seed(0)
        for seed in range(12):
            d1, l1 = t(img, lab, np.random.default_rng([seed, 7]))
            d2, l2 = t(img.copy(), lab.copy(), np.random.default_rng([seed, 7]))
            assert np.array_equal(d1, d2) and np.array_equal(l1, l2)
            assert d1.shape == (3, 24, 24) and d1.dtype == np.float32
            assert l1.shape == (24, 24) and l1.dtype == np.uint8
            assert set(np.unique(l1)) <= {0, 1, 2, 255}
            outs.append(d1)
            d3, l3 = t(img, None, np.random.default_rng([seed, 7]))
            assert l3 is None and np.array_equal(d3, d1)  # same draws without a label
        assert len({o.tobytes() for o in outs}) > 8
        # every draw came from the rng passed in: the global RNGs were not touched
        assert random.random() == random.Random(0).random()
        assert np.random.random() == np.random.RandomState(0).random_sample()
    # K = 0 is the weak pipeline
    img = _img(rng, 20, 20)
    a = StrongTransform((24, 24), MEAN, STD, augtime=0)(img, None, np.random.default_rng(1))
    b = WeakTransform((24, 24), MEAN, STD)(img, None, np.random.default_rng(1))
    assert np.array_equal(a[0], b[0])
    C = EasyDict(image_height=24, image_width=32, image_mean=MEAN, image_std=STD)
    t = strong_transform_from_config(C, augtime=3)
    assert t.crop_hw == (24, 32) and t.augtime == 3 and t.fill == (123, 116, 103)


def test_strong_pipeline_op_counts():
    """k ~ U{0..K} colour ops, then K - k geometric ops: with probability 1/3 no geometric
    op (K = 2)."""
    t = StrongTransform((8, 8), MEAN, STD)
    img = np.full((8, 8, 3), 100, np.uint8)
    lab = np.zeros((8, 8), np.uint8)
    calls = Counter()
    originals = dict(lpl_aug.GEOMETRIC_OPS)

    def spy(name):
        def op(*a):
            calls[name] += 1
            return originals[name](*a)
        return op
    try:
        for name in originals:
            lpl_aug.GEOMETRIC_OPS[name] = spy(name)
        n_geo = []
        for seed in range(300):
            before = sum(calls.values())
            t.augment(img, lab, np.random.default_rng(seed))
            n_geo.append(sum(calls.values()) - before)
    finally:
        lpl_aug.GEOMETRIC_OPS.update(originals)
    share = Counter(n_geo)
    assert set(share) == {0, 1, 2} and all(70 < share[k] < 130 for k in (0, 1, 2))
    assert set(calls) == set(originals)


# ----------------------------------------------------------------------------- datasets

def _voc_ids(root, ids):
    (root / "train_aug" / "image").mkdir(parents=True, exist_ok=True)
    (root / "train_aug" / "label").mkdir(parents=True, exist_ok=True)
    (root / "lab.txt").write_text("".join(i + "\n" for i in ids))


def _cfg(root, **kw):
    c = dict(dataset="voc", dataset_path=str(root), train_source="lpl_labeled.txt",
             unsup_source="lpl_all.txt", voc_train_folder="train_aug", num_classes=6,
             image_mean=MEAN, image_std=STD, image_height=40, image_width=40,
             train_scale_array=[1.0], batch_size=2, num_workers=0, seed=3, max_samples=None,
             niters_per_epoch=2, image_labels="masks")
    c.update(kw)
    return EasyDict(c)


@pytest.mark.parametrize("n, counts", [(92, {116: 2, 115: 90}), (1464, {8: 334, 7: 1130})])
def test_strong_dataset_draws_each_labelled_image_floor_or_ceil_times_check_g(tmp_path, n,
                                                                              counts):
    """10.3 G: one pass over the 10582 dataset indices reads list entry i mod N: for N = 92
    entries 0 and 1 116 times, the others 115; for N = 1464 entries 0..333 8 times."""
    _voc_ids(tmp_path, [f"id{i:05d}" for i in range(n)])
    ds = lpl_strong_dataset(_cfg(tmp_path, train_source="lab.txt"), "train", 0, 10582)
    assert isinstance(ds, LPLDataset) and len(ds) == 10582 and ds.n == n
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True,
                                                  seed=1, drop_last=True)
    per_entry = Counter(ds.list_index(i) for i in sampler)
    assert sum(per_entry.values()) == 10582 and len(per_entry) == n
    assert Counter(per_entry.values()) == counts
    assert per_entry[0] == per_entry[1] == max(counts) and per_entry[n - 1] == min(counts)
    with pytest.raises(IndexError):
        ds.list_index(10582)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A tiny demo dataset: 160 training images (2 labelled at 1/80), 32 x 32 pixels."""
    root = tmp_path_factory.mktemp("lpl") / "demo"
    generate(root, n_train=160, n_val=2, size=32, verbose=False)
    return root


def test_demo_writes_image_labels_and_lpl_lists(demo_root):
    lines = (demo_root / "image_labels.txt").read_text().splitlines()
    ids = (demo_root / "train_aug.txt").read_text().splitlines()
    vids = (demo_root / "val.txt").read_text().splitlines()
    table = read_image_label_list(str(demo_root / "image_labels.txt"), 6)
    assert len(lines) == len(table) == 162 and set(table) == set(ids) | set(vids)
    for i in ids[:20] + vids:
        folder = "train_aug" if i in ids else "val"
        mask = read_label(str(demo_root / folder / "label" / f"{i}.png"))
        assert np.array_equal(table[i], image_level_label(mask, 6))
    lab = (demo_root / "subset_train_aug" / "train_aug_labeled_1-80.txt").read_text().split()
    assert (demo_root / "lpl_labeled.txt").read_text().split() == lab and len(lab) == 2
    d = (demo_root / "lpl_all.txt").read_text().split()
    assert d == lab + [i for i in ids if i not in lab]
    stamp = json.loads((demo_root / "demo_stamp.json").read_text())
    assert stamp["version"] == 3 and "lpl_all.txt" in stamp["lists"]
    # data written before these lists existed (a stamp without them) is not complete
    old = dict(stamp)
    del old["lists"]
    (demo_root / "demo_stamp.json").write_text(json.dumps(old))
    try:
        assert not is_complete(demo_root, n_train=160, n_val=2, size=32)
    finally:
        (demo_root / "demo_stamp.json").write_text(json.dumps(stamp))
    assert is_complete(demo_root, n_train=160, n_val=2, size=32)


def test_weak_items_hide_unlabelled_ground_truth_check_e(demo_root):
    """10.3 E (data half): an image outside the labelled list has an all-255 label; a labelled
    image drawn into the weak stream carries its ground-truth crop; categories come from the
    full mask (or the list, with the same values)."""
    C = _cfg(demo_root)
    ds = lpl_weak_dataset(C, "unlabeled", 1, 160)
    lab = set((demo_root / "lpl_labeled.txt").read_text().split())
    from_list = lpl_weak_dataset(_cfg(demo_root, image_labels="image_labels.txt"),
                                 "unlabeled", 1, 160)
    for idx in range(6):
        item = ds[(idx, 0)]
        fn = item["fn"]
        mask = read_label(str(demo_root / "train_aug" / "label" / f"{fn}.png"))
        assert item["is_labelled"] == (fn in lab) and item["n"] == 160
        assert item["data"].shape == (3, 40, 40) and item["label"].dtype == torch.uint8
        assert torch.equal(item["category"], torch.from_numpy(image_level_label(mask, 6)))
        label = item["label"].numpy()
        if fn in lab:  # the weak crop of a 32 x 32 image: the whole mask, placed in 255
            ys, xs = np.nonzero(label != 255)
            assert np.array_equal(label[ys.min():ys.min() + 32, xs.min():xs.min() + 32], mask)
        else:
            assert (label == 255).all()
        other = from_list[(idx, 0)]
        assert torch.equal(other["category"], item["category"])
        assert torch.equal(other["data"], item["data"]) and other["_seed"] == item["_seed"]
    assert sum(ds[(i, 0)]["is_labelled"] for i in range(2)) == 2  # D starts with them
    strong = lpl_strong_dataset(C, "train", 0, 160)
    assert all(strong[(i, 3)]["is_labelled"] for i in range(4))
    assert (strong[(0, 3)]["label"] != 255).any()


def test_unlabelled_masks_are_not_read_with_an_image_label_list(demo_root, tmp_path):
    import shutil
    root = tmp_path / "demo"
    shutil.copytree(demo_root, root)
    d = (root / "lpl_all.txt").read_text().split()
    (root / "train_aug" / "label" / f"{d[5]}.png").unlink()
    ok = lpl_weak_dataset(_cfg(root, image_labels=str(root / "image_labels.txt")),
                          "unlabeled", 1, 160)
    assert ok[(5, 0)]["fn"] == d[5] and (ok[(5, 0)]["label"] == 255).all()
    masks = lpl_weak_dataset(_cfg(root), "unlabeled", 1, 160)
    with pytest.raises(DataError, match="label file not found"):
        masks[(5, 0)]
    # an id missing from the image-label list: one line naming the list and the id
    table = root / "image_labels.txt"
    table.write_text("".join(l + "\n" for l in table.read_text().splitlines()
                             if not l.startswith(d[7] + " ")))
    with pytest.raises(DataError) as e:
        lpl_weak_dataset(_cfg(root, image_labels="image_labels.txt"), "unlabeled", 1, 160)
    assert str(e.value).startswith(f"image-label list {table} has no line for '{d[7]}' "
                                   f"(listed at {root / 'lpl_all.txt'}:8)")


def test_stream_dataset_hook_in_train_loaders(demo_root):
    """StreamSpec.dataset(C, source, index, file_length) builds the stream's dataset; the
    batches carry category [B,C] float32 and is_labelled [B] bool, and are reproducible."""
    C = _cfg(demo_root)
    calls = []

    def strong(C, source, index, file_length):
        calls.append((source, index, file_length))
        return lpl_strong_dataset(C, source, index, file_length)
    streams = (StreamSpec("strong", "train", 0, dataset=strong),
               StreamSpec("weak", "unlabeled", 1, dataset=lpl_weak_dataset))
    L = TrainLoaders(C, streams=streams)
    assert calls == [("train", 0, 160)] and [len(d) for d in L.datasets] == [160, 160]
    batches = list(L.epoch(0))
    assert len(batches) == 2
    lab = set((demo_root / "lpl_labeled.txt").read_text().split())
    for s, w in batches:
        for b in (s, w):
            assert b["data"].shape == (2, 3, 40, 40) and b["data"].dtype == torch.float32
            assert b["label"].shape == (2, 40, 40) and b["label"].dtype == torch.uint8
            assert b["category"].shape == (2, 6) and b["category"].dtype == torch.float32
            assert b["is_labelled"].dtype == torch.bool and "_seed" not in b
            assert b["is_labelled"].tolist() == [f in lab for f in b["fn"]]
        assert s["is_labelled"].all() and (s["category"][:, 0] == 1).all()
    # the same batches again, and with loader workers (every draw comes from the sample seed)
    for workers in (0, 2):
        loaders = TrainLoaders(C, streams=streams, num_workers=workers)
        again = list(loaders.epoch(0))
        loaders.close()
        for (s, w), (s2, w2) in zip(batches, again):
            assert torch.equal(s["data"], s2["data"]) and torch.equal(s["label"], s2["label"])
            assert torch.equal(w["data"], w2["data"]) and w["fn"] == w2["fn"]
    # a stream without the hook still builds the framework's dataset
    plain = TrainLoaders(C, streams=(StreamSpec("labeled", "train", 0),))
    assert type(plain.datasets[0]).__name__ == "VOCDataset"


def test_cityscapes_is_not_supported(tmp_path):
    root = make_city(tmp_path / "city", n_train=4, n_val=1, ratios=(2,))
    C = _cfg(root, dataset="city", num_classes=19,
             train_source="config_new/subset_train/train_aug_labeled_1-2.txt",
             unsup_source="config_new/train.txt")
    with pytest.raises(DataError, match="VOC layout .* only.*class 0 is road"):
        lpl_strong_dataset(C, "train", 0, 4)


def test_image_labels_config_key():
    C = load_config(ROOT / "exp_voc", [], env={})
    assert C.image_labels == "masks"
    assert load_config(ROOT / "exp_voc", ["image_labels=lists/x.txt"], env={}).image_labels \
        == "lists/x.txt"
    with pytest.raises(ConfigError, match="config key 'image_labels' must be 'masks' or"):
        load_config(ROOT / "exp_voc", ["image_labels= "], env={})


# ----------------------------------------------------------------------------- split lists

def test_lpl_lists_order_and_sizes(tmp_path, capsys):
    full = [f"2008_{i:06d}" for i in range(10, 0, -1)] + ["2007_000005", "2007_000001"]
    train = ["2007_000001", "2007_000005", "2008_000003", "2008_000007"]
    (tmp_path / "full.txt").write_text("\n".join(full) + "\n")
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n")
    out = tmp_path / "out"
    assert splits_main(["--full", str(tmp_path / "full.txt"), "--train",
                        str(tmp_path / "train.txt"), "--out", str(out), "--sizes", "1", "3"]) == 0
    assert (out / "lpl_labeled_1.txt").read_text() == "2007_000001\n"
    assert (out / "lpl_labeled_3.txt").read_text().split() == train[:3]
    d = (out / "lpl_all.txt").read_text().split()
    assert d == train + [i for i in full if i not in train] and sorted(d) == sorted(full)
    assert "lpl_all.txt: 12 lines" in capsys.readouterr().out
    # errors: a train id missing from the full list, a size beyond the train list
    (tmp_path / "bad.txt").write_text("2007_000001\n2009_000001\n")
    assert splits_main(["--full", str(tmp_path / "full.txt"), "--train",
                        str(tmp_path / "bad.txt"), "--out", str(out)]) == 2
    assert "bad.txt:2 sample '2009_000001' is not in the full list" in capsys.readouterr().err
    assert splits_main(["--full", str(tmp_path / "full.txt"), "--train",
                        str(tmp_path / "train.txt"), "--out", str(out), "--sizes", "5"]) == 2
    assert "--sizes 5" in capsys.readouterr().err
    # an unsorted train list is used in its order, with a note
    (tmp_path / "train2.txt").write_text("2008_000007\n2007_000001\n")
    assert splits_main(["--full", str(tmp_path / "full.txt"), "--train",
                        str(tmp_path / "train2.txt"), "--out", str(out), "--sizes", "1"]) == 0
    assert "not sorted" in capsys.readouterr().err
    assert (out / "lpl_labeled_1.txt").read_text() == "2008_000007\n"


@pytest.mark.skipif(not U2PL_1464.is_file(), reason="U2PL's 1464 list is not in the repo")
def test_lpl_subsets_from_the_shipped_u2pl_list():
    """Spec 6.2: U2PL's 1464 labeled.txt is sorted (= VOC train.txt), and the first N ids end
    with 2007_002953 (92), 2007_006136 (183), 2008_000733 (366), 2009_001636 (732)."""
    train = [l.strip() for l in U2PL_1464.read_text().splitlines() if l.strip()]
    assert len(train) == len(set(train)) == 1464 and train == sorted(train)
    extra = [f"2012_{i:06d}" for i in range(50)]
    full = extra[:20] + train[::-1] + extra[20:]  # any order: D takes train's
    subsets, d = lpl_lists(list(enumerate(train, 1)), list(enumerate(full, 1)),
                           [92, 183, 366, 732, 1464])
    assert {n: s[-1] for n, s in subsets.items()} == {
        92: "2007_002953", 183: "2007_006136", 366: "2008_000733", 732: "2009_001636",
        1464: train[-1]}
    assert all(len(s) == n for n, s in subsets.items())
    assert d == train + extra and not any(i.startswith("2008") for i in subsets[183])
