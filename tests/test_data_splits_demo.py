"""The split tool and the procedural demo dataset."""
import numpy as np
import pytest
import torch

from helpers import tree_digest
from furnace.data import DataError, TrainTransform, VOCDataset
from furnace.data.demo import DEMO_CLASSES, ensure_demo_data, generate, is_complete
from furnace.data.splits import main as splits_main
from furnace.data.splits import make_splits, write_splits


@pytest.mark.parametrize("n,expected", [(10582, {16: 662, 8: 1323, 4: 2646, 2: 5291}),
                                        (2975, {16: 186, 8: 372, 4: 744, 2: 1488})])
def test_split_counts_like_cps(n, expected):
    lines = [f"id_{i:05d}" for i in range(n)]
    splits = make_splits(lines, [2, 4, 8, 16], seed=0)
    for r, k in expected.items():
        lab, unlab = splits[r]
        assert len(lab) == k and len(unlab) == n - k
        assert not set(lab) & set(unlab) and set(lab) | set(unlab) == set(lines)
        assert lab == sorted(lab) and unlab == sorted(unlab)  # keeps the full list's order
    assert set(splits[16][0]) <= set(splits[8][0]) <= set(splits[4][0]) <= set(splits[2][0])
    assert make_splits(lines, [4], seed=0)[4] == splits[4]
    assert make_splits(lines, [4], seed=1)[4] != splits[4]


