"""U2PL as its reference batches (spec methods/U2PL.md 10): the reference groups, the union
one-hot of label_onehot, the contrastive weight and OHEM's min_kept per group, the warm
start's weight decay on the representation head, and launch invariance: 1 process x 2 groups
trains exactly as 2 gloo processes x 1 group."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import free_port
from furnace.config import ConfigError, base_config, finalize
from furnace.losses import OhemCrossEntropy
from furnace.losses.contrastive import label_onehot
from furnace.methods import MethodContext
from furnace.methods.groups import GroupError, ReferenceGroups, reference_groups
from furnace.methods.u2pl import U2PL, SupervisedLoss


def sets(onehot):
    """bool [B,C,h,w] -> per image, per pixel (row-major) the set of classes."""
    B, C = onehot.shape[:2]
    flat = onehot.reshape(B, C, -1)
    return [[{c for c in range(C) if flat[b, c, p]} for p in range(flat.shape[2])]
            for b in range(B)]


# ----------------------------------------------------------------------------- 10.1 one-hot
def test_union_onehot_worked_example():
    labels = torch.tensor([[[0, 1], [2, 255]], [[3, 3], [1, 0]]])
    got = sets(label_onehot(labels, 4, union=True))
    assert got[0] == [{0, 3}, {1, 3}, {1, 2}, set()]
    assert got[1] == [set()] * 4
    exact = sets(label_onehot(labels, 4))
    assert exact == [[{0}, {1}, {2}, set()], [{3}, {3}, {1}, {0}]]


def test_union_onehot_three_images():
    # another image's 255 counts as class 0; image 0's own 255 clears the pixel
    labels = torch.tensor([[[0, 255, 2]], [[1, 3, 255]], [[255, 2, 2]]])
    got = sets(label_onehot(labels, 4, union=True))
    assert got == [[{0, 1}, set(), {0, 2}], [set()] * 3, [set()] * 3]
    one = labels[:1]
    assert torch.equal(label_onehot(one, 4, union=True), label_onehot(one, 4)), \
        "with one image the union is the exact one-hot"


# ----------------------------------------------------------------------------- groups
def test_reference_groups_split_and_errors():
    g = reference_groups(4, 16, world_size=2, rank=1)
    assert g == ReferenceGroups(per_process=2, first=2, total=4)
    assert list(g.indices) == [2, 3]
    x = torch.arange(8)
    assert [x[sl].tolist() for sl in g.slices(8)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(GroupError, match="a batch of 7 images does not split into 2"):
        g.slices(7)
    assert reference_groups(None, 8, world_size=2, rank=0) == ReferenceGroups(1, 0, 2)
    with pytest.raises(GroupError, match="launch 1, 2, 4 processes"):
        reference_groups(4, 16, world_size=3)
    with pytest.raises(GroupError, match="batch_size=6 does not split into reference_gpus=4"):
        reference_groups(4, 6)
    C = base_config()
    C.update(reference_gpus=3, batch_size=8)
    with pytest.raises(ConfigError, match="'reference_gpus' must be a divisor of batch_size=8"):
        finalize(C)


def tiny_config(**u2pl):
    C = base_config()
    C.update(backbone="resnet18", pretrained_model=None, head_channels=8, num_classes=5,
             image_height=32, image_width=32)
    C.u2pl.update(dict(dict(rep_dim=4, sup_only_epoch=0, num_queries=8, num_negatives=4,
                            queue_size_first=60, queue_size=40, low_rank=1, high_rank=4,
                            cutmix_prob=1.0), **u2pl))
    return C


def test_contrastive_weight_follows_the_reference_gpus_not_the_processes():
    C = tiny_config()
    for W, world, weight in ((4, 1, 0.25), (4, 2, 0.25), (8, 1, 0.125), (None, 1, 1.0)):
        groups = reference_groups(W, 16, world_size=world)
        m = U2PL(C, MethodContext(groups=groups))
        assert m.contrastive_weight == weight
    C.u2pl.contrastive_weight = 0.1
    assert U2PL(C, MethodContext(groups=reference_groups(4, 16))).contrastive_weight == 0.1


def test_ohem_min_kept_is_per_group():
    C = tiny_config()
    C.update(sup_loss="ohem")
    C.u2pl.ohem_min_kept = 30
    torch.manual_seed(0)
    logits = 8 * torch.randn(4, 5, 8, 8, dtype=torch.float64)   # confident: min_kept binds
    label = torch.randint(0, 5, (4, 8, 8))
    ohem = OhemCrossEntropy(255, C.ohem_thresh, 30)
    per_group = SupervisedLoss(C, ReferenceGroups(per_process=2, total=2))
    got = per_group({"pred": logits}, label)
    want = (ohem(logits[:2], label[:2]) + ohem(logits[2:], label[2:])) / 2
    assert float(got) == pytest.approx(float(want), abs=1e-12)
    whole = SupervisedLoss(C, ReferenceGroups())({"pred": logits}, label)
    assert float(whole) == pytest.approx(float(ohem(logits, label)), abs=1e-12)
    assert abs(float(whole) - float(got)) > 1e-6, "min_kept per group changes the loss"


def test_warm_start_keeps_weight_decay_on_the_representation_head():
    C = tiny_config(sup_only_epoch=1)
    C.update(weight_decay=0.1, lr=0.1)
    torch.manual_seed(0)
    m = U2PL(C, MethodContext(niters_per_epoch=10))
    head = [p for n, p in m.student.named_parameters() if "representation" in n]
    assert head, "the tiny network has a representation head"
    before = [p.detach().clone() for p in head]
    lab = {"data": torch.randn(2, 3, 32, 32), "label": torch.randint(0, 5, (2, 32, 32))}
    unl = {"data": torch.randn(2, 3, 32, 32)}
    m.train_step([lab, unl], iteration=0, epoch=0, backward=lambda l: l.backward())
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in head)
    m.optimizers["optimizer"].step()
    for b, p in zip(before, head):
        if float(b.abs().sum()) > 0:
            assert torch.allclose(p.detach(), b * (1 - 0.1 * 0.1 * m.C.u2pl.head_lr_mult)), \
                "weight decay shrinks the head, as the reference's 0 x rep.sum() lets it"


# ----------------------------------------------------------------------------- launches
LAUNCH = r'''
import os, sys
import torch
from furnace.config import base_config
from furnace.engine.dist import DistInfo, average_gradients, broadcast_module, reduce_mean
from furnace.engine.syncbn import convert_sync_batchnorm
from furnace.methods import MethodContext
from furnace.methods.groups import reference_groups
from furnace.methods.u2pl import U2PL

world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    torch.distributed.init_process_group("gloo")
info = DistInfo(rank=rank, world_size=world)
torch.set_default_dtype(torch.float64)

C = base_config()
C.update(backbone="resnet18", pretrained_model=None, head_channels=8, num_classes=5, seed=7)
C.u2pl.update(rep_dim=4, sup_only_epoch=0, num_queries=8, num_negatives=4,
              queue_size_first=60, queue_size=40, low_rank=1, high_rank=4, cutmix_prob=1.0,
              contrastive=sys.argv[2])


def prepare(m):
    if world > 1:
        m = convert_sync_batchnorm(m, torch.device("cpu"))
    broadcast_module(m, info)
    return m


torch.manual_seed(0)
groups = reference_groups(2, 4, world, rank)
m = U2PL(C, MethodContext(batch_per_process=4 // world, groups=groups, world_size=world,
                          rank=rank, niters_per_epoch=5, prepare=prepare))
for net in (m.student, m.teacher):
    for mod in net.modules():
        if isinstance(mod, torch.nn.modules.dropout._DropoutNd):
            mod.p = 0.0          # dropout masks are drawn per process: out of this check
m.bank.queues = [q.double() for q in m.bank.queues]
gen = torch.Generator().manual_seed(3)
out = {"terms": [], "grads": []}
params = [p for p in m.student.parameters() if p.requires_grad]
for it in range(2):
    x_l = torch.randn(4, 3, 32, 32, generator=gen)
    y_l = torch.randint(0, 5, (4, 32, 32), generator=gen)
    y_l[:, :3] = 255
    x_u = torch.randn(4, 3, 32, 32, generator=gen)
    mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
    batches = [{"data": x_l[mine], "label": y_l[mine]}, {"data": x_u[mine]}]
    m.optimizers["optimizer"].zero_grad(set_to_none=True)
    loss, terms, _ = m.train_step(batches, iteration=5 + it, epoch=1,
                                  backward=lambda l: l.backward())
    average_gradients(params, info)
    names = sorted(terms)
    vals = reduce_mean(torch.stack([terms[n].double() for n in names]), info)
    out["terms"].append(dict(zip(names, vals.tolist())))
    out["grads"].append(torch.cat([p.grad.flatten() for p in params]))
    m.optimizers["optimizer"].step()
    m.after_step(iteration=5 + it, epoch=1)
out["queues"] = [q.clone() for q in m.bank.queues]
out["teacher"] = torch.cat([p.detach().flatten() for p in m.teacher.parameters()])
if rank == 0:
    torch.save(out, sys.argv[1])
if world > 1:
    torch.distributed.destroy_process_group()
'''


@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_one_process_two_groups_equals_two_processes_one_group(tmp_path, mode):
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    res = subprocess.run([sys.executable, str(script), str(one), mode], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(script), str(two), mode],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    for ta, tb in zip(a["terms"], b["terms"]):
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k] == pytest.approx(tb[k], abs=1e-6), k
    assert a["terms"][0]["loss_contra"] > 0, "the contrastive loss took part"
    for ga, gb in zip(a["grads"], b["grads"]):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=0)
    assert [q.shape[0] for q in a["queues"]] == [q.shape[0] for q in b["queues"]]
    assert sum(q.shape[0] for q in a["queues"]) > 0
    for qa, qb in zip(a["queues"], b["queues"]):
        torch.testing.assert_close(qa, qb, atol=1e-6, rtol=0)
    torch.testing.assert_close(a["teacher"], b["teacher"], atol=1e-6, rtol=0)


def test_cityscapes_preset_validates_on_the_central_crop_during_training():
    from conftest import ROOT
    from furnace.config import load_config
    from furnace.methods.presets import script_overrides
    from furnace.eval.loop import validation_config
    C = load_config(ROOT / "exp_city", preset=script_overrides("u2pl", "city"),
                    env={})
    assert (C.reference_gpus, C.batch_size, C.amp) == (8, 16, "off")
    assert C.eval_mode == "slide" and validation_config(C).eval_mode == "center_pad"
    assert validation_config(C).eval_crop_size == 769
    V = load_config(ROOT / "exp_voc", preset=script_overrides("u2pl", "voc"),
                    env={})
    assert V.reference_gpus == 4 and validation_config(V) is V


def test_a_launch_that_splits_a_group_is_one_line(tmp_path, monkeypatch, capsys):
    from conftest import ROOT
    from furnace.engine.cli import train_main
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as e:
        train_main(str(ROOT / "exp_demo"), argv=["--set", "reference_gpus=3", "batch_size=4",
                                                  f"log_dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: config key 'reference_gpus' must be a divisor of batch_size=4, "
                   "got 3; batch_size is the reference's per-GPU batch times its GPU count"]
