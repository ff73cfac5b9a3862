"""eval.py command line on generated VOC-layout data with fabricated checkpoints."""
import contextlib
import io
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from furnace.config import load_config
from furnace.data import build_eval_dataset
from furnace.engine.checkpoint import atomic_save
from furnace.eval import cli, loop
from furnace.eval.cli import link_file
from furnace.eval.loop import EvalError
from furnace.eval.runner import parse_devices, shard_indices
from furnace.eval.visualize import BAR_WIDTH, colorize, get_palette, make_composite

IDS = ["2007_000001", "2007_000002", "2007_000003"]
SIZES = [(40, 50), (30, 28), (36, 44)]      # sliding (2x2 windows), single, sliding


class TinyBranch(torch.nn.Module):
    """A few-parameter stand-in for a branch: (feature, logits, var) at input size."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.classifier = torch.nn.Conv2d(8, num_classes, 1)
        self.variancelayer = torch.nn.Conv2d(8, 1, 1)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        return f, self.classifier(f), F.softplus(self.variancelayer(f))


class TinyDual(torch.nn.Module):
    eval_branch = 1

    def __init__(self, num_classes):
        super().__init__()
        self.branch1 = TinyBranch(num_classes)
        self.branch2 = TinyBranch(num_classes)

    def forward(self, x):
        return self.branch1(x)[1]


def tiny_factory(C):
    """Module-level, so that spawned evaluation processes can import it."""
    return TinyDual(C.num_classes)


def make_voc_data(root: Path, ids=IDS, sizes=SIZES, seed=0):
    """A tiny VOC-layout dataset: val/image/<id>.png, val/label/<id>.png, val.txt."""
    rng = np.random.RandomState(seed)
    (root / "val" / "image").mkdir(parents=True)
    (root / "val" / "label").mkdir(parents=True)
    for i, (h, w) in zip(ids, sizes):
        img = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
        label = rng.randint(0, 21, (h, w)).astype(np.uint8)
        label[: h // 4, : w // 4] = 255
        label[-3:, -3:] = 1
        cv2.imwrite(str(root / "val" / "image" / f"{i}.png"), img[:, :, ::-1])
        cv2.imwrite(str(root / "val" / "label" / f"{i}.png"), label)
    (root / "val.txt").write_text("\n".join(ids) + "\n")
    return root


CONFIG = """
from furnace.config import base_config
config = C = base_config()
C.dataset = "voc"
C.dataset_path = {root!r}
C.eval_source = "val.txt"
C.num_classes = 21
C.backbone = "resnet18"
C.eval_crop_size = 32
C.eval_batch_windows = 4
C.num_workers = 0
"""


@pytest.fixture(scope="module")
def voc_exp(tmp_path_factory):
    base = tmp_path_factory.mktemp("evalcli")
    root = make_voc_data(base / "pascal_voc")
    exp = base / "exp"
    exp.mkdir()
    (exp / "config.py").write_text(CONFIG.format(root=str(root)))
    from furnace.models import build_network
    torch.manual_seed(0)
    net = build_network(21, "resnet18", 16, None)
    state = net.state_dict()
    snap = exp / "log" / "snapshot"
    atomic_save({"model": state, "epoch": 3, "iteration": 9}, snap / "epoch-3.pth")
    os.link(snap / "epoch-3.pth", snap / "epoch-5.pth")       # same weights, cheap
    os.link(snap / "epoch-3.pth", snap / "epoch-last.pth")
    (snap / "notes.txt").write_text("not a checkpoint")
    yield {"exp": exp, "root": root, "snap": snap, "state": state}
    # the ResNet-18 checkpoints are 130 MB: not left behind in the temporary folder
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("snapshot_dir", "volna", "batch_size", "learning_rate", "snapshot_iter",
                "debug"):
        monkeypatch.delenv(var, raising=False)


def _run(exp, *args):
    return cli.main(str(exp), list(args))


def _exit_error(capsys, exp, *args):
    with pytest.raises(SystemExit) as e:
        _run(exp, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    assert not any("Traceback" in line for line in err)
    return err[-1]


@pytest.fixture(scope="module")
def first_run(voc_exp):
    """eval.py -e 3-5 -d cpu -s with the real ResNet-18 dual network (run once)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = _run(voc_exp["exp"], "-e", "3-5", "-d", "cpu", "-s")
    return res, buf.getvalue()


