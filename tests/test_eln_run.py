"""A tiny ELN run through its three stages with exp_voc/traineln.py: it trains, resumes
bit-identically inside stage 3 (teacher, ELN and auxiliary decoders included) and evaluates
with eval.py."""
import re

import pytest
import torch

from conftest import ROOT
from helpers import make_voc, run_script, script_args, torchrun_script
from furnace.engine import checkpoint as ck

TINY = ["backbone=resnet18", "backbone_width=8", "head_channels=8", "pretrained_model=none",
        "eln.eln_pretrained=none", "amp=off", "image_height=48", "image_width=48",
        "batch_size=4", "nepochs=4", "niters_per_epoch=2", "num_workers=0",
        "snapshot_iter=1", "snapshot_from=-1", "eln.pre_epoch=1", "eln.eln_epoch=2",
        "eln.window_size=8", "eln.proj_dim=4", "eln.empty_pseudo=zero",
        "eln.zero_errors=unit", "labeled_ratio=2", "tb_images_every=1", "eval_crop_size=64"]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), n_train=16, n_val=3, num_classes=5)


def overrides(root, out, extra=()):
    return script_args(root, out, TINY, extra)


def test_three_stages_resume_and_eval(voc_root, tmp_path, monkeypatch):
    script = ROOT / "exp_voc" / "traineln.py"
    straight, split = tmp_path / "a", tmp_path / "b"
    run_script(script, overrides(voc_root, straight), monkeypatch)
    run_script(script, overrides(voc_root, split, ["stop_after_epoch=2"]), monkeypatch)
    run_script(script, ["-c", "last"] + overrides(voc_root, split), monkeypatch)
    a = ck.load_file(straight / "log" / "snapshot" / "epoch-3.pth")
    b = ck.load_file(split / "log" / "snapshot" / "epoch-3.pth")
    assert a["method"] == "eln"
    assert {"model", "teacher", "eln", "aux1", "aux2", "optimizer"} <= set(a)
    for key in ("model", "teacher", "eln", "aux1", "aux2"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    log = next((straight / "log").glob("train_*.log")).read_text()
    for word in ("sup=", "aux=", "eln=", "pl_s=", "con_w=", "gates=", "kept="):
        assert word in log, word
    assert re.search(r"# val epoch 4 teacher: mIoU", log)

    from furnace.eval.cli import main as eval_main
    data = ["--set", f"dataset_path={voc_root}", f"log_dir={straight / 'log'}",
            "num_workers=0"]
    res = eval_main(ROOT / "exp_voc", ["-e", "last", "-d", "cpu"] + data)
    assert len(res) == 1 and 0.0 <= res[0]["miou"] <= 1.0
    # eval.py rebuilds the ELN network and the VOC resize protocol from the checkpoint and
    # evaluates the student: the run's own validation of that epoch
    val = re.findall(r"# val epoch 4 model: mIoU ([\d.]+)%", log)
    assert val == [f"{100 * res[0]['miou']:.3f}"]


def test_resume_inside_a_stage3_epoch(voc_root, tmp_path, monkeypatch):
    """A run that dies inside a stage-3 epoch (after the student reset, between two steps)
    resumes from its iteration snapshot without resetting the student again and ends with the
    straight run's weights."""
    from furnace.methods.eln import ELN
    script = ROOT / "exp_voc" / "traineln.py"
    extra = ["snapshot_every_iters=1", "eval_every=0"]
    straight, split = tmp_path / "a", tmp_path / "b"
    run_script(script, overrides(voc_root, straight, extra), monkeypatch)
    original = ELN.after_step

    def crash(self, *, iteration, epoch):
        original(self, iteration=iteration, epoch=epoch)
        if iteration == 7:        # epoch 3, iteration 1 (2 per epoch)
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(ELN, "after_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_script(script, overrides(voc_root, split, extra), monkeypatch)
    monkeypatch.setattr(ELN, "after_step", original)
    last = ck.load_file(split / "log" / "snapshot" / "epoch-last.pth")
    assert last["resume_at"] == [3, 1] and last["extra"]["synced_epoch"] == 3
    run_script(script, ["-c", "last"] + overrides(voc_root, split, extra), monkeypatch)
    a = ck.load_file(straight / "log" / "snapshot" / "epoch-3.pth")
    b = ck.load_file(split / "log" / "snapshot" / "epoch-3.pth")
    for key in ("model", "teacher", "eln", "aux1", "aux2"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def test_torchrun_two_processes_one_reference_group_each(voc_root, tmp_path):
    """Two processes of one reference group each (per-process BatchNorm, per-rank gates and
    contrastive terms): every rank steps the same parameters and they stay identical."""
    torchrun_script(ROOT / "exp_voc" / "traineln.py",
                    overrides(voc_root, tmp_path, ["nepochs=3", "reference_gpus=2",
                                                   "eval_every=0"]))
    text = next((tmp_path / "log").glob("train_*.log")).read_text()
    assert "world_size=2 reference_groups=1/process of 2" in text
    m = re.search(r"max parameter difference across 2 ranks: (\S+)", text)
    assert m and float(m.group(1)) == 0.0
    assert "pl_s=" in text


def test_missing_resnet34_weights_are_one_line_at_start(voc_root, tmp_path, capsys,
                                                        monkeypatch):
    script = ROOT / "exp_voc" / "traineln.py"
    args = overrides(voc_root, tmp_path, ["eln.eln_pretrained=" + str(tmp_path / "r34.pth")])
    with pytest.raises(SystemExit) as e:
        run_script(script, args, monkeypatch)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ELN backbone weights not found" in err[0], err
    assert not (tmp_path / "log" / "snapshot").exists() or not any(
        (tmp_path / "log" / "snapshot").glob("epoch-*.pth"))

