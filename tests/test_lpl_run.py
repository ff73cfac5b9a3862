"""LPL on the engine: one stage-1 iteration's structure (which network learns from which
loss), its schedules, a tiny run that resumes bit-identically (the IoU tracker included) and
evaluates with eval.py, and the whole pipeline (stage 1, test, export, retrain, retest) on
CPU, resumed in the stage it stopped in, and under 2-process torchrun."""
import json
import re

import pytest
import torch

from conftest import ROOT
from helpers import make_voc, run_script, script_args
from furnace.config import load_config
from furnace.engine import checkpoint as ck

TINY = ["backbone=resnet18", "backbone_width=8", "head_channels=8", "pretrained_model=none",
        "amp=off", "image_height=32", "image_width=32", "batch_size=2", "nepochs=2",
        "niters_per_epoch=2", "num_workers=0", "snapshot_iter=1", "snapshot_from=-1",
        "max_samples=none", "train_source=subset_train_aug/train_aug_labeled_1-2.txt",
        "unsup_source=train_aug.txt", "tb_images_every=1", "eval_scale_array=[0.5,1.0]",
        "eval_every=2", "lpl.lr_mults=[1.0,1.0,10.0]"]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), n_train=8, n_val=2, num_classes=5,
                    size=(40, 48))


def tiny_config(root, out, extra=()):
    from furnace.methods.presets import script_overrides
    return load_config(ROOT / "exp_voc", list(TINY) + [f"dataset_path={root}",
                       f"log_dir={out}", "num_classes=5", "class_names=none", *extra],
                       env={}, preset=script_overrides("lpl", "voc"))


def _method(C):
    from furnace.methods import MethodContext
    from furnace.methods.lpl import LPL
    torch.manual_seed(0)
    m = LPL(C, MethodContext(batch_per_process=2))
    m.train_mode()
    return m


def _batches(C, seed=0):
    from furnace.data.loader import TrainLoaders
    from furnace.methods.lpl import LPL
    loaders = TrainLoaders(C, streams=LPL.stream_specs())
    return next(loaders.epoch(0))


def test_one_step_hybrid_learns_from_three_losses_pseudo_from_one(voc_root, tmp_path):
    """PseudoNet's gradient is L_pseudo's alone; HybridNet's is L_sup + L_cls + L_pct
    (spec 3.3: targets and weights detached, no cross gradient)."""
    from furnace.losses.lpl import cce_loss, class_aware_softmax
    C = tiny_config(voc_root, tmp_path)
    m = _method(C)
    strong, weak = _batches(C)
    assert strong["category"].shape == (2, 5) and weak["is_labelled"].dtype == torch.bool
    state = torch.get_rng_state()
    loss, terms, _ = m.train_step([strong, weak], iteration=0, epoch=0,
                                  backward=torch.Tensor.backward)
    total = sum(terms[k] for k in ("loss_sup", "loss_pseudo", "loss_cls", "loss_pct"))
    assert torch.allclose(loss, total)
    grads_p = [p.grad.clone() for p in m.pseudo.parameters()]
    assert any(p.grad.abs().sum() > 0 for p in m.hybrid.parameters())
    # the same forward (train_step only computes gradients; same dropout draws), L_pseudo
    # alone: it reaches PseudoNet only, and gives PseudoNet its whole gradient
    for p in list(m.pseudo.parameters()) + list(m.hybrid.parameters()):
        p.grad = None
    torch.set_rng_state(state)
    x = torch.cat([strong["data"], weak["data"]])
    y = torch.cat([strong["category"], weak["category"]]).float()
    z_h, z_p = m.hybrid(x), m.pseudo(x)
    prob_h, _ = class_aware_softmax(z_h, y)
    _, logq_p = class_aware_softmax(z_p, y)
    pl_h = prob_h[2:].argmax(1)
    lab = weak["is_labelled"] & (weak["label"] != 255).flatten(1).any(1)
    pl_h[lab] = weak["label"][lab].long()
    cce_loss(logq_p[2:], pl_h).backward()
    for g, p in zip(grads_p, m.pseudo.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-7, rtol=1e-5)
    assert all(p.grad is None for p in m.hybrid.parameters())