def test_range_save_images_and_val_log(voc_exp, first_run):
    exp, snap = voc_exp["exp"], voc_exp["snap"]
    res, out = first_run
    assert [r["epoch"] for r in res] == [3, 5]
    assert [Path(r["path"]).name for r in res] == ["epoch-3.pth", "epoch-5.pth"]
    assert res[0]["hist"].sum() > 0 and np.array_equal(res[0]["hist"], res[1]["hist"])
    assert res[0]["miou"] == res[1]["miou"]
    assert len(res[0]["iou"]) == 21
    for key in ("miou", "miou_no_back", "pixel_acc"):
        assert 0 <= res[0][key] <= 1
    # pixel count: every label pixel except the 255 corners
    labels = [cv2.imread(str(voc_exp["root"] / "val" / "label" / f"{i}.png"),
                         cv2.IMREAD_GRAYSCALE) for i in IDS]
    assert res[0]["hist"].sum() == sum(int((lb != 255).sum()) for lb in labels)
    assert f"Model: {snap / 'epoch-3.pth'}" in out
    assert "1 background\t" in out and "21 tv/monitor\t" in out and "mIou: " in out

    # val log and its link
    logs = sorted((exp / "log").glob("val_*.log"))
    link = exp / "log" / "val_last.log"
    assert link.is_symlink() and link.resolve() in [p.resolve() for p in logs]
    text = link.read_text()
    assert text.count("Model: ") == 2 and res[0]["text"] in text
    assert text.startswith(f"Model: {snap / 'epoch-3.pth'}\n1 background\t")

    # composites: input | prediction | ground truth | variance | errors, true palette colours
    palette = get_palette("voc", 21)
    for name, (h, w) in zip(IDS, SIZES):
        path = exp / "log" / "pred_imgs" / "epoch-3" / f"{name}.png"
        comp = cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]
        assert comp.shape == (h, 5 * w + 4 * BAR_WIDTH, 3)
        img = cv2.imread(str(voc_exp["root"] / "val" / "image" / f"{name}.png"))[:, :, ::-1]
        label = cv2.imread(str(voc_exp["root"] / "val" / "label" / f"{name}.png"),
                           cv2.IMREAD_GRAYSCALE)
        panels = [comp[:, k * (w + BAR_WIDTH): k * (w + BAR_WIDTH) + w] for k in range(5)]
        bars = [comp[:, k * (w + BAR_WIDTH) + w: (k + 1) * (w + BAR_WIDTH)] for k in range(4)]
        assert all((b == 0).all() for b in bars)
        np.testing.assert_array_equal(panels[0], img)
        np.testing.assert_array_equal(panels[2], colorize(label, palette))
        assert tuple(panels[2][-1, -1]) == (128, 0, 0)              # class 1, not shifted
        assert (panels[2][0, 0] == 255).all()                       # ignore is white
        pred_px = panels[1].reshape(-1, 3)
        allowed = {tuple(c) for c in palette} | {(255, 255, 255)}
        assert {tuple(c) for c in pred_px} <= allowed
        assert (panels[1][label == 255] == 255).all()
        assert panels[3].std() >= 0 and panels[3].shape == (h, w, 3)
        # error map: white where the prediction panel differs from the ground truth panel,
        # black where it agrees, grey on ignored pixels
        wrong = (panels[1] != panels[2]).any(2) & (label != 255)
        assert (panels[4][label == 255] == 128).all()
        assert (panels[4][wrong] == 255).all() and (panels[4][~wrong & (label != 255)] == 0).all()
        assert wrong.any() and (~wrong & (label != 255)).any()



def test_reference_bare_module_prefixed_state_dict(voc_exp, first_run, tmp_path):
    """The reference's DataParallel-era layout: a bare state dict with `module.` prefixes."""
    bare = tmp_path / "ref_bare.pth"
    torch.save({"module." + k: v for k, v in voc_exp["state"].items()}, bare)
    a = _run(voc_exp["exp"], "-e", str(bare), "-d", "cpu")
    assert np.array_equal(a[0]["hist"], first_run[0][0]["hist"])
    assert a[0]["epoch"] is None


