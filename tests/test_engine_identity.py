"""The engine refactor changes no behaviour (issue 21): tiny runs of DUEB (full and CPCL),
U2PL and the supervised baseline, trained by the code of the baseline commit (taken from this
repository's history) and by the working tree on the same fixture, give byte-identical
checkpoints (weights, optimiser states, queues, RNG states, positions) and log values.

The baseline is the last commit before the refactor, with the reliability fixes of issue 22
merged onto it (so their port into the split loop is checked too). A later change that alters
training on purpose moves ``BASELINE`` forward, in its own commit that says why."""
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from helpers import make_voc

BASELINE = "07ef3d6e981bbf8d1f7fe5c42a113149e64fbc60"

TINY = ["backbone=resnet18", "pretrained_model=none", "image_height=32", "image_width=32",
        "batch_size=2", "nepochs=2", "niters_per_epoch=2", "num_workers=0", "snapshot_iter=1",
        "snapshot_from=-1", "train_scale_array=[1.0]", "aleatoric.samples=2",
        "head_channels=8", "num_classes=5", "class_names=none", "labeled_ratio=2",
        "eval_every=1", "eval_mode=whole", "tb_images_every=1", "seed=3"]
U2PL = ["u2pl.rep_dim=4", "u2pl.num_queries=8", "u2pl.num_negatives=4",
        "u2pl.queue_size_first=40", "u2pl.queue_size=30", "u2pl.low_rank=1",
        "u2pl.high_rank=4", "u2pl.cutmix_prob=1.0", "u2pl.sup_only_epoch=1",
        "reference_gpus=2", "eval_crop_size=32"]
RUNS = {"dueb": ("train.py", []), "cpcl": ("traincpcl.py", []),
        "supervised": ("train.py", ["method=supervised"]), "u2pl": ("trainu2pl.py", U2PL)}
# what legitimately differs between two runs: where, when and as which run they ran, by
# which code (the run id and the record of the files it wrote, with their times)
VOLATILE = {"config", "version", "time", "run_id", "snapshot_files"}


def baseline_tree(dest):
    """The repository at BASELINE, extracted to ``dest`` (None when the history lacks it)."""
    ok = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{BASELINE}^{{commit}}"],
                        capture_output=True).returncode == 0
    if not ok:
        return None
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = baseline_tree(tmp_path_factory.mktemp("base") / "repo")
    if base is None:
        pytest.skip(f"the baseline commit {BASELINE[:10]} is not in this clone's history")
    return {"before": base, "after": ROOT}


@pytest.fixture(scope="module")
def voc5(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), n_train=8, n_val=2, num_classes=5,
                    size=(32, 40))


def train(tree, script, extra, root, out):
    cmd = [sys.executable, str(tree / "exp_voc" / script), "-d", "cpu", "--set",
           f"dataset_path={root}", f"log_dir={out}", *TINY, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                              "HOME": str(out.parent)})
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def assert_same(a, b, where):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            if not (where == "" and k in VOLATILE):
                assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


def log_values(out):
    """The per-iteration and validation lines of the train log, without times."""
    text = next(out.glob("train_*.log")).read_text()
    lines = [l for l in text.splitlines() if l.startswith("Epoch") or "# val epoch" in l]
    return [re.sub(r"\(\d+\.\d+s\)", "", l) for l in lines]


@pytest.mark.parametrize("run", sorted(RUNS))
def test_training_is_byte_identical_to_the_baseline(run, trees, voc5, tmp_path):
    script, extra = RUNS[run]
    outs = {k: train(t, script, extra, voc5, tmp_path / k / "log") for k, t in trees.items()}
    files = sorted(p.name for p in (outs["before"] / "snapshot").iterdir())
    assert files == sorted(p.name for p in (outs["after"] / "snapshot").iterdir())
    assert "epoch-1.pth" in files and "best.pth" in files
    for name in files:
        a, b = (torch.load(outs[k] / "snapshot" / name, weights_only=True) for k in outs)
        assert_same(a, b, "")
    before, after = log_values(outs["before"]), log_values(outs["after"])
    assert len(before) == 2 * 2 + 2 and before == after