def test_schedules_hybrid_poly_pseudo_constant(voc_root, tmp_path):
    C = tiny_config(voc_root, tmp_path, ["lr=0.001"])
    m = _method(C)
    s = m.lr_schedules(20000)
    assert s["optimizer_hybrid"].get_lr(0) == pytest.approx(0.001)
    assert s["optimizer_hybrid"].get_lr(10000) == pytest.approx(5.3589e-4, rel=1e-4)
    assert s["optimizer_hybrid"].get_lr(19999) == pytest.approx(1.3461e-7, rel=1e-3)
    assert s["optimizer_pseudo"].get_lr(19999) == 0.001
    mults = [g["lr_mult"] for g in m.optimizers["optimizer_pseudo"].param_groups]
    assert mults == [1.0, 1.0, 10.0]
    C2 = tiny_config(voc_root, tmp_path, ["lr=0.001", "lpl.pseudonet_poly=True"])
    assert _method(C2).lr_schedules(20000)["optimizer_pseudo"].get_lr(10000) < 0.001


def test_tiny_run_resumes_bit_identically_and_evaluates(voc_root, tmp_path, monkeypatch):
    script = ROOT / "exp_voc" / "trainlpl.py"
    straight, split = tmp_path / "a", tmp_path / "b"
    # validated after each epoch: the file resumed after epoch 1 holds a best mIoU per network
    args = lambda out, extra=(): script_args(voc_root, out, TINY,  # noqa: E731
                                             ["eval_every=1", "nepochs=3", *extra])
    run_script(script, args(straight), monkeypatch)
    run_script(script, args(split, ["stop_after_epoch=1"]), monkeypatch)
    resumed = ck.load_file(split / "log" / "snapshot" / "epoch-last.pth")
    assert set(resumed["best_miou"]) == {"hybrid", "pseudo"}
    run_script(script, ["-c", "last"] + args(split), monkeypatch)
    a = ck.load_file(straight / "log" / "snapshot" / "epoch-2.pth")
    b = ck.load_file(split / "log" / "snapshot" / "epoch-2.pth")
    assert a["method"] == "lpl" and {"hybrid", "pseudo", "optimizer_hybrid",
                                     "optimizer_pseudo"} <= set(a)
    for key in ("hybrid", "pseudo"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    ta, tb = a["extra"]["tracker"], b["extra"]["tracker"]
    for k in ("T", "Pd", "I"):
        assert torch.equal(ta[k], tb[k]), k
    assert float(ta["T"].sum()) > 5   # it counted pixels (init 1 per class)
    log = next((straight / "log").glob("train_*.log")).read_text()
    for word in ("sup=", "pseudo=", "cls=", "pct=", "w="):
        assert word in log, word
    val = re.findall(r"# val epoch 3 hybrid: mIoU ([\d.]+)%", log)
    assert len(val) == 1 and re.search(r"# val epoch 3 pseudo: mIoU", log)

    from furnace.eval.cli import main as eval_main
    data = ["--set", f"dataset_path={voc_root}", f"log_dir={straight / 'log'}",
            "num_workers=0"]
    res = eval_main(ROOT / "exp_voc", ["-e", "last", "-d", "cpu"] + data)
    # eval.py rebuilds LPL's network and the restricted 2-scale protocol from the checkpoint
    # and evaluates HybridNet: the run's own validation of that epoch
    assert val == [f"{100 * res[0]['miou']:.3f}"]


PIPE = ["backbone=resnet18", "backbone_width=8", "head_channels=8", "pretrained_model=none",
        "amp=off", "image_height=32", "image_width=32", "batch_size=2", "nepochs=1",
        "niters_per_epoch=2", "num_workers=0", "max_samples=none", "snapshot_iter=1",
        "train_source=subset_train_aug/train_aug_labeled_1-2.txt", "eval_crf=False",
        "unsup_source=train_aug.txt", "eval_scale_array=[1]", "eval_flip=False",
        "num_classes=5", "class_names=none"]


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc6"), n_train=6, n_val=2, num_classes=5,
                    size=(32, 40))


def _pipeline(root, out, env_extra=None, torchrun=False):
    import os
    import subprocess
    import sys
    from helpers import free_port
    script = ROOT / "exp_voc" / "lplpipeline.py"
    args = ["-d", "cpu", "--out", str(out), "--set", f"dataset_path={root}", *PIPE]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(script), *args]
    else:
        cmd = [sys.executable, str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)