def test_reference_model_key_layout(voc_exp, tmp_path):
    """The reference's own checkpoint dict (model, optimizer_1/2, epoch, iteration)."""
    C = load_config(voc_exp["exp"], [f"log_dir={tmp_path / 'log'}"])
    torch.manual_seed(4)
    state = TinyDual(21).state_dict()
    ours, ref = tmp_path / "ours.pth", tmp_path / "ref.pth"
    atomic_save({"model": state, "epoch": 2, "iteration": 5}, ours)
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "optimizer_1": {},
                "optimizer_2": {}, "epoch": 39, "iteration": 991}, ref)
    a = cli.run(C, str(ours), ["cpu"], model_factory=tiny_factory)
    b = cli.run(C, str(ref), ["cpu"], model_factory=tiny_factory)
    assert np.array_equal(a[0]["hist"], b[0]["hist"])
    assert (a[0]["epoch"], b[0]["epoch"]) == (2, 39)
    # in-training validation helper: same numbers, model mode restored
    model = TinyDual(21)
    model.load_state_dict(state)
    model.train()
    m = loop.evaluate_model(model, C, "cpu")
    assert np.array_equal(m["hist"], a[0]["hist"]) and m["miou"] == a[0]["miou"]
    assert model.training


def test_wrong_class_count_is_one_line(voc_exp, tmp_path, capsys):
    path = tmp_path / "c5.pth"
    torch.save({"model": {"branch1.classifier.weight": torch.zeros(5, 256, 1, 1),
                          "branch1.classifier.bias": torch.zeros(5)}}, path)
    line = _exit_error(capsys, voc_exp["exp"], "-e", str(path), "-d", "cpu")
    assert "num_classes=5" in line and "num_classes=21" in line and str(path) in line


def test_missing_checkpoint_and_bad_specs(voc_exp, capsys):
    exp = voc_exp["exp"]
    line = _exit_error(capsys, exp, "-e", "7", "-d", "cpu")
    assert "epoch-7.pth" in line and "3, 5" in line
    line = _exit_error(capsys, exp, "-e", "9-12", "-d", "cpu")
    assert "9-12" in line and "3, 5" in line
    assert "not understood" in _exit_error(capsys, exp, "-e", "foo", "-d", "cpu")
    assert "missing.pth" in _exit_error(capsys, exp, "-e", "missing.pth", "-d", "cpu")
    line = _exit_error(capsys, exp, "-e", "3", "-d", "cpu", "--set", "num_clases=3")
    assert "num_clases" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_request_without_cuda(voc_exp, capsys):
    line = _exit_error(capsys, voc_exp["exp"], "-e", "3", "-d", "0")
    assert "GPU 0" in line and "0 CUDA device" in line


def test_last_and_two_cpu_processes_merge_histograms(voc_exp, tmp_path, capsys):
    C = load_config(voc_exp["exp"], [f"snapshot_dir={tmp_path / 'snap'}",
                                      f"log_dir={tmp_path / 'log'}"])
    torch.manual_seed(3)
    atomic_save({"model": TinyDual(21).state_dict(), "epoch": 7, "iteration": 1},
                tmp_path / "snap" / "epoch-last.pth")
    single = cli.run(C, "last", ["cpu"], model_factory=tiny_factory)
    multi = cli.run(C, "last", ["cpu", "cpu"], verbose=True, model_factory=tiny_factory)
    err = capsys.readouterr().err
    assert "cpu handles 2 images" in err and "cpu handles 1 images" in err
    assert np.array_equal(single[0]["hist"], multi[0]["hist"])
    assert single[0]["epoch"] == multi[0]["epoch"] == 7
    assert single[0]["hist"].sum() > 0
    assert (tmp_path / "log" / "val_last.log").read_text().count("Model: ") == 2


# ----------------------------------------------------------------------------- helpers

def test_parse_devices():
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices("") == (["cuda:0"] if torch.cuda.is_available() else ["cpu"])
    for bad in ("x", "1-0", "0-", ","):
        with pytest.raises(EvalError):
            parse_devices(bad)
    n = torch.cuda.device_count()
    with pytest.raises(EvalError, match=f"{n} CUDA device"):
        parse_devices(str(n))


