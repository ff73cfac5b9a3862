"""U2PL data options: its split-list forms, the list-pair tool, the two-interval random scale
and the crop's label padding (spec U2PL.md 5.1, 5.3, 8 items 15, 16, 25)."""
import re
from pathlib import Path

import numpy as np
import pytest

from furnace.config import ConfigError, Config, base_config, finalize, set_value
from furnace.data import (CityscapesDataset, DataError, TrainTransform, VOCDataset,
                          build_train_dataset, train_transform_from_config,
                          voc_folder_for_list)
from furnace.data.transforms import draw_scale, random_scale
from furnace.data.u2pl_splits import main as u2pl_main, u2pl_pair, write_u2pl_pairs
from tests.helpers import make_city, make_voc

REPO = Path(__file__).resolve().parents[1]
TF = TrainTransform((16, 16))


def _cfg(root, **kw):
    C = Config(dataset="voc", dataset_path=str(root), num_classes=5, image_height=16,
               image_width=16, seed=0, max_samples=None)
    C.update(kw)
    return C


# ----------------------------------------------------------------------------- VOC lists

def test_voc_u2pl_labeled_txt_needs_voc_train_folder(tmp_path):
    root = make_voc(tmp_path / "voc", n_train=6, n_val=2)
    lst = root / "splits" / "pascal" / "3" / "labeled.txt"
    lst.parent.mkdir(parents=True)
    lst.write_text("t0001\nt0004\nt0002")          # U2PL files may lack the final newline
    with pytest.raises(DataError, match="voc_train_folder=train_aug"):
        VOCDataset(str(root), str(lst), mode="train")
    ds = build_train_dataset(_cfg(root, train_source=str(lst), voc_train_folder="train_aug"))
    ref = VOCDataset(str(root), str(root / "train_aug.txt"), mode="eval")
    assert ds.names == ["t0001", "t0004", "t0002"] and ds.folder == "train_aug"
    img, lab = ds.load(1)
    rimg, rlab = ref.load(4)
    assert np.array_equal(img, rimg) and np.array_equal(lab, rlab)
    # default (None) keeps today's choice by list name
    assert build_train_dataset(_cfg(root, train_source="train_aug.txt")).folder == "train_aug"
    with pytest.raises(DataError, match="set by voc_train_folder"):
        build_train_dataset(_cfg(root, train_source=str(lst), voc_train_folder="nowhere"))


# ----------------------------------------------------------------------------- Cityscapes lists

def test_city_u2pl_lines_map_to_cps_paths(tmp_path):
    root = make_city(tmp_path / "city", n_train=4, n_val=1)
    names = [f"city_train_{i:06d}_000019" for i in (2, 0)]
    u2pl = tmp_path / "labeled.txt"
    u2pl.write_text("\n".join(f"leftImg8bit/train/city/{n}_leftImg8bit.png" for n in names))
    ds = CityscapesDataset(str(root), str(u2pl), mode="eval")
    ref = CityscapesDataset(str(root), str(root / "config_new" / "train.txt"), mode="eval")
    assert ds.names == [ref.names[2], ref.names[0]] == [f"{n}_gtFine" for n in names]
    assert ds.paths(0) == ref.paths(2) and ds.paths(1) == ref.paths(0)
    for a, b in zip(ds.load(0), ref.load(2)):
        assert np.array_equal(a, b)
    # unlabelled mode reads the image only; CPS and U2PL lines may be mixed
    mixed = tmp_path / "unlabeled.txt"
    mixed.write_text(f"leftImg8bit/train/city/{names[0]}_leftImg8bit.png\n"
                     f"/images/train/{names[1]}.png\n")
    ds = CityscapesDataset(str(root), str(mixed), mode="unlabeled", transform=TF)
    assert ds[0]["data"].shape == (3, 16, 16) and "label" not in ds[0] and len(ds) == 2


@pytest.mark.parametrize("line", ["leftImg8bit/train/x_leftImg8bit.png",
                                  "leftImg8bit/train/a/b/c_leftImg8bit.png",
                                  "leftImg8bit/train/aachen/aachen_000140_000019.png"])