def test_split_tool_cli(tmp_path, capsys):
    full = tmp_path / "train_aug.txt"
    lines = [f"/images/train/c_{i}.png\t/segmentation/train/c_{i}_gtFine.png" for i in range(37)]
    full.write_bytes("".join(l + "\r\n" for l in lines).encode())
    out = tmp_path / "subset"
    assert splits_main(["--full", str(full), "--out", str(out), "--ratios", "2", "8",
                        "--seed", "3", "--layout", "city"]) == 0
    assert "1/8: 5 labelled" in capsys.readouterr().out
    for r in (2, 8):
        lab = (out / f"train_aug_labeled_1-{r}.txt").read_text().splitlines()
        unlab = (out / f"train_aug_unlabeled_1-{r}.txt").read_text().splitlines()
        assert len(lab) == -(-37 // r)
        assert sorted(lab + unlab) == sorted(lines) and not set(lab) & set(unlab)
    # a two-column list is not a VOC id list
    assert splits_main(["--full", str(full), "--out", str(out), "--layout", "voc"]) == 2
    assert "VOC lists hold one id" in capsys.readouterr().err


def test_split_errors(tmp_path):
    with pytest.raises(DataError, match="duplicate"):
        make_splits(["a", "b", "a"], [2])
    with pytest.raises(DataError, match="empty"):
        make_splits([], [2])
    with pytest.raises(DataError, match="ratio"):
        make_splits(["a"], [0])
    with pytest.raises(DataError, match="missing.txt"):
        write_splits(str(tmp_path / "missing.txt"), str(tmp_path / "o"))


def test_demo_deterministic_and_readable(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    info = generate(a, n_train=20, n_val=5, seed=0)
    out = capsys.readouterr().out
    assert "class pixel frequencies (train)" in out and all(k in out for k in DEMO_CLASSES)
    assert len(info["train_freq"]) == len(DEMO_CLASSES)
    assert abs(sum(info["train_freq"]) - 1) < 1e-9
    assert min(info["train_freq"]) > 0  # every class occurs
    generate(b, n_train=20, n_val=5, seed=0, verbose=False)
    generate(c, n_train=20, n_val=5, seed=1, verbose=False)
    assert tree_digest(a) == tree_digest(b) and tree_digest(a) != tree_digest(c)
    # the VOC dataset class reads the layout
    ev = VOCDataset(str(a), str(a / "val.txt"), "eval", num_classes=len(DEMO_CLASSES))
    assert len(ev) == 5
    s = ev[0]
    assert s["data"].shape == (128, 128, 3) and s["data"].dtype == np.uint8
    assert s["label"].shape == (128, 128) and s["label"].max() < len(DEMO_CLASSES)
    lab = (a / "subset_train_aug" / "train_aug_labeled_1-4.txt").read_text().splitlines()
    unlab = (a / "subset_train_aug" / "train_aug_unlabeled_1-4.txt").read_text().splitlines()
    full = (a / "train_aug.txt").read_text().splitlines()
    assert len(lab) == 5 and sorted(lab + unlab) == sorted(full)
    tr = VOCDataset(str(a), str(a / "subset_train_aug" / "train_aug_labeled_1-4.txt"), "train",
                    num_classes=len(DEMO_CLASSES),
                    transform=TrainTransform((64, 64), [0.5, 1.0]), file_length=15)
    t = tr[(14, 0)]
    assert t["data"].shape == (3, 64, 64) and t["label"].dtype == torch.int64


def test_ensure_demo_data_skips_complete(tmp_path):
    root = tmp_path / "demo"
    ensure_demo_data(root, n_train=4, n_val=2, verbose=False)
    assert is_complete(root, n_train=4, n_val=2)
    stamp = root / "demo_stamp.json"
    t0 = stamp.stat().st_mtime_ns
    ensure_demo_data(root, n_train=4, n_val=2, verbose=False)
    assert stamp.stat().st_mtime_ns == t0  # untouched
    ensure_demo_data(root, n_train=5, n_val=2, verbose=False)  # other parameters: regenerate
    assert is_complete(root, n_train=5, n_val=2)
    assert len((root / "train_aug.txt").read_text().splitlines()) == 5
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match=str(foreign)):
        generate(foreign, n_train=4, n_val=2, verbose=False)


def test_demo_objects_saturated_and_hue_bands_interleaved():
    """Saturation separates objects from the background; an object's hue lies in one of its
    class's HUE_BANDS_PER_CLASS bands (band j belongs to class 1 + j mod 5) for HUE_HINT of
    the objects, and every band of a class occurs."""
    import cv2
    import numpy as np
    from furnace.data import demo

    k = demo.DEMO_NUM_CLASSES - 1
    n_bands = k * demo.HUE_BANDS_PER_CLASS
    sat_obj, sat_bg, in_band, n_obj = [], [], 0, 0
    seen = {c: set() for c in range(1, k + 1)}
    for i in range(60):
        img, lab = demo.draw_sample(np.random.default_rng([7, i]), 96)
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
        sat_bg.append(hsv[..., 1][lab == 0].mean())
        for c in range(1, k + 1):
            m = lab == c
            if m.sum() < 30:
                continue
            sat_obj.append(hsv[..., 1][m].mean())
            band = int(np.median(hsv[..., 0][m]) * n_bands / 180) % n_bands
            n_obj += 1
            if band % k == c - 1:
                in_band += 1
                seen[c].add(band)
    assert np.mean(sat_obj) > 150 > 60 > np.mean(sat_bg)
    share = in_band / n_obj
    # HUE_HINT plus the random hues that land in one of the class's bands by chance
    expected = demo.HUE_HINT + (1 - demo.HUE_HINT) / k
    assert n_obj > 100 and abs(share - expected) < 0.1, (share, expected)
    assert all(len(b) == demo.HUE_BANDS_PER_CLASS for b in seen.values()), seen


def test_demo_data_without_the_current_splits_is_regenerated(tmp_path):
    """Data made before the 1/32 and 1/64 splits existed (stamp without them) is remade."""
    import json
    root = tmp_path / "demo"
    ensure_demo_data(root, n_train=8, n_val=2, verbose=False)
    sub = root / "subset_train_aug"
    assert [len((sub / f"train_aug_labeled_1-{r}.txt").read_text().splitlines())
            for r in (32, 64)] == [1, 1]
    stamp = root / "demo_stamp.json"
    old = json.loads(stamp.read_text())
    del old["ratios"]
    stamp.write_text(json.dumps(old))
    (sub / "train_aug_labeled_1-64.txt").unlink()
    assert not is_complete(root, n_train=8, n_val=2)
    ensure_demo_data(root, n_train=8, n_val=2, verbose=False)
    assert (sub / "train_aug_labeled_1-64.txt").is_file()