def _record(folder):
    return json.loads((folder / "pipeline.json").read_text())["done"]


def test_pipeline_stopped_in_the_export_resumes_there(small_voc, tmp_path):
    """stage 1, its test, export, retrain, retest; killed during the export, the second run
    neither trains stage 1 again nor predicts the pseudo labels already written."""
    from furnace.data.datasets import VOCDataset
    from furnace.eval.export import STOP_AFTER_ENV, png_is_valid
    out = tmp_path / "runs"
    first = _pipeline(small_voc, out, {STOP_AFTER_ENV: "2"})
    assert first.returncode != 0
    folder = out / "train_aug_labeled_1-2"
    assert set(_record(folder)) == {"stage1", "test1"}
    pngs = sorted((folder / "pseudo").glob("*.png"))
    assert len(pngs) == 2
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in pngs}
    ck1 = folder / "stage1" / "snapshot" / "epoch-last.pth"
    stamp = ck1.stat().st_mtime_ns

    second = _pipeline(small_voc, out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert set(_record(folder)) == {"stage1", "test1", "export", "retrain", "retest"}
    assert ck1.stat().st_mtime_ns == stamp
    assert "lpl pipeline: train_aug_labeled_1-2: stage1" not in second.stdout
    for p, s in kept.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == s
    assert all(png_is_valid(folder / "pseudo" / f"t{i:04d}.png") for i in range(6))
    assert "(4 predicted, 2 existing)" in second.stderr
    assert re.search(r"\| train_aug_labeled_1-2 \| [\d.]+ \| [\d.]+ \|", second.stdout)
    # the list is the VOC loader's: GT for the 3 labelled ids, the PNGs for the others
    ds = VOCDataset(str(small_voc), str(folder / "pseudo_list.txt"), mode="eval",
                    num_classes=5, folder="train_aug")
    assert ds.paths(0)[1].endswith("train_aug/label/t0000.png")
    assert ds.paths(5)[1] == str(folder / "pseudo" / "t0005.png")
    assert set(ds[5]["label"].ravel().tolist()) <= set(range(5))
    r = _record(folder)
    assert 0 <= r["test1"]["miou"] <= 1 and 0 <= r["retest"]["miou"] <= 1


def test_pipeline_under_two_process_torchrun(small_voc, tmp_path):
    """The trainings distributed over 2 processes, the export shared between them, the tests
    on rank 0: every stage finishes and every image has its pseudo label."""
    out = tmp_path / "runs"
    res = _pipeline(small_voc, out, torchrun=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    folder = out / "train_aug_labeled_1-2"
    assert set(_record(folder)) == {"stage1", "test1", "export", "retrain", "retest"}
    assert len(list((folder / "pseudo").glob("*.png"))) == 6
    log = next((folder / "stage1").glob("train_*.log")).read_text()
    assert "world_size=2" in log


def test_retrain_loader_keeps_the_list_order_unless_asked(voc_root, tmp_path):
    """Stage 2's loader reads its list in one fixed order every epoch (the reference's
    shuffle=False); lpl.shuffle=True draws a new order per epoch."""
    from furnace.data.loader import TrainLoaders
    from furnace.methods.lpl import LPLRetrain
    from furnace.methods.presets import script_overrides
    base = list(TINY) + [f"dataset_path={voc_root}", f"log_dir={tmp_path}", "num_classes=5",
                         "class_names=none", "train_source=train_aug.txt",
                         "eval_crf=False"]   # the VOC retest's CRF is an optional package
    orders = {}
    for shuffle, k in ((False, 2), (True, 0)):
        C = load_config(ROOT / "exp_voc", base + [f"lpl.shuffle={shuffle}", f"lpl.augtime={k}"],
                        env={}, preset=script_overrides("lpl_retrain", "voc"))
        loaders = TrainLoaders(C, streams=LPLRetrain.stream_specs())
        assert loaders.datasets[0].transform.augtime == k     # the strong pipeline's K
        sampler = loaders.samplers[0]
        orders[shuffle] = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            orders[shuffle].append([i for i, _ in sampler])
    assert orders[False] == [list(range(8))] * 2
    assert orders[True][0] != orders[True][1] and sorted(orders[True][0]) == list(range(8))