def test_city_malformed_u2pl_line_names_file_and_line(tmp_path, line):
    root = make_city(tmp_path / "city", n_train=2, n_val=1)
    bad = tmp_path / "bad.txt"
    bad.write_text(f"leftImg8bit/train/city/city_train_000000_000019_leftImg8bit.png\n{line}\n")
    with pytest.raises(DataError) as e:
        CityscapesDataset(str(root), str(bad), mode="eval")
    assert f"{bad}:2" in str(e.value) and "leftImg8bit/<split>/<city>" in str(e.value)


# ----------------------------------------------------------------------------- list-pair tool

def test_u2pl_pair_voc_keeps_full_order(tmp_path, capsys):
    full = tmp_path / "train_aug.txt"
    ids = [f"2007_{i:06d}" for i in range(10)]
    full.write_text("\n".join(ids) + "\n")
    lab = tmp_path / "4" / "labeled.txt"
    lab.parent.mkdir()
    lab.write_text("2007_000007\n2007_000001\n2007_000004\n2007_000009")
    out = tmp_path / "out"
    assert u2pl_main(["--full", str(full), "--labeled", str(lab), "--out", str(out)]) == 0
    assert "4 labelled" in capsys.readouterr().out
    got_l = (out / "train_aug_labeled_u2pl-4.txt").read_text().splitlines()
    got_u = (out / "train_aug_unlabeled_u2pl-4.txt").read_text().splitlines()
    assert got_l == ["2007_000001", "2007_000004", "2007_000007", "2007_000009"]
    assert got_u == [i for i in ids if i not in got_l]
    # the pair loads with today's folder rule (the names contain 'train')
    assert voc_folder_for_list(str(out / "train_aug_unlabeled_u2pl-4.txt")) == "train_aug"


def test_u2pl_pair_city_from_u2pl_lines_gives_cps_lines(tmp_path):
    root = make_city(tmp_path / "city", n_train=5, n_val=1)
    full = root / "config_new" / "train.txt"
    full_lines = full.read_text().splitlines()
    lab = tmp_path / "labeled.txt"
    lab.write_text("leftImg8bit/train/city/city_train_000003_000019_leftImg8bit.png\n"
                   "leftImg8bit/train/city/city_train_000001_000019_leftImg8bit.png\n")
    (pl, pu), = write_u2pl_pairs([str(lab)], str(full), str(tmp_path / "o")).values()
    assert Path(pl).read_text().splitlines() == [full_lines[1], full_lines[3]]
    assert Path(pu).read_text().splitlines() == [full_lines[i] for i in (0, 2, 4)]
    assert len(CityscapesDataset(str(root), pu, mode="unlabeled", transform=TF)) == 3


def test_u2pl_pair_errors(tmp_path, capsys):
    full = [(1, "a"), (2, "b"), (3, "c")]
    with pytest.raises(DataError, match=r"lab.txt:2 sample 'z' is not in the full list"):
        u2pl_pair([(1, "a"), (2, "z")], full, "voc", "lab.txt", "full.txt")
    with pytest.raises(DataError, match=r"lab.txt:3 repeats sample 'a'"):
        u2pl_pair([(1, "a"), (2, "b"), (3, "a")], full, "voc", "lab.txt", "full.txt")
    with pytest.raises(DataError, match=r"full.txt:2 repeats"):
        u2pl_pair([(1, "a")], [(1, "a"), (2, "a")], "voc", "lab.txt", "full.txt")
    f = tmp_path / "full.txt"
    f.write_text("a\nb\n")
    assert u2pl_main(["--full", str(f), "--labeled", str(tmp_path / "no.txt"),
                      "--out", str(tmp_path / "o")]) == 2
    assert "no.txt" in capsys.readouterr().err


def test_committed_u2pl_labelled_lists():
    voc = {92: "classic", 183: "classic", 366: "classic", 732: "classic", 1464: "classic",
           662: "blender", 1323: "blender", 2646: "blender", 5291: "blender"}
    fine = set((REPO / "exp_voc/splits_u2pl/1464/labeled.txt").read_text().split())
    for n in voc:
        ids = (REPO / f"exp_voc/splits_u2pl/{n}/labeled.txt").read_text().split()
        assert len(ids) == len(set(ids)) == n
        assert all(re.fullmatch(r"\d{4}_\d{6}", i) for i in ids)
        if n <= 1464:       # classic and the two small blender lists lie inside the 1464
            assert set(ids) <= fine
        else:
            assert fine <= set(ids)
    pat = re.compile(r"leftImg8bit/train/([a-z_]+)/\1_\d{6}_\d{6}_leftImg8bit\.png")
    for n in (186, 372, 744, 1488):
        lines = (REPO / f"exp_city/splits_u2pl/{n}/labeled.txt").read_text().split()
        assert len(lines) == len(set(lines)) == n
        assert all(pat.fullmatch(l) for l in lines)


