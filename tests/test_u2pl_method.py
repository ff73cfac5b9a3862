"""U2PL on the engine: the EMA rule (C6), a tiny run that trains, resumes bit-identically
(queues included) and evaluates with eval.py, the 2-process torchrun run, SupOnly."""
import re

import pytest
import torch

from conftest import ROOT
from helpers import make_voc, run_script, script_args, torchrun_script
from furnace.config import base_config, load_config
from furnace.methods.presets import script_overrides
from furnace.eval.loop import evaluate_model
from furnace.engine import checkpoint as ck
from furnace.methods import MethodContext
from furnace.methods.u2pl import U2PL

TINY = ["backbone=resnet18", "pretrained_model=none", "image_height=48", "image_width=48",
        "batch_size=4", "nepochs=3", "niters_per_epoch=2", "num_workers=0", "snapshot_iter=1",
        "snapshot_from=-1", "head_channels=16", "u2pl.rep_dim=8", "u2pl.num_queries=16",
        "u2pl.num_negatives=4", "u2pl.queue_size_first=50", "u2pl.queue_size=30",
        "u2pl.cutmix_prob=1.0", "eval_crop_size=64", "u2pl.low_rank=1", "u2pl.high_rank=4",
        "labeled_ratio=2", "tb_images_every=1"]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), n_train=16, n_val=3, num_classes=5)


def overrides(root, out, extra=()):
    return script_args(root, out, TINY, extra)


def tiny_method(niters=100, sup_only_epoch=1):
    C = base_config()
    C.update(backbone="resnet18", pretrained_model=None, head_channels=8, num_classes=5)
    C.u2pl.update(rep_dim=4, sup_only_epoch=sup_only_epoch)
    return U2PL(C, MethodContext(niters_per_epoch=niters))


def params(m):
    return [p.detach().clone() for p in m.parameters()]


def test_c6_ema_rule_and_teacher_buffers():
    torch.manual_seed(0)
    m = tiny_method(niters=100, sup_only_epoch=1)
    s, t = m.student, m.teacher
    assert any(not torch.equal(a, b) for a, b in zip(params(s), params(t))), \
        "the teacher is built separately (its own decoder init)"
    # warm-start epoch: no EMA at all
    before = params(t)
    m.after_step(iteration=5, epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(before, params(t)))
    # boundary epoch: teacher parameters equal the student's after every step
    s.encoder.bn1.running_mean.fill_(3.0)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.1)
    m.after_step(iteration=150, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(params(s), params(t)))
    assert t.encoder.bn1.running_mean.abs().sum() == 0, "BN buffers are never copied"
    # next epoch: d = min(1 - 1/(k+1), 0.99) with k = i - I_e * sup_only_epoch
    for k, d in ((0, 0.0), (1, 0.5), (9, 0.9), (99, 0.99), (500, 0.99)):
        prev_t = params(t)
        with torch.no_grad():
            for p in s.parameters():
                p.add_(0.05)
        m.after_step(iteration=100 + k, epoch=2)
        for a, b, c in zip(params(t), prev_t, params(s)):
            torch.testing.assert_close(a, d * b + (1 - d) * c, rtol=0, atol=1e-6)


def test_eval_model_is_student_until_the_teacher_is_used():
    m = tiny_method(sup_only_epoch=1)
    m.epoch = 0
    assert m.eval_model() is m.student and m.extra_state()["eval_key"] == "model"
    m.epoch = 1
    assert m.eval_model() is m.teacher and m.extra_state()["eval_key"] == "teacher"
    assert U2PL.eval_weights_key({"extra": {"eval_key": "model"}}) == "model"


def test_contrastive_needs_the_representation_head():
    C = base_config()
    C.update(backbone="resnet18", pretrained_model=None, head_channels=8, num_classes=5)
    C.u2pl.rep_head = False
    with pytest.raises(ValueError, match="u2pl.rep_head"):
        U2PL(C, MethodContext())


