"""Issue 16: nothing lost, nothing executed. Bad input and faults give one clear line (or a
warning), never lost data, silent misbehaviour or a traceback. Each test fails on the code
before the fix."""
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import ROOT
from helpers import make_city, make_voc, tree_digest
from furnace import config as config_mod
from furnace.config import ConfigError, load_config
from furnace.data import DataError, TrainLoaders, read_image
from furnace.data.datasets import CityscapesDataset, VOCDataset
from furnace.data.demo import main as demo_main, prepare_from_config
from furnace.data.splits import main as splits_main

TINY = ["backbone=resnet18", "head_channels=16", "pretrained_model=none", "image_height=32",
        "image_width=32",
        "batch_size=2", "nepochs=1", "niters_per_epoch=1", "num_workers=0", "snapshot_iter=1",
        "snapshot_from=-1", "train_scale_array=[1.0]", "aleatoric.samples=2",
        "labeled_ratio=2"]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), n_train=8, n_val=2, num_classes=21)


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _train_main(exp, argv):
    from furnace.engine.cli import train_main
    with pytest.raises(SystemExit) as e:
        train_main(str(exp), method="dueb", preset="full", argv=argv)
    assert e.value.code == 2


# ------------------------------------------------------------------------ 1. no data loss

def test_demo_generator_never_replaces_a_users_voc_folder(tmp_path, capsys):
    data = make_voc(tmp_path / "pascal_voc", n_train=4, n_val=2)  # VOC-shaped, no stamp
    before = tree_digest(data)
    assert demo_main(["--root", str(data), "--n-train", "4", "--n-val", "2", "--force"]) == 2
    line = _one_error_line(capsys)
    assert str(data) in line and "demo_stamp.json" in line and "refusing" in line
    assert tree_digest(data) == before
    # the hook of an experiment copied from exp_demo that points at real data
    C = load_config(ROOT / "exp_demo", [f"dataset_path={data}"], env={})
    assert C.generate_demo_data
    with pytest.raises(DataError, match="did not write"):
        prepare_from_config(C)
    assert tree_digest(data) == before
    # an empty folder, and one the generator made itself, may be (re)filled
    empty = tmp_path / "empty"
    empty.mkdir()
    assert demo_main(["--root", str(empty), "--n-train", "4", "--n-val", "2"]) == 0
    assert demo_main(["--root", str(empty), "--n-train", "5", "--n-val", "2"]) == 0
    assert len((empty / "train_aug.txt").read_text().splitlines()) == 5
    a_file = tmp_path / "data.txt"
    a_file.write_text("keep")
    assert demo_main(["--root", str(a_file), "--n-train", "4", "--n-val", "2"]) == 2
    assert "is not a folder" in _one_error_line(capsys) and a_file.read_text() == "keep"


def test_split_tool_refuses_to_overwrite_its_input(tmp_path, capsys):
    out = tmp_path / "subset"
    out.mkdir()
    full = out / "train_aug_labeled_1-2.txt"
    full.write_text("".join(f"id{i}\n" for i in range(10)))
    before = full.read_bytes()
    assert splits_main(["--full", str(full), "--out", str(out), "--ratios", "2"]) == 2
    line = _one_error_line(capsys)
    assert "refusing to overwrite the input" in line and str(full) in line
    assert full.read_bytes() == before
    # another ratio does not touch the input: allowed
    assert splits_main(["--full", str(full), "--out", str(out), "--ratios", "4"]) == 0
    assert full.read_bytes() == before


def test_split_tool_out_naming_a_file(tmp_path, capsys):
    full = tmp_path / "train_aug.txt"
    full.write_text("a\nb\nc\n")
    target = tmp_path / "notes.txt"
    target.write_text("keep")
    assert splits_main(["--full", str(full), "--out", str(target)]) == 2
    assert "is a file" in _one_error_line(capsys)
    assert target.read_text() == "keep"


_HOLD = ("import sys, time; sys.path.insert(0, sys.argv[1]); "
         "from furnace.engine.runlock import SnapshotLock; "
         "l = SnapshotLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)")