# ----------------------------------------------------------------------------- augmentation

def test_u2pl_scale_is_a_two_interval_mixture():
    rng = np.random.default_rng(0)
    s = np.array([draw_scale([0.5, 0.75, 1, 1.5, 2.0], rng, "u2pl") for _ in range(20000)])
    assert s.min() >= 0.5 and s.max() < 2.0
    low = s < 1.0
    assert 0.48 < low.mean() < 0.52                  # not U[0.5, 2] (that gives 1/3)
    # each interval uniform: its quartiles
    np.testing.assert_allclose(np.quantile(s[low], [0.25, 0.5, 0.75]), [0.625, 0.75, 0.875],
                               atol=0.01)
    np.testing.assert_allclose(np.quantile(s[~low], [0.25, 0.5, 0.75]), [1.25, 1.5, 1.75],
                               atol=0.02)
    # sizes are truncated: int(h * s)
    img = np.zeros((37, 53, 3), np.uint8)
    out, _, f = random_scale(img, None, [0.5, 2.0], np.random.default_rng(5), "u2pl")
    assert out.shape[:2] == (int(37 * f), int(53 * f))


def test_default_scale_rule_unchanged():
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    scales = [0.5, 0.75, 1, 1.5, 1.75, 2.0]
    for _ in range(50):
        assert draw_scale(scales, a) == float(scales[int(b.integers(len(scales)))])


@pytest.mark.parametrize("pad", [255, 0])
def test_crop_label_pad_value_and_split(pad):
    img = np.full((5, 8, 3), 200, np.uint8)
    lab = np.full((5, 8), 1, np.uint8)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    kw = {} if pad == 255 else {"label_pad": pad}
    data, label = TrainTransform((10, 11), [1.0], mean, std, **kw)(
        img, lab, np.random.default_rng(0))
    # padding 5 rows / 3 columns: floor half top/left, the rest bottom/right (U2PL's Crop)
    inside = np.zeros((10, 11), bool)
    inside[2:7, 1:9] = True
    assert np.all(label[inside] == 1) and np.all(label[~inside] == pad)
    assert np.all(data[:, ~inside] == 0.0)          # the image pads with 0 after normalising
    assert np.allclose(data[:, inside], (200 / 255 - 0.5) / 0.25)


def test_transform_from_config_and_validation(tmp_path):
    C = base_config()
    assert (C.train_scale_mode, C.train_label_pad, C.voc_train_folder) == ("choice", 255, None)
    tf = train_transform_from_config(C)
    assert (tf.scale_mode, tf.label_pad) == ("choice", 255)
    set_value(C, "train_scale_mode", "u2pl")
    set_value(C, "train_label_pad", "0")
    set_value(C, "voc_train_folder", "train_aug")
    tf = train_transform_from_config(C)
    assert (tf.scale_mode, tf.label_pad, C.voc_train_folder) == ("u2pl", 0, "train_aug")
    set_value(C, "voc_train_folder", "none")
    assert C.voc_train_folder is None
    with pytest.raises(ConfigError, match=r"'train_scale_mode' expects one of choice, u2pl"):
        set_value(C, "train_scale_mode", "uniform")
    C.dataset_path = str(tmp_path)
    bad = dict(C, train_label_pad=256)
    with pytest.raises(ConfigError, match=r"'train_label_pad' must be an integer in 0\.\.255"):
        finalize(Config(bad), tmp_path)
    with pytest.raises(ConfigError, match=r"train_scale_array.*u2pl"):
        finalize(Config(dict(C, train_scale_array=[1.25, 1.5])), tmp_path)
    with pytest.raises(ConfigError, match=r"'train_scale_mode' must be one of"):
        finalize(Config(dict(C, train_scale_mode="x")), tmp_path)
    with pytest.raises(ConfigError, match="voc_train_folder"):
        finalize(Config(dict(C, voc_train_folder="")), tmp_path)
    with pytest.raises(ValueError, match="enclose 1"):
        TrainTransform((4, 4), [1.5, 2.0], scale_mode="u2pl")