def test_tiny_run_resumes_bit_identically_and_evaluates(voc_root, tmp_path, monkeypatch):
    script = ROOT / "exp_voc" / "trainu2pl.py"
    straight, split = tmp_path / "a", tmp_path / "b"
    run_script(script, overrides(voc_root, straight, ["eval_every=1"]), monkeypatch)
    run_script(script, overrides(voc_root, split, ["stop_after_epoch=1"]), monkeypatch)
    run_script(script, ["-c", "last"] + overrides(voc_root, split), monkeypatch)
    a = ck.load_file(straight / "log" / "snapshot" / "epoch-2.pth")
    b = ck.load_file(split / "log" / "snapshot" / "epoch-2.pth")
    assert a["method"] == "u2pl" and {"model", "teacher", "optimizer"} <= set(a)
    for key in ("model", "teacher"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    qa, qb = a["extra"]["queues"]["queues"], b["extra"]["queues"]["queues"]
    assert sum(q.shape[0] for q in qa) > 0, "the queues filled"
    assert all(torch.equal(x, y) for x, y in zip(qa, qb)), "queues resume bit-identically"
    assert a["extra"]["eval_key"] == "teacher"
    log = next((straight / "log").glob("train_*.log")).read_text()
    assert re.search(r"contra=\d", log) and "V=" in log and "kept=" in log
    assert log.count("# val epoch") == 3

    from furnace.eval.cli import main as eval_main
    # plain eval.py rebuilds the U2PL network and the VOC preset's protocol from the
    # checkpoint's recorded config: only the data keys are given, no preset, no network key
    data = ["--set", f"dataset_path={voc_root}", f"log_dir={straight / 'log'}",
            "num_workers=0"]
    res = eval_main(ROOT / "exp_voc", ["-e", "last", "-d", "cpu"] + data)
    assert len(res) == 1 and 0.0 <= res[0]["miou"] <= 1.0
    val = re.findall(r"# val epoch 3: mIoU ([\d.]+)%", log)
    assert val == [f"{100 * res[0]['miou']:.3f}"], "the run's own validation of that epoch"
    # eval.py evaluates the teacher (the file's eval_key): the same number as the teacher
    # weights evaluated here through the same path (channels_last as eval.py)
    C = load_config(ROOT / "exp_voc", overrides(voc_root, straight)[3:],
                    preset=script_overrides("u2pl", "voc"))
    last = ck.load_file(straight / "log" / "snapshot" / "epoch-last.pth")
    assert any(not torch.equal(last["model"][k], last["teacher"][k]) for k in last["model"])
    net = U2PL.build_eval_model(C)
    net.load_state_dict(last["teacher"])
    mine = evaluate_model(net, C, "cpu", channels_last=True)
    assert mine["miou"] == pytest.approx(res[0]["miou"], abs=1e-12)
    # --set has the last word over the recorded protocol
    plain = eval_main(ROOT / "exp_voc", ["-e", "last", "-d", "cpu"] + data
                      + ["eval_mode=whole"])
    C_whole = load_config(ROOT / "exp_voc", overrides(voc_root, straight)[3:]
                          + ["eval_mode=whole"],
                          preset=script_overrides("u2pl", "voc"))
    whole = evaluate_model(net, C_whole, "cpu", channels_last=True)
    assert plain[0]["miou"] == pytest.approx(whole["miou"], abs=1e-12)


def test_suponly_trains_without_teacher_or_rep_head(voc_root, tmp_path, monkeypatch):
    run_script(ROOT / "exp_voc" / "trainu2pl_suponly.py",
               overrides(voc_root, tmp_path, ["nepochs=1"]), monkeypatch)
    state = ck.load_file(tmp_path / "log" / "snapshot" / "epoch-0.pth")
    assert state["method"] == "u2pl_suponly" and "teacher" not in state
    assert not any("representation" in k for k in state["model"])


def test_torchrun_two_processes(voc_root, tmp_path):
    torchrun_script(ROOT / "exp_voc" / "trainu2pl.py",
                    overrides(voc_root, tmp_path, ["nepochs=2", "u2pl.sup_only_epoch=0"]))
    text = next((tmp_path / "log").glob("train_*.log")).read_text()
    # the VOC preset's 4 reference GPUs: 2 groups per process, contrastive weight 1/4
    assert "world_size=2 reference_groups=2/process of 4" in text and "weight 0.25" in text
    m = re.search(r"max parameter difference across 2 ranks: (\S+)", text)
    assert m and float(m.group(1)) == 0.0
    state = ck.load_file(tmp_path / "log" / "snapshot" / "epoch-1.pth")
    assert sum(q.shape[0] for q in state["extra"]["queues"]["queues"]) > 0


def test_checkpoint_of_another_backbone_is_named(tmp_path):
    from furnace.engine.checkpoint import CheckpointError, load_model_weights
    from furnace.models import U2PLNetwork
    small = U2PLNetwork(5, "resnet18", inner_planes=8, rep_dim=4)
    torch.save({"model": small.state_dict()}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="backbone=resnet18 but the config has "
                                              "backbone=resnet50"):
        load_model_weights(U2PLNetwork(5, "resnet50", inner_planes=8, rep_dim=4),
                           tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="num_classes=5 but the config has num_classes=7"):
        load_model_weights(U2PLNetwork(7, "resnet18", inner_planes=8, rep_dim=4),
                           tmp_path / "x.pth")