def test_shard_indices_are_contiguous():
    assert [list(r) for r in shard_indices(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [list(r) for r in shard_indices(1, 3)] == [[0], [], []]
    assert sum(len(r) for r in shard_indices(1449, 8)) == 1449


def test_link_file_replaces_and_falls_back_to_copy(tmp_path, monkeypatch):
    a, b, link = tmp_path / "a.log", tmp_path / "b.log", tmp_path / "last.log"
    a.write_text("A")
    b.write_text("B")
    link_file(a, link)
    assert link.is_symlink() and link.read_text() == "A"
    link_file(b, link)
    assert link.is_symlink() and link.read_text() == "B"

    def no_symlink(*args, **kw):
        raise OSError("symlinks not supported")

    monkeypatch.setattr(os, "symlink", no_symlink)
    link_file(a, link)
    assert not link.is_symlink() and link.read_text() == "A"


def test_composite_layout_without_gt_and_var():
    img = np.full((4, 5, 3), 7, dtype=np.uint8)
    pred = np.array([[0, 1, 2, 255, 19]] * 4)
    pal = get_palette("city", 19)
    comp = make_composite(img, pred, None, pal)
    assert comp.shape == (4, 2 * 5 + BAR_WIDTH, 3)
    right = comp[:, 5 + BAR_WIDTH:]
    assert tuple(right[0, 0]) == (128, 64, 128) and tuple(right[0, 1]) == (244, 35, 232)
    assert tuple(right[0, 3]) == (255, 255, 255) and tuple(right[0, 4]) == (0, 0, 0)


def test_plain_eval_rebuilds_a_dueb_network_from_the_checkpoint(tmp_path, monkeypatch):
    """Trained with non-default network and protocol keys, evaluated with the data keys
    only: eval.py rebuilds both from the checkpoint's recorded config and reproduces the
    run's own validation of that epoch."""
    import re
    from conftest import ROOT
    from helpers import make_voc, run_script
    root = make_voc(tmp_path / "voc", n_train=8, n_val=3, num_classes=5)
    data = [f"dataset_path={root}", f"log_dir={tmp_path / 'log'}", "num_workers=0"]
    run_script(ROOT / "exp_voc" / "train.py",
               ["--set", *data, "num_classes=5", "class_names=none", "backbone=resnet18",
                "pretrained_model=none", "head_channels=16", "output_stride=8",
                "image_height=48", "image_width=48", "batch_size=2", "nepochs=1",
                "niters_per_epoch=3", "labeled_ratio=2", "snapshot_iter=1", "snapshot_from=-1",
                "aleatoric.samples=2", "eval_every=1", "eval_mode=whole", "eval_flip=true"],
               monkeypatch)
    log = next((tmp_path / "log").glob("train_*.log")).read_text()
    res = cli.main(str(ROOT / "exp_voc"), ["-e", "0", "-d", "cpu", "--set", *data])
    m = res[0]
    val = re.findall(r"# val epoch 1: mIoU ([\d.]+)% pixel acc ([\d.]+)%", log)
    assert val == [(f"{100 * m['miou']:.3f}", f"{100 * m['pixel_acc']:.3f}")]
    assert len(m["iou"]) == 5


def test_run_folders_per_method_and_eval_run(voc_exp, first_run, tmp_path):
    """Scripts of methods other than DUEB write to log/<method>-<preset>; eval.py --run
    finds those runs (and writes its val log there), DUEB's stay in log/."""
    from furnace.methods.presets import script_overrides
    assert "log_dir=log" in script_overrides("dueb", "full")
    assert "log_dir=log/u2pl-voc" in script_overrides("u2pl", "voc")
    assert "log_dir=log/supervised" in script_overrides("supervised", None)
    exp = voc_exp["exp"]
    run = exp / "log" / "u2pl-x"
    (run / "snapshot").mkdir(parents=True)
    os.link(voc_exp["snap"] / "epoch-3.pth", run / "snapshot" / "epoch-4.pth")
    res = _run(exp, "--run", "u2pl-x", "-e", "4", "-d", "cpu")
    assert [Path(r["path"]).name for r in res] == ["epoch-4.pth"]
    assert res[0]["miou"] == first_run[0][0]["miou"], "the same weights as epoch-3.pth"
    assert (run / "val_last.log").is_file()


def test_prediction_needs_no_labels(voc_exp):
    """loop.predict_indices serves unlabelled lists (pseudo-label export); scoring them is
    the one-line error of evaluate_indices."""
    C = load_config(voc_exp["exp"], env={})
    ds = build_eval_dataset(C)
    items = [dict(ds[i]) for i in range(len(ds))]
    for item in items:
        item.pop("label")
    torch.manual_seed(0)
    model = TinyDual(21)
    got = list(loop.predict_indices(model, C, items, range(len(items)), "cpu"))
    assert [item["fn"] for item, _, _ in got] == [it["fn"] for it in items]
    assert [tuple(p.pred.shape) for _, p, _ in got] == [s for s in SIZES]
    labelled = list(loop.predict_indices(model, C, ds, range(len(ds)), "cpu"))
    assert all(torch.equal(a.pred, b.pred) for (_, a, _), (_, b, _) in zip(got, labelled))
    with pytest.raises(EvalError, match="has no label"):
        loop.evaluate_indices(model, C, items, range(len(items)), "cpu")