def test_second_training_on_a_snapshot_folder_is_refused(voc_root, tmp_path, capsys):
    log = tmp_path / "log"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(ROOT), str(log / "snapshot")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _train_main(ROOT / "exp_voc", ["-d", "cpu", "--set", f"dataset_path={voc_root}",
                                       f"log_dir={log}", *TINY])
        line = _one_error_line(capsys)
        assert f"pid {holder.pid}" in line and "in use" in line and "log_dir" in line
        assert not list((log / "snapshot").glob("*.pth"))
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process; a lock of this process is released and removed
    from furnace.engine.runlock import LOCK_NAME, RunError, SnapshotLock
    with SnapshotLock(log / "snapshot"):
        with pytest.raises(RunError, match=f"pid {os.getpid()}"):
            SnapshotLock(log / "snapshot").acquire()
    assert not (log / "snapshot" / LOCK_NAME).exists()


def test_log_names_differ_between_runs_started_in_the_same_second(monkeypatch):
    monkeypatch.setattr(config_mod.time, "strftime", lambda *a: "2026_01_01_00_00_00")
    names = []
    for pid in (1000, 1001):
        monkeypatch.setattr(config_mod.os, "getpid", lambda pid=pid: pid)
        C = load_config(ROOT / "exp_demo", [], env={})
        names.append((C.train_log_file, C.val_log_file))
    assert names[0][0] != names[1][0] and names[0][1] != names[1][1]
    assert Path(names[0][0]).name.startswith("train_2026_01_01_00_00_00")


# ------------------------------------------------------------------------ 3. fail at start

@pytest.mark.parametrize("item, key", [
    ("snapshot_iter=0", "snapshot_iter"), ("debug=-1", "debug"), ("lr=nan", "lr"),
    ("lr=0", "lr"), ("lr=-0.01", "lr"), ("eval_scale_array=0", "eval_scale_array"),
    ("eval_scale_array=[]", "eval_scale_array"), ("train_scale_array=[1,-2]",
                                                  "train_scale_array"),
    ("dataset_path=", "dataset_path"), ("momentum=inf", "momentum"),
    ("num_workers=-1", "num_workers"), ("snapshot_keep=0", "snapshot_keep"),
    ("aleatoric.samples=0", "dueb.aleatoric.samples")])
