"""U2PL's numeric checks C1-C11 (spec methods/U2PL.md 9.2), float64 where values are given.

The expected numbers were computed with the reference functions (spec section 0)."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import free_port
from furnace.data.cutmix import half_box, mix_with_next
from furnace.engine.lr import PolyLR, set_lr
from furnace.losses import OhemCrossEntropy
from furnace.losses.contrastive import (MemoryBank, class_ranks, gather_rows,
                                        label_onehot, negative_masks,
                                        unreliable_contrastive_loss)
from furnace.losses.reliability import (entropy, entropy_masks, keep_percent, percentile,
                                        reliable_pseudo_label_loss, unreliable_percent)
from furnace.methods.u2pl import contrastive_weights, downsample_labels

D64 = torch.float64
P = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3],
                  [0.98, 0.01, 0.01]], dtype=D64)           # C1's 4 pixels x 3 classes
H = torch.tensor([0.394398, 0.897946, 1.098612, 0.111902], dtype=D64)


def as_map(rows):
    """[pixels, C] -> [1, C, 1, pixels]."""
    return torch.as_tensor(rows, dtype=D64).t().reshape(1, -1, 1, len(rows))


# ----------------------------------------------------------------------------- C1 - C3
def test_c1_entropy():
    h = entropy(as_map(P))[0, 0]
    torch.testing.assert_close(h, H, atol=1e-6, rtol=0)


@pytest.mark.parametrize("epoch,gamma", [(0, 0.978212), (40, 1.038412), (79, 1.097107)])
def test_c2_dpa_threshold(epoch, gamma):
    kappa = keep_percent(80, epoch, 80)
    assert kappa == pytest.approx({0: 80, 40: 90, 79: 99.75}[epoch])
    h = entropy(as_map(P))[0, 0]
    assert float(percentile(h, kappa)) == pytest.approx(gamma, abs=1e-6)
    assert float(percentile(h, kappa)) == pytest.approx(np.percentile(h.numpy(), kappa),
                                                        abs=1e-12)
    # all-zero student logits: 4/3 ln 3 at every epoch (pixel 2 is the only one dropped)
    target = torch.tensor([[[0, 0, 1, 0]]])
    loss, kept = reliable_pseudo_label_loss(torch.zeros(1, 3, 1, 4, dtype=D64), target,
                                            kappa, entropy(as_map(P)))
    assert float(loss) == pytest.approx(4 / 3 * math.log(3), abs=1e-6)
    assert float(kept) == 0.75
    assert target.tolist() == [[[0, 0, 1, 0]]], "the caller's pseudo labels are not modified"


def test_c2_student_logits():
    student = as_map([[2, 0, -1], [0.5, 1.5, 0], [0, 0, 0], [1, 0, 3]]).requires_grad_()
    target = torch.tensor([[[0, 0, 1, 0]]])
    loss, _ = reliable_pseudo_label_loss(student, target, 80.0, entropy(as_map(P)))
    assert loss.item() == pytest.approx(1.690694, abs=1e-6)
    loss.backward()
    assert student.grad[0, :, 0, 2].abs().sum() == 0, "the dropped pixel gets no gradient"
    # 'mean' drops the 1/kept-fraction factor (quirk 8 as an option)
    mean, _ = reliable_pseudo_label_loss(student, target, 80.0, entropy(as_map(P)), "mean")
    assert mean.item() == pytest.approx(1.690694 * 3 / 4, abs=1e-6)


def test_percentile_matches_numpy_on_random_data():
    x = torch.rand(1001, dtype=D64)
    for q in (0, 0.3, 17.5, 50, 80, 99.75, 100):
        assert float(percentile(x, q)) == pytest.approx(np.percentile(x.numpy(), q), abs=1e-12)
    with pytest.raises(ValueError, match="empty"):
        percentile(torch.zeros(0), 50)


@pytest.mark.parametrize("alpha,low_thr,high_thr", [(20, 0.281399, 0.978212),
                                                    (10, 0.196651, 1.038412)])
def test_c3_entropy_masks(alpha, low_thr, high_thr):
    assert unreliable_percent(20, 40, 80) == 10
    assert float(percentile(H, alpha)) == pytest.approx(low_thr, abs=1e-5)
    assert float(percentile(H, 100 - alpha)) == pytest.approx(high_thr, abs=1e-5)
    low, high = entropy_masks(H, torch.ones(4, dtype=torch.bool), alpha)
    assert low.tolist() == [False, False, False, True]
    assert high.tolist() == [False, False, True, False]


# ----------------------------------------------------------------------------- C4, C5
def feats(*vectors):
    """Features of (labelled px0, px1, unlabelled px0, px1) -> [2, D, 1, 2]."""
    return torch.tensor(vectors, dtype=D64).view(2, 2, -1).permute(0, 2, 1).unsqueeze(2)


def c4_inputs(label_l=(0, 1), label_u=(0, 2), prob_l=((0.7, 0.1, 0.1, 0.1),
                                                       (0.1, 0.6, 0.2, 0.1))):
    return dict(
        rep=feats((1, 0), (0, 1), (0.3, 0.3), (0.5, -0.2)).requires_grad_(),
        rep_teacher=feats((1, 0), (0, 2), (0, 1), (3, 4)),
        label_l=torch.tensor([[list(label_l)]]), label_u=torch.tensor([[list(label_u)]]),
        prob_l=as_map(prob_l),
        prob_u=as_map([(0.25, 0.25, 0.25, 0.25), (0.4, 0.3, 0.05, 0.25)]),
        low_u=torch.tensor([[[True, False]]]), high_u=torch.tensor([[[False, True]]]))


def bank_with(**queues):
    bank = MemoryBank([50000, 30000, 30000, 30000], 2, dtype=D64)
    for c, rows in queues.items():
        bank.queues[int(c[1:])] = torch.tensor(rows, dtype=D64).view(-1, 2)
    return bank


def c4_loss(bank, mode="reference", **kw):
    return unreliable_contrastive_loss(**c4_inputs(**kw), bank=bank, mode=mode,
                                       num_queries=2, num_negatives=3, temperature=0.5)


def test_c4_reference_loss_and_queues():
    bank = bank_with(q0=[(-1, 0)], q1=[(1, 1)])
    loss, stats = c4_loss(bank)
    t0 = math.log(1 + 3 * math.exp((-1 - math.sqrt(0.5)) / 0.5))
    t1 = math.log(1 + 3 * math.exp((math.sqrt(0.5) - 1) / 0.5))
    assert t0 == pytest.approx(0.0941339, abs=1e-7) and t1 == pytest.approx(0.9820799, abs=1e-7)
    assert float(loss) == pytest.approx(0.5381069, abs=1e-6)
    assert stats.pushed == [0, 0, 1, 0] and stats.valid_classes == [0, 1]
    assert bank.queues[2].tolist() == [[3.0, 4.0]]
    assert bank.lengths() == [1, 1, 1, 0]


def test_c4_gradient_flows_to_anchors_only():
    inputs = c4_inputs()
    loss, _ = unreliable_contrastive_loss(**inputs, bank=bank_with(q0=[(-1, 0)], q1=[(1, 1)]),
                                          num_queries=2, num_negatives=3)
    loss.backward()
    grad = inputs["rep"].grad                   # [2, D, 1, 2]: image, feature, row, pixel
    assert grad[0].abs().sum() > 0, "the labelled anchors get a gradient"
    assert grad[1].abs().sum() == 0, "unlabelled pixels are not anchors here"
    assert inputs["rep_teacher"].grad is None


def test_c4_index_mismatch_quirk():
    kw = dict(label_l=(0, 2), label_u=(0, 3), prob_l=((0.7, 0.1, 0.1, 0.1),
                                                     (0.1, 0.2, 0.6, 0.1)))
    loss, stats = c4_loss(bank_with(q0=[(-1, 0)], q2=[(1, 1)]), **kw)
    assert stats.valid_classes == [0, 2]
    assert float(loss) == pytest.approx(0.0470669, abs=1e-6)   # term0 / 2; k=1 -> class 1
    loss, _ = c4_loss(bank_with(q2=[(1, 1)]), **kw)
    assert float(loss) == 0.0
    # the paper mode loops over the valid class ids: class 2 anchors against queue 2
    loss, _ = c4_loss(bank_with(q0=[(-1, 0)], q2=[(1, 1)]), mode="paper", **kw)
    assert float(loss) > 0.0471


def test_c4_one_valid_class_is_zero():
    loss, stats = c4_loss(bank_with(q0=[(-1, 0)], q1=[(1, 1)]), label_l=(0, 0),
                          label_u=(0, 3))
    assert float(loss) == 0.0 and len(stats.valid_classes) == 1


C5_PROB_L = ((0.7, 0.15, 0.1, 0.05), (0.12, 0.6, 0.2, 0.08))


@pytest.mark.parametrize("mode,expected", [
    ("paper", [[(0, 2)], [(1, 0)], [(1, 0), (0, 2), (3, 4)], []]),
    ("reference", [[], [], [(3, 4)], []]),
])
def test_c5_negative_rules(mode, expected):
    bank = bank_with()
    c4_loss(bank, mode=mode, prob_l=C5_PROB_L)
    assert [[tuple(r) for r in q.tolist()] for q in bank.queues] == expected


def test_ranks_and_negative_window():
    prob = as_map([(0.4, 0.3, 0.05, 0.25)])
    assert class_ranks(prob)[0, :, 0, 0].tolist() == [0, 1, 3, 2]
    neg = negative_masks(label_onehot(torch.tensor([[[255]]]), 4),
                         label_onehot(torch.tensor([[[2]]]), 4), prob, prob,
                         torch.tensor([[[True]]]), mode="paper", low_rank=3, high_rank=4)
    assert neg[0].sum() == 0, "an ignored labelled pixel is never a negative"
    assert neg[1, :, 0, 0].tolist() == [False, False, True, False]


def test_memory_bank_fifo_and_state():
    bank = MemoryBank([3, 2], 1)
    bank.push([torch.tensor([[1.0], [2.0]]), torch.zeros(0, 1)])
    bank.push([torch.tensor([[3.0], [4.0]]), torch.tensor([[5.0], [6.0], [7.0]])])
    assert bank.queues[0].flatten().tolist() == [2.0, 3.0, 4.0]   # the newest kept
    assert bank.queues[1].flatten().tolist() == [6.0, 7.0]
    other = MemoryBank([3, 2], 1)
    other.load_state_dict(bank.state_dict())
    assert [q.tolist() for q in other.queues] == [q.tolist() for q in bank.queues]
    with pytest.raises(ValueError, match="queue sizes"):
        MemoryBank([3, 3], 1).load_state_dict(bank.state_dict())


# ----------------------------------------------------------------------------- C6 - C11
def test_c7_poly_lr_with_head_multiplier():
    policy = PolyLR(0.001, 0.9, 45600)
    assert policy.get_lr(0) == 0.001
    assert policy.get_lr(22800) == pytest.approx(0.001 * 0.5358867, rel=1e-7)
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([dict(params=[w], lr_mult=1.0),
                           dict(params=[torch.nn.Parameter(torch.zeros(1))], lr_mult=10.0)],
                          lr=0.001)
    set_lr([opt], policy.get_lr(22800))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [0.001 * 0.5358867, 0.01 * 0.5358867], rel=1e-7)


@pytest.mark.parametrize("min_kept,expected", [(2, 1.933390), (4, 1.509929),
                                               (100, 1.226928)])
def test_c8_ohem(min_kept, expected):
    logits = as_map([(3, 0, 0), (0.5, 0, 0), (0, 2, 0), (0, 0, 0.2), (1, 1, 1), (0, 0, 4)])
    label = torch.tensor([[[0, 0, 1, 2, 255, 0]]])
    loss = OhemCrossEntropy(255, 0.7, min_kept)(logits, label)
    assert float(loss) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("size,small,tail", [(513, 129, [497, 501, 505, 509]),
                                             (769, 193, [753, 757, 761, 765])])
def test_c9_nearest_downsampling(size, small, tail):
    cols = torch.arange(size).view(1, 1, size).expand(1, 2, size)
    picked = downsample_labels(cols, (2, small))[0, 0].tolist()
    assert picked[:4] == [0, 3, 7, 11] and picked[-4:] == tail


def test_c10_boxes():
    rng = np.random.RandomState(0)
    boxes = [half_box(rng, 513, 513) for _ in range(3)]
    assert [(w, h, x0, y0) for x0, y0, w, h in boxes] == [
        (429, 307, 47, 117), (449, 293, 9, 211), (278, 473, 36, 23)]
    rng = np.random.RandomState(1)
    for _ in range(200):
        x0, y0, w, h = half_box(rng, 513, 513)
        assert 257 <= w <= 512 and 257 <= h <= 512
        assert x0 + w <= 513 and y0 + h <= 513
        assert abs(w * h / 513 ** 2 - 0.5) <= w / (2 * 513 * 513)
    x0, y0, w, h = half_box(np.random.RandomState(2), 769, 769)
    assert 385 <= w <= 768


def test_c10_mix_with_next():
    imgs = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 4).clone()
    labels = torch.arange(3).view(3, 1, 1).expand(3, 4, 4).clone()
    boxes = [(1, 0, 2, 3), (0, 0, 4, 4), (0, 2, 1, 1)]
    mi, ml = mix_with_next(boxes, imgs, labels)
    assert ml[0].tolist() == [[0, 1, 1, 0]] * 3 + [[0, 0, 0, 0]]
    assert (ml[1] == 2).all() and ml[2, 2, 0] == 0 and ml[2].sum() == 2 * 15
    assert (mi[:, 0] == ml.to(mi.dtype)).all() and (mi[:, 1] == ml.to(mi.dtype)).all()
    single, = mix_with_next([(0, 0, 2, 2)], labels[:1])
    assert torch.equal(single, labels[:1]), "one image per batch mixes with itself"


def test_c11_weight_rule():
    assert contrastive_weights(None, 4) == (0.25, 1.0)
    assert contrastive_weights(0.1, 8) == (0.1, 0.1)


GLOO = r'''
import os, sys, json
import torch, torch.distributed as dist
from furnace.losses.contrastive import MemoryBank
from furnace.methods.u2pl import contrastive_weights
dist.init_process_group("gloo")
r, W = dist.get_rank(), dist.get_world_size()
bank = MemoryBank([4, 3, 3], 2)
# rank r pushes r+1 keys of class 0 (value 10r+i), none of class 1, and 2 keys of class 2
k0 = torch.tensor([[10. * r + i, -1.] for i in range(r + 1)])
k2 = torch.tensor([[100. + r, 0.], [200. + r, 0.]])
bank.push([k0, torch.zeros(0, 2), k2])
bank.push([torch.tensor([[50. + r, 5.]]), torch.zeros(0, 2), torch.zeros(0, 2)])
# C11: local loss sum(w * x), x = (1, 1) on rank 0 and (2, 2) on rank 1
w = torch.tensor([1., 2.], requires_grad=True)
x = torch.full((2,), float(r + 1))
local = (w * x).sum()
gw, lw = contrastive_weights(None, W)
(gw * local).backward()
logged = (lw * local).detach().clone()
dist.all_reduce(logged)
out = dict(queues=[q.tolist() for q in bank.queues], grad=w.grad.tolist(),
           logged=logged.item() / W)
with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
'''


def test_gloo_two_processes_gather_keys_and_c11(tmp_path):
    script = tmp_path / "gloo_bank.py"
    script.write_text(GLOO)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(script), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    import json
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["queues"] == r1["queues"], "every rank holds the same queues"
    # rank order, then FIFO: [0, 10, 11] then 50, 51 -> newest 4 kept
    assert r0["queues"][0] == [[10.0, -1.0], [11.0, -1.0], [50.0, 5.0], [51.0, 5.0]]
    assert r0["queues"][1] == []
    assert r0["queues"][2] == [[200.0, 0.0], [101.0, 0.0], [201.0, 0.0]]
    assert r0["grad"] == [0.5, 0.5] and r1["grad"] == [1.0, 1.0]
    assert r0["logged"] == 4.5 and r1["logged"] == 4.5


def test_gather_rows_without_process_group_is_identity():
    rows = [torch.ones(2, 3), torch.zeros(0, 3)]
    out = gather_rows(rows)
    assert out[0] is rows[0] and out[1] is rows[1]
