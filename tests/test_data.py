"""Datasets, transforms, loaders and clear errors on small generated folders (VOC and
Cityscapes layouts of the CPS archives)."""
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from easydict import EasyDict
from PIL import Image

from furnace.data import (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, VOC_CLASSES, DataError,
                          CityscapesDataset, TrainLoaders, TrainTransform, VOCDataset,
                          build_eval_dataset, default_class_names, read_label, voc_folder_for_list,
                          voc_palette)
from furnace.data.transforms import crop_start

H, W = 24, 32
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


# ----------------------------------------------------------------------------- fixtures

class _Root(type(Path())):
    """A dataset root path that also carries the arrays written there (attribute `arrays`)."""

def _img(rng):
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _lab(rng, values=(0, 1, 2, 255)):
    return rng.choice(np.array(values, dtype=np.uint8), size=(H, W))


def _save_rgb(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def _save_label(path, lab, palette=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(lab)  # 'L'
    if palette:
        im = Image.frombytes("P", (lab.shape[1], lab.shape[0]), lab.tobytes())
        im.putpalette(voc_palette(256).tobytes())
    im.save(path)


def _write_list(path, lines, crlf=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write("".join(l + ("\r\n" if crlf else "\n") for l in lines).encode())


@pytest.fixture
def voc_root(tmp_path):
    """VOC layout: 6 train ids (one image stored as .png), 3 val ids, CRLF val list, splits."""
    rng = np.random.default_rng(0)
    root = _Root(tmp_path / "pascal_voc")
    ids = [f"2007_{i:06d}" for i in range(6)]
    arrays = {}
    for k, i in enumerate(ids):
        img, lab = _img(rng), _lab(rng)
        ext = ".png" if k == 5 else ".jpg"
        _save_rgb(root / "train_aug" / "image" / (i + ext), img)
        _save_label(root / "train_aug" / "label" / (i + ".png"), lab, palette=k % 2 == 0)
        arrays[i] = (img, lab)
    vids = [f"2008_{i:06d}" for i in range(3)]
    for i in vids:
        img, lab = _img(rng), _lab(rng)
        _save_rgb(root / "val" / "image" / (i + ".png"), img)  # lossless, compared exactly
        _save_label(root / "val" / "label" / (i + ".png"), lab, palette=True)
        arrays[i] = (img, lab)
    _write_list(root / "train_aug.txt", ids)
    _write_list(root / "val.txt", vids, crlf=True)
    _write_list(root / "subset_train_aug" / "train_aug_labeled_1-2.txt", ids[:3])
    _write_list(root / "subset_train_aug" / "train_aug_unlabeled_1-2.txt", ids[3:])
    root.arrays = arrays
    return root


@pytest.fixture
def city_root(tmp_path):
    rng = np.random.default_rng(1)
    root = _Root(tmp_path / "city")
    lines, vlines, arrays = [], [], {}
    for split, names, out in (("train", [f"aachen_{i:06d}_000019" for i in range(4)], lines),
                              ("val", ["frankfurt_000000_000294"], vlines)):
        for n in names:
            img, lab = _img(rng), _lab(rng, (0, 5, 18, 255))
            _save_rgb(root / "images" / split / f"{n}.png", img)
            _save_label(root / "segmentation" / split / f"{n}_gtFine.png", lab)
            out.append(f"/images/{split}/{n}.png\t/segmentation/{split}/{n}_gtFine.png")
            arrays[n + "_gtFine"] = (img, lab)
    sub = root / "config_new" / "subset_train"
    _write_list(sub / "train_aug_labeled_1-2.txt", lines[:2])
    _write_list(sub / "train_aug_unlabeled_1-2.txt", lines[2:])
    _write_list(root / "config_new" / "val.txt", vlines)
    root.arrays = arrays
    return root


def _cfg(root, dataset="voc", **kw):
    if dataset == "voc":
        c = dict(train_source="subset_train_aug/train_aug_labeled_1-2.txt",
                 unsup_source="subset_train_aug/train_aug_unlabeled_1-2.txt",
                 eval_source="val.txt", num_classes=3)
    else:
        c = dict(train_source="config_new/subset_train/train_aug_labeled_1-2.txt",
                 unsup_source="config_new/subset_train/train_aug_unlabeled_1-2.txt",
                 eval_source="config_new/val.txt", num_classes=19)
    c.update(dataset=dataset, dataset_path=str(root), class_names=None, image_mean=MEAN,
             image_std=STD, image_height=16, image_width=16,
             train_scale_array=[0.5, 0.75, 1, 1.5], batch_size=2, num_workers=0, seed=3,
             max_samples=6, niters_per_epoch=3, cutmix_mask_prop_range=(0.25, 0.5),
             cutmix_boxmask_n_boxes=3, cutmix_boxmask_fixed_aspect_ratio=False,
             cutmix_boxmask_by_size=False, cutmix_boxmask_outside_bounds=False,
             cutmix_boxmask_no_invert=False)
    c.update(kw)
    return EasyDict(c)


def _tf(scales=(0.5, 0.75, 1.0, 1.5), crop=(16, 16)):
    return TrainTransform(crop, scales, MEAN, STD)


# ----------------------------------------------------------------------------- datasets

def test_voc_folder_rule():
    assert voc_folder_for_list("a/subset_train_aug/train_aug_labeled_1-4.txt") == "train_aug"
    assert voc_folder_for_list("train.txt") == "train_aug"
    assert voc_folder_for_list("test_id.txt") == "test"
    assert voc_folder_for_list("/x/val.txt") == "val"


def test_voc_train_and_unlabeled_samples(voc_root):
    lst = str(voc_root / "subset_train_aug" / "train_aug_labeled_1-2.txt")
    ds = VOCDataset(str(voc_root), lst, "train", num_classes=3, transform=_tf(), file_length=7)
    assert len(ds) == 7 and ds.n == 3
    for i in range(7):  # deterministic repeat i -> i % n
        s = ds[(i, 0)]
        assert s["fn"] == ds.names[i % 3] and s["n"] == 3
        assert s["data"].dtype == torch.float32 and s["data"].shape == (3, 16, 16)
        assert s["label"].dtype == torch.int64 and s["label"].shape == (16, 16)
        assert set(s["label"].unique().tolist()) <= {0, 1, 2, 255}
        assert torch.isfinite(s["data"]).all()
        assert s["data"].abs().max() < 3.0  # normalised 0..255 range
    # same (index, epoch) -> same sample; other epoch -> (almost surely) other augmentation
    assert torch.equal(ds[(4, 1)]["data"], ds[(4, 1)]["data"])
    assert not all(torch.equal(ds[(4, 1)]["data"], ds[(4, e)]["data"]) for e in range(2, 6))
    truncated = VOCDataset(str(voc_root), str(voc_root / "train_aug.txt"), "train",
                           num_classes=3, transform=_tf(), file_length=4)
    assert len(truncated) == 4 and truncated[(3, 0)]["fn"] == truncated.names[3]
    with pytest.raises(IndexError):
        truncated[4]
    lst_u = str(voc_root / "subset_train_aug" / "train_aug_unlabeled_1-2.txt")
    u = VOCDataset(str(voc_root), lst_u, "unlabeled", transform=_tf(), file_length=5)
    s = u[2]
    assert "label" not in s and s["data"].shape == (3, 16, 16)
    assert u[(2, 0)]["fn"] == "2007_000005"  # stored as .png only: the .jpg -> .png fallback


def test_voc_eval_items_and_crlf(voc_root):
    ds = VOCDataset(str(voc_root), str(voc_root / "val.txt"), "eval", num_classes=3)
    assert len(ds) == 3 and ds.folder == "val"
    for i in range(3):
        s = ds[i]
        img, lab = voc_root.arrays[s["fn"]]
        assert "\r" not in s["fn"]
        assert s["data"].dtype == np.uint8 and s["data"].shape == (H, W, 3)
        assert s["label"].dtype == np.uint8 and s["label"].shape == (H, W)
        np.testing.assert_array_equal(s["data"], img)  # RGB order kept
        np.testing.assert_array_equal(s["label"], lab)


def test_build_eval_dataset_from_config(voc_root, city_root):
    ds = build_eval_dataset(_cfg(voc_root))
    assert len(ds) == 3
    cds = build_eval_dataset(_cfg(city_root, "city"))
    assert cds[0]["fn"] == "frankfurt_000000_000294_gtFine"


def test_voc_pseudo_label_column(voc_root):
    pseudo = np.ones((H, W), np.uint8)
    _save_label(voc_root / "pseudo" / "2007_000001.png", pseudo)
    lst = voc_root / "subset_train_aug" / "train_pseudo.txt"
    _write_list(lst, ["2007_000001\t./pseudo/2007_000001.png", "2007_000002"], crlf=True)
    ds = VOCDataset(str(voc_root), str(lst), "eval", num_classes=3)
    assert ds[0]["fn"] == "2007_000001"
    np.testing.assert_array_equal(ds[0]["label"], pseudo)
    np.testing.assert_array_equal(ds[1]["label"], voc_root.arrays["2007_000002"][1])


def test_city_layout(city_root):
    lst = str(city_root / "config_new" / "subset_train" / "train_aug_labeled_1-2.txt")
    ds = CityscapesDataset(str(city_root), lst, "eval")
    s = ds[1]
    assert s["fn"] == "aachen_000001_000019_gtFine"
    img, lab = city_root.arrays[s["fn"]]
    np.testing.assert_array_equal(s["data"], img)
    np.testing.assert_array_equal(s["label"], lab)
    tr = CityscapesDataset(str(city_root), lst, "train", transform=_tf(), file_length=4)
    t = tr[(3, 0)]
    assert t["data"].shape == (3, 16, 16) and set(t["label"].unique().tolist()) <= {0, 5, 18, 255}
    # root given with a trailing slash and lists with a leading '/' still join properly
    ds2 = CityscapesDataset(str(city_root) + "/", lst, "eval")
    assert ds2.paths(0)[0] == os.path.join(str(city_root), "images", "train",
                                            "aachen_000000_000019.png")


def test_palette_png_read_as_indices(tmp_path):
    lab = np.array([[0, 1, 2], [3, 255, 20]], np.uint8)
    p = tmp_path / "p.png"
    _save_label(p, lab, palette=True)
    assert Image.open(p).mode == "P"
    np.testing.assert_array_equal(read_label(str(p)), lab)
    # the reference's cv2 grey read would give luminance instead
    assert not np.array_equal(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), lab)
    q = tmp_path / "l.png"
    _save_label(q, lab)
    np.testing.assert_array_equal(read_label(str(q)), lab)


# ----------------------------------------------------------------------------- errors

def _voc_ds(root, lst="val.txt", **kw):
    return VOCDataset(str(root), str(root / lst), "eval", num_classes=kw.pop("num_classes", 3),
                      **kw)


def test_error_missing_root_and_list(voc_root, tmp_path):
    bad = tmp_path / "nope"
    with pytest.raises(DataError, match=str(bad)):
        VOCDataset(str(bad), str(voc_root / "val.txt"), "eval")
    with pytest.raises(DataError, match="missing_list.txt"):
        VOCDataset(str(voc_root), str(voc_root / "missing_list.txt"), "eval")
    with pytest.raises(DataError, match=str(bad)):
        build_eval_dataset(_cfg(bad))
    with pytest.raises(DataError, match="nolist.txt"):
        build_eval_dataset(_cfg(voc_root, eval_source="nolist.txt"))


def test_error_empty_list(voc_root):
    _write_list(voc_root / "val.txt", ["", "  "], crlf=True)
    with pytest.raises(DataError, match=r"val\.txt is empty"):
        _voc_ds(voc_root)


def test_error_missing_image(voc_root):
    p = voc_root / "val" / "image" / "2008_000001.png"
    os.remove(p)
    ds = _voc_ds(voc_root)
    with pytest.raises(DataError) as e:
        ds[1]
    assert "2008_000001.jpg" in str(e.value) and "val.txt:2" in str(e.value)


def test_error_unreadable_image(voc_root):
    p = voc_root / "val" / "image" / "2008_000000.png"
    p.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=str(p)):
        _voc_ds(voc_root)[0]


def test_error_missing_and_rgb_label(voc_root):
    os.remove(voc_root / "val" / "label" / "2008_000002.png")
    ds = _voc_ds(voc_root)
    with pytest.raises(DataError, match="2008_000002.png"):
        ds[2]
    rgb = voc_root / "val" / "label" / "2008_000000.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(rgb)
    with pytest.raises(DataError, match="'RGB'") as e:
        ds[0]
    assert str(rgb) in str(e.value)


def test_error_label_values_out_of_range(voc_root):
    lab = np.zeros((H, W), np.uint8)
    lab[3, 4] = 7
    lab[0, 0] = 255  # ignore is allowed
    p = voc_root / "val" / "label" / "2008_000001.png"
    _save_label(p, lab)
    ds = _voc_ds(voc_root)
    with pytest.raises(DataError) as e:
        ds[1]
    assert "[7]" in str(e.value) and str(p) in str(e.value) and "num_classes=3" in str(e.value)
    assert _voc_ds(voc_root, num_classes=8)[1]["label"][3, 4] == 7


def test_error_size_mismatch(voc_root):
    p = voc_root / "val" / "label" / "2008_000002.png"
    _save_label(p, np.zeros((H + 1, W), np.uint8))
    with pytest.raises(DataError, match="size mismatch") as e:
        _voc_ds(voc_root)[2]
    assert str(p) in str(e.value) and "2008_000002.png" in str(e.value)


def test_error_city_entry_without_label(city_root):
    lst = city_root / "config_new" / "one_col.txt"
    _write_list(lst, ["/images/train/aachen_000000_000019.png"])
    with pytest.raises(DataError, match="one_col.txt:1"):
        CityscapesDataset(str(city_root), str(lst), "train", transform=_tf())
    # unlabelled mode does not need the label column
    u = CityscapesDataset(str(city_root), str(lst), "unlabeled", transform=_tf())
    assert u[0]["fn"] == "aachen_000000_000019"


def test_error_batch_larger_than_labelled_set(voc_root):
    with pytest.raises(DataError, match=r"batch_size=4 .*3 entries.*train_aug_labeled_1-2.txt"):
        TrainLoaders(_cfg(voc_root, batch_size=4))


def test_error_batch_of_one_per_process(voc_root):
    with pytest.raises(DataError, match="batch_size=1"):
        TrainLoaders(_cfg(voc_root, batch_size=1))
    with pytest.raises(DataError, match="world_size=2"):
        TrainLoaders(_cfg(voc_root, batch_size=1), rank=0, world_size=2)
    # under DDP SyncBatchNorm sees every process's image: one each is fine for a global 2
    assert TrainLoaders(_cfg(voc_root, batch_size=2), rank=0, world_size=2).batch_size == 1


# ----------------------------------------------------------------------------- transforms

def test_transform_padding_and_normalisation():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    lab = np.full((H, W), 1, np.uint8)
    # scale 0.5: 24x32 -> 12x16; crop 16x20 pads 4 rows (2 top, 2 bottom), 4 cols (2 + 2)
    tf = TrainTransform((16, 20), [0.5], MEAN, STD)
    data, label = tf(img, lab, np.random.default_rng(1))
    assert data.dtype == np.float32 and data.shape == (3, 16, 20)
    assert label.dtype == np.int64 and label.shape == (16, 20)
    inside = np.zeros((16, 20), bool)
    inside[2:14, 2:18] = True
    assert (label[inside] == 1).all() and (label[~inside] == 255).all()
    assert (data[:, ~inside] == 0).all()
    # odd padding: top/left floor(pad/2), bottom/right ceil
    data, label = TrainTransform((15, 17), [0.5], MEAN, STD)(img, lab, np.random.default_rng(2))
    assert (label[1:13, 0:16] == 1).all() and (label[0] == 255).all() and (label[13:] == 255).all()
    assert (label[:, 16] == 255).all()
    # scale 1 and full-size crop: exact normalisation, possibly mirrored
    data, label = TrainTransform((H, W), [1.0], MEAN, STD)(img, lab, np.random.default_rng(3))
    ref = ((img.astype(np.float64) / 255 - MEAN) / STD).transpose(2, 0, 1)
    assert (np.allclose(data, ref, atol=1e-5) or np.allclose(data, ref[:, :, ::-1], atol=1e-5))


def test_transform_mirror_both_ways_and_scales():
    img = np.zeros((H, W, 3), np.uint8)
    img[:, :W // 2] = 255
    lab = np.zeros((H, W), np.uint8)
    lab[:, :W // 2] = 1
    tf = TrainTransform((H, W), [1.0], MEAN, STD)
    flips = set()
    for s in range(20):
        d, l = tf(img, lab, np.random.default_rng(s))
        flips.add(int(l[0, 0]))
        assert (l[:, 0] == l[0, 0]).all() and l[0, 0] != l[0, -1]
        assert (d[0][l == 1] > 1).all()  # the image flips together with the label
    assert flips == {0, 1}
    sizes = set()
    tf = TrainTransform((200, 200), [0.5, 2.0], MEAN, STD)
    for s in range(20):
        _, l = tf(img, lab, np.random.default_rng(s))
        sizes.add(int((l != 255).sum()))
    assert sizes == {12 * 16, 48 * 64}


def test_crop_start_has_no_off_by_one():
    rng = np.random.default_rng(0)
    starts = {crop_start(20, 16, rng) for _ in range(400)}
    assert starts == {0, 1, 2, 3, 4}
    assert crop_start(16, 16, rng) == 0 and crop_start(10, 16, rng) == 0


# ----------------------------------------------------------------------------- loaders

def _collect(loaders, epoch):
    return [(lab["data"].clone(), lab["label"].clone(), list(lab["fn"]), u0["data"].clone(),
             u0["mask"].clone(), list(u0["fn"]), u1["data"].clone(), list(u1["fn"]))
            for lab, u0, u1 in loaders.epoch(epoch)]


def _same(a, b):
    return len(a) == len(b) and all(
        all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(p, q))
        for p, q in zip(a, b))


@pytest.mark.parametrize("layout", ["voc", "city"])
def test_train_loaders_batches(layout, voc_root, city_root):
    root = voc_root if layout == "voc" else city_root
    C = _cfg(root, layout, max_samples=6 if layout == "voc" else 4,
             niters_per_epoch=3 if layout == "voc" else 2)
    L = TrainLoaders(C, rank=0, world_size=1)
    assert len(L) == C.niters_per_epoch and len(L.datasets[0]) == C.max_samples
    assert isinstance(L.loaders[0].sampler, torch.utils.data.DistributedSampler)
    batches = list(L.epoch(0))
    assert len(batches) == C.niters_per_epoch
    for lab, u0, u1 in batches:
        assert lab["data"].shape == (2, 3, 16, 16) and lab["data"].dtype == torch.float32
        assert lab["label"].shape == (2, 16, 16) and lab["label"].dtype == torch.int64
        assert "label" not in u0 and "label" not in u1 and "_seed" not in lab
        assert u0["mask"].shape == (2, 1, 16, 16) and u0["mask"].dtype == torch.float32
        assert set(u0["mask"].unique().tolist()) <= {0.0, 1.0}
        cov = u0["mask"].mean(dim=(1, 2, 3))
        assert ((cov > 0) & (cov < 0.7)).all()
        assert u1["data"].shape == (2, 3, 16, 16) and "mask" not in u1
    labs = torch.cat([b[0]["label"] for b in batches])
    vals = set(labs.unique().tolist())
    assert 255 in vals and vals <= ({0, 1, 2, 255} if layout == "voc" else {0, 5, 18, 255})


def test_train_loaders_reproducible_and_shuffled(voc_root):
    C = _cfg(voc_root, max_samples=12, niters_per_epoch=6)
    a = _collect(TrainLoaders(C), 0)
    b = _collect(TrainLoaders(C), 0)
    assert _same(a, b)
    c = _collect(TrainLoaders(C), 1)
    assert not _same(a, c)  # a new epoch: new order and augmentation
    d = _collect(TrainLoaders(_cfg(voc_root, max_samples=12, niters_per_epoch=6, seed=4)), 0)
    assert not _same(a, d)
    # U0 and U1 shuffle independently
    assert [x[5] for x in a] != [x[7] for x in a]
    # each epoch visits every dataset index once: every labelled file twice (12 / 3 files)
    fns = [f for x in a for f in x[2]]
    assert sorted(fns) == sorted(L for L in ["2007_000000", "2007_000001", "2007_000002"] * 4)


def test_train_loaders_same_batches_with_workers(voc_root):
    C = _cfg(voc_root, max_samples=6, niters_per_epoch=3)
    a = _collect(TrainLoaders(C, num_workers=0), 2)
    b = _collect(TrainLoaders(C, num_workers=2), 2)
    assert _same(a, b)


def test_train_loaders_more_iterations_than_one_pass(voc_root):
    L = TrainLoaders(_cfg(voc_root, max_samples=4, niters_per_epoch=5))
    assert L.batches_per_pass == 2
    assert len(list(L.epoch(0))) == 5


def test_train_loaders_ranks_disjoint(voc_root):
    C = _cfg(voc_root, batch_size=4, max_samples=8, niters_per_epoch=1,
             train_source="train_aug.txt")
    idx = []
    for r in range(2):
        L = TrainLoaders(C, rank=r, world_size=2)
        assert L.batch_size == 2
        L.samplers[0].set_epoch(0)
        idx.append({i for i, _ in L.samplers[0]})
    assert not (idx[0] & idx[1]) and len(idx[0] | idx[1]) == 8


# ----------------------------------------------------------------------------- classes

def test_palettes_and_names():
    pal = voc_palette(21)
    assert pal.dtype == np.uint8 and pal.shape == (21, 3)
    assert pal[:8].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0],
                                [0, 0, 128], [128, 0, 128], [0, 128, 128], [128, 128, 128]]
    assert pal[8].tolist() == [64, 0, 0] and pal[15].tolist() == [192, 128, 128]
    assert pal[16].tolist() == [0, 64, 0] and pal[20].tolist() == [0, 64, 128]
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[20] == "tv/monitor"
    assert len(CITYSCAPES_CLASSES) == 19 and CITYSCAPES_PALETTE.shape == (19, 3)
    assert CITYSCAPES_PALETTE[0].tolist() == [128, 64, 128]
    assert CITYSCAPES_PALETTE[18].tolist() == [119, 11, 32]
    assert default_class_names("city", 19) == CITYSCAPES_CLASSES
    assert default_class_names("voc", 3) == ["class_0", "class_1", "class_2"]
    with pytest.raises(ValueError, match="num_classes=3"):
        default_class_names("voc", 3, ["a"])