def test_bad_values_fail_when_the_config_is_finalised(item, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(ROOT / "exp_demo", [item], env={})


def test_debug_minus_one_fails_before_training(voc_root, tmp_path, capsys):
    _train_main(ROOT / "exp_voc", ["-d", "cpu", "--debug", "-1", "--set",
                                   f"dataset_path={voc_root}", f"log_dir={tmp_path}", *TINY])
    assert "'debug'" in _one_error_line(capsys)
    assert not (tmp_path / "snapshot").exists()


def test_unwritable_snapshot_folder_found_at_start(voc_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    t0 = time.time()
    _train_main(ROOT / "exp_voc", ["-d", "cpu", "--set", f"dataset_path={voc_root}",
                                   f"log_dir={tmp_path / 'log'}",
                                   f"snapshot_dir={blocker / 'snap'}", *TINY])
    line = _one_error_line(capsys)
    assert "snapshot_dir" in line and str(blocker / "snap") in line
    assert not list((tmp_path / "log").glob("train_*.log"))  # nothing trained
    assert time.time() - t0 < 60


def test_low_disk_space_is_a_warning(tmp_path, caplog):
    from furnace.engine.runlock import checkpoint_bytes, probe_folder
    assert checkpoint_bytes({"backbone": "resnet50"}) > 500e6
    with caplog.at_level(logging.WARNING, logger="furnace.engine"):
        assert probe_folder(tmp_path / "s", "snapshot_dir", need_bytes=0) is None
        msg = probe_folder(tmp_path / "s", "snapshot_dir", need_bytes=10 ** 18)
    assert "less than about two checkpoints" in msg and msg in caplog.text
    assert list((tmp_path / "s").iterdir()) == []  # the probe file is gone


# ------------------------------------------------------------------------ 4. bad data

def test_truncated_jpeg_rejected_by_name(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for name, params in (("base", []), ("prog", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
                         ("rst", [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])):
        path = tmp_path / f"{name}.jpg"
        cv2.imwrite(str(path), img, params)
        assert read_image(str(path)).shape == (40, 56, 3)  # complete files read as before
        data = path.read_bytes()
        cut = tmp_path / f"{name}_cut.jpg"
        cut.write_bytes(data[:len(data) * 2 // 3])
        assert cv2.imread(str(cut)) is not None  # OpenCV alone decodes it, partly grey
        with pytest.raises(DataError, match=f"{cut}.* truncated JPEG"):
            read_image(str(cut), "list.txt:3")


def test_list_entries_leaving_the_data_root_are_refused(tmp_path):
    root = make_city(tmp_path / "city", n_train=2, n_val=1)
    secret = tmp_path / "secret.png"
    cv2.imwrite(str(secret), np.zeros((48, 96, 3), np.uint8))
    lst = tmp_path / "bad.txt"
    lst.write_text("/../secret.png\t/segmentation/train/city_train_000000_000019_gtFine.png\n")
    with pytest.raises(DataError, match=r"bad.txt:1 .*points outside the dataset folder"):
        CityscapesDataset(str(root), str(lst), "eval")
    ds = CityscapesDataset(str(root), str(lst), "eval", allow_outside_root=True)
    assert ds.paths(0)[0] == os.path.normpath(str(secret))
    # an absolute path outside the root is not read either
    lst.write_text(f"{secret}\t/segmentation/train/city_train_000000_000019_gtFine.png\n")
    ds = CityscapesDataset(str(root), str(lst), "eval")
    assert ds.paths(0)[0] != str(secret)
    # VOC ids
    voc = make_voc(tmp_path / "voc", n_train=2, n_val=1)
    (voc / "val2.txt").write_text("v0000\n../../../secret\n")
    (voc / "val2").mkdir()
    with pytest.raises(DataError, match=r"val2.txt:2 '../../../secret' points outside"):
        VOCDataset(str(voc), str(voc / "val2.txt"), "eval")


def test_duplicates_and_overlap_warn_once(voc_root, tmp_path, caplog):
    import furnace.data.datasets as datasets
    getattr(datasets, "_WARNED", set()).clear()  # warnings of earlier tests
    lab = tmp_path / "train_lab.txt"
    lab.write_text("t0000\nt0001\nt0000\nt0002\n")
    unlab = tmp_path / "train_unlab.txt"
    unlab.write_text("t0002\nt0003\nt0004\nt0005\n")
    C = load_config(ROOT / "exp_voc", [f"dataset_path={voc_root}", f"train_source={lab}",
                                       f"unsup_source={unlab}", *TINY], env={})
    with caplog.at_level(logging.WARNING, logger="furnace.data"):
        TrainLoaders(C, num_workers=0)
        TrainLoaders(C, num_workers=0)
    msgs = [r.getMessage() for r in caplog.records]
    dup = [m for m in msgs if "more than once" in m]
    over = [m for m in msgs if "also in the unlabelled list" in m]
    assert len(dup) == 1 and "train_lab.txt:3 repeats" in dup[0]
    assert len(over) == 1 and over[0].startswith("1 image(s)") and "train_unlab.txt:1" in over[0]


def test_batch_without_labelled_pixels_adds_zero_supervised_loss():
    from furnace.methods.dueb import DUEBStep
    from furnace.models import network_from_config
    C = load_config(ROOT / "exp_voc", TINY, env={})
    torch.manual_seed(0)
    model = network_from_config(C).train()
    g = torch.Generator().manual_seed(0)
    lab = {"data": torch.randn(2, 3, 32, 32, generator=g),
           "label": torch.full((2, 32, 32), 255, dtype=torch.long)}
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1
    u0 = {"data": torch.randn(2, 3, 32, 32, generator=g), "mask": mask}
    u1 = {"data": torch.randn(2, 3, 32, 32, generator=g)}
    loss, terms, _ = DUEBStep(model, C, batch_per_process=2)(lab, u0, u1)
    assert terms["sup_1"].item() == 0 and terms["sup_2"].item() == 0
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # a batch with labels: the reference loss, value and gradient bit for bit
    from furnace.losses import SupervisedCrossEntropy
    z = torch.randn(2, 21, 8, 8, generator=g)
    t = torch.randint(0, 21, (2, 8, 8), generator=g)
    t[0, :3] = 255
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    a = SupervisedCrossEntropy()(za, t)
    b = torch.nn.CrossEntropyLoss(ignore_index=255)(zb, t)
    a.backward()
    b.backward()
    assert a.item() == b.item() and torch.equal(za.grad, zb.grad)


# ------------------------------------------------------------------------ 5. one line

def test_error_in_a_loader_worker_is_one_line(voc_root, tmp_path):
    lab = tmp_path / "train_lab.txt"
    lab.write_text("t0000\nt0001\nmissing_id\nt0003\n")
    C = load_config(ROOT / "exp_voc", [f"dataset_path={voc_root}", f"train_source={lab}",
                                       *TINY, "max_samples=4", "niters_per_epoch=2"], env={})
    loaders = TrainLoaders(C, num_workers=2)
    with pytest.raises(DataError) as e:
        for _ in range(3):
            for _ in loaders.epoch(0):
                pass
    text = str(e.value)
    assert "\n" not in text and text.startswith("image file not found") and "train_lab.txt:3" in text
    assert "DataLoader worker" in e.value.worker_traceback


def test_worker_error_through_the_train_script_is_one_line_and_exits(voc_root, tmp_path):
    # a fresh process: its exit must not wait for (or report) the loader workers
    lab = tmp_path / "train_lab.txt"
    lab.write_text("t0000\nt0001\nmissing_id\nt0003\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "exp_voc" / "train.py"), "-d", "cpu",
                          "--set", f"dataset_path={voc_root}", f"log_dir={tmp_path / 'log'}",
                          f"train_source={lab}", *TINY, "num_workers=2", "max_samples=4",
                          "niters_per_epoch=2"], env=env, capture_output=True, text=True,
                         timeout=300)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [l for l in err if l.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: image file not found")
    assert "train_lab.txt:3" in errors[0] and err[-1] == errors[0]
    assert not any("Traceback" in l or "Exception ignored" in l for l in err)


def test_bad_logging_level_is_one_line(tmp_path):
    # in a fresh process (pytest's own log handlers hide basicConfig's check)
    env = dict(os.environ, ENGINE_LOGGING_LEVEL="verbose", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "exp_demo" / "train.py"), "-d", "cpu",
                          "--set", f"log_dir={tmp_path}"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("error: ENGINE_LOGGING_LEVEL='verbose' is not a logging level")
    from furnace.config import engine_log_level
    assert engine_log_level({"ENGINE_LOGGING_LEVEL": "debug"}) == logging.DEBUG
    assert engine_log_level({"ENGINE_LOGGING_LEVEL": "20"}) == logging.INFO
    assert engine_log_level({}) == logging.INFO


def test_symlink_loops_are_named(tmp_path):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(DataError, match="symlink loop"):
        VOCDataset(str(loop), str(loop / "val.txt"), "eval")
    voc = make_voc(tmp_path / "voc", n_train=2, n_val=1)
    img = voc / "val" / "image" / "v0000.jpg"
    img.unlink()
    os.symlink(img, img)
    ds = VOCDataset(str(voc), str(voc / "val.txt"), "eval", num_classes=5)
    with pytest.raises(DataError, match=r"v0000.jpg \(listed in .*val.txt:1\) is in a symlink"):
        ds[0]
    with pytest.raises(DataError, match="list file .*loop/val.txt is in a symlink loop"):
        from furnace.data import read_list_file
        read_list_file(str(loop / "val.txt"))
    # a file given as the dataset folder is named as such, not "not found"
    with pytest.raises(DataError, match="val.txt is a file, not a folder"):
        VOCDataset(str(voc / "val.txt"), str(voc / "val.txt"), "eval")
