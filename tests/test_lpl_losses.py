"""LPL's losses against the unit checks of spec methods/LPL.md section 10.3 (A1, A2, B, C, E)
and the documented numerics of section 11 (NaN on overflow, positive absent log-probs)."""
import math

import pytest
import torch

from furnace.losses.lpl import (EPS, IoUTracker, cce_loss, class_aware_softmax,
                                multilabel_cls_loss, pct_loss, pct_weights, replace_with_gt,
                                restricted_argmax)

# --------------------------------------------------------------------------- A1 / A2

# spec 10.3 A1: C = 3, one image of 1 x 3 pixels, class 1 absent
A1_LOGITS = [(2.0, 5.0, 0.0), (-1.0, 0.5, 3.0), (1.0, 1.0, 1.0)]  # pixels a, b, c
A1_Y = (1, 0, 1)
A1_TARGET = (0, 2, 255)
A1_LOSS = 0.07252904174680651


def _a1_logits(dtype):
    z = torch.tensor(A1_LOGITS, dtype=torch.float64).T.reshape(1, 3, 1, 3)
    return z.to(dtype).contiguous().requires_grad_()


def _a1_closed_form():
    """CCE of spec 3.2 written out in Python floats: (probs, loss, grad) per pixel."""
    probs, losses, grads = [], [], []
    n_valid = sum(t != 255 for t in A1_TARGET)
    for z, t in zip(A1_LOGITS, A1_TARGET):
        e = [math.exp(v) for v in z]
        denom = sum(ec * yc for ec, yc in zip(e, A1_Y)) + EPS
        q = [ec / denom for ec in e]
        probs.append([qc * yc for qc, yc in zip(q, A1_Y)])
        if t == 255:
            grads.append([0.0] * 3)
            continue
        losses.append(-math.log(q[t] + EPS))
        factor = q[t] / (q[t] + EPS)
        # d/dz_c of -ln(q_t + eps) = -factor * (delta_tc - y_c q_c)
        grads.append([-factor * ((c == t) - A1_Y[c] * q[c]) / n_valid for c in range(3)])
    return probs, sum(losses) / n_valid, grads


def _run_a1(dtype):
    z = _a1_logits(dtype)
    prob, logq = class_aware_softmax(z, torch.tensor([A1_Y]))
    target = torch.tensor([[list(A1_TARGET)]])
    loss = cce_loss(logq, target)
    loss.backward()
    return prob, logq, loss, z.grad


def test_a1_float64_values_and_gradients():
    prob, _, loss, grad = _run_a1(torch.float64)
    probs, want_loss, want_grad = _a1_closed_form()
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(A1_LOSS, rel=1e-12, abs=0)
    assert loss.item() == pytest.approx(want_loss, rel=1e-12, abs=0)
    got_prob = prob.detach()[0, :, 0, :].T.tolist()
    got_grad = grad[0, :, 0, :].T.tolist()
    for p in range(3):
        assert got_prob[p] == pytest.approx(probs[p], rel=1e-12, abs=1e-300)
        assert got_grad[p] == pytest.approx(want_grad[p], rel=1e-12, abs=1e-300)
    # the spec's rounded numbers
    assert got_prob[0] == pytest.approx([0.88079603, 0, 0.11920278], abs=1e-8)
    assert got_prob[1] == pytest.approx([0.01798620, 0, 0.98201331], abs=1e-8)
    assert got_prob[2] == pytest.approx([0.49999908, 0, 0.49999908], abs=1e-8)
    assert got_grad[0] == pytest.approx([-0.05960131, 0, 0.05960071], abs=1e-8)
    assert got_grad[1] == pytest.approx([0.00899301, 0, -0.00899325], abs=1e-8)
    # the absent class and the ignored pixel get exactly zero gradient
    assert grad[0, 1].eq(0).all() and grad[0, :, 0, 2].eq(0).all()


def test_a1_restricted_argmax_ignores_absent_class_and_breaks_ties_low():
    prob, _, _, _ = _run_a1(torch.float64)
    labels = restricted_argmax(prob.detach())
    assert labels.dtype == torch.int64
    assert labels.tolist() == [[[0, 2, 0]]]  # a: class 1 has the top logit but is absent


def test_a1_float32():
    prob, _, loss, grad = _run_a1(torch.float32)
    probs, want_loss, want_grad = _a1_closed_form()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert loss.item() == pytest.approx(0.07252901, rel=1e-6)
    got_grad = grad[0, :, 0, :].T.tolist()
    for p in range(3):
        assert prob.detach()[0, :, 0, p].tolist() == pytest.approx(probs[p], rel=1e-6, abs=1e-9)
        assert got_grad[p] == pytest.approx(want_grad[p], rel=1e-5, abs=1e-9)
    assert grad[0, 1].eq(0).all()


def test_a1_differs_from_epsilon_free_ce():
    # The epsilons move the value by about -1e-5 (spec: 0.0725389695 without them).
    z = _a1_logits(torch.float64)
    _, logq = class_aware_softmax(z, torch.tensor([A1_Y]), stable=True)
    stable = cce_loss(logq, torch.tensor([[list(A1_TARGET)]]))
    assert stable.item() == pytest.approx(0.0725389695, rel=1e-9)
    assert stable.item() - A1_LOSS == pytest.approx(9.93e-6, rel=1e-2)


def test_a2_epsilon_cap_and_vanishing_gradient():
    z = torch.tensor([0.0, 40.0], dtype=torch.float64).reshape(1, 2, 1, 1).requires_grad_()
    _, logq = class_aware_softmax(z, torch.tensor([[1, 1]]))
    loss = cce_loss(logq, torch.zeros(1, 1, 1, dtype=torch.int64))
    loss.backward()
    assert loss.item() == pytest.approx(11.512925464969804, rel=1e-12)
    assert loss.item() == pytest.approx(math.log(1e5), rel=1e-9)
    assert z.grad.flatten().tolist() == pytest.approx([-4.2484e-13, 4.2484e-13], rel=1e-4)
    # without the epsilons (stable=True) the loss is the plain CE: 40 with gradient (-1, +1)
    z2 = z.detach().clone().requires_grad_()
    _, logq2 = class_aware_softmax(z2, torch.tensor([[1, 1]]), stable=True)
    loss2 = cce_loss(logq2, torch.zeros(1, 1, 1, dtype=torch.int64))
    loss2.backward()
    assert loss2.item() == pytest.approx(40.0, rel=1e-12)
    assert z2.grad.flatten().tolist() == pytest.approx([-1.0, 1.0], rel=1e-12)


# --------------------------------------------------------------------------- CCE behaviour

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_give_float32(dtype):
    z = torch.randn(2, 4, 3, 3).to(dtype)
    y = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]])
    prob, logq = class_aware_softmax(z, y[:, :, None, None])
    assert prob.dtype == logq.dtype == torch.float32
    ref_prob, ref_logq = class_aware_softmax(z.float(), y)
    assert torch.equal(prob, ref_prob) and torch.equal(logq, ref_logq)
    assert multilabel_cls_loss(z, y).dtype == torch.float32


def test_absent_classes_get_zero_gradient_random():
    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.tensor([[1, 0, 1, 0, 1], [1, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    prob, logq = class_aware_softmax(z, y)
    target = restricted_argmax(prob.detach())
    target[0, 0, 0] = 255
    cce_loss(logq, target).backward()
    absent = (y == 0)[:, :, None, None].expand_as(z)
    assert z.grad[absent].eq(0).all()
    assert z.grad[~absent].abs().sum() > 0
    assert prob.detach()[absent].eq(0).all()
    # the class-aware probabilities sum to S/(S + eps), S = sum of exp over present classes
    s = (z.detach().exp() * y[:, :, None, None]).sum(1)
    assert torch.allclose(prob.detach().sum(1), s / (s + EPS), rtol=1e-14, atol=0)


def test_overflow_gives_nan_by_default_and_stable_does_not():
    # spec 3.2 item 3 / section 11: exp overflows above ~88.7 in float32 (no max-subtraction);
    # an overflowing ABSENT class also gives NaN (inf * 0).
    # (present class 1 as the target: inf/inf; absent class 1: the denominator is inf * 0)
    for y, t in (([1, 1, 1], 1), ([1, 0, 1], 0)):
        z = torch.tensor([1.0, 100.0, 2.0]).reshape(1, 3, 1, 1).requires_grad_()
        prob, logq = class_aware_softmax(z, torch.tensor([y]))
        assert torch.isnan(prob).any() and torch.isnan(logq).any()
        loss = cce_loss(logq, torch.full((1, 1, 1), t, dtype=torch.int64))
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(z.grad).any()
    z = torch.tensor([1.0, 100.0, 2.0]).reshape(1, 3, 1, 1).requires_grad_()
    prob, logq = class_aware_softmax(z, torch.tensor([[1, 0, 1]]), stable=True)
    loss = cce_loss(logq, torch.full((1, 1, 1), 2, dtype=torch.int64))
    loss.backward()
    assert torch.isfinite(prob).all() and torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert prob[0, :, 0, 0].tolist() == pytest.approx([1 / (1 + math.e), 0, math.e / (1 + math.e)])
    assert restricted_argmax(prob).item() == 2
    assert z.grad[0, 1].item() == 0


def test_absent_log_probability_can_be_positive():
    # section 11: logq of absent classes is not masked; a dominant absent class has q > 1,
    # so a target outside the label set would give a negative loss.
    z = torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    _, logq = class_aware_softmax(z, torch.tensor([[1, 0, 1]]))
    assert logq[0, 1, 0, 0].item() == pytest.approx(math.log(math.exp(5) / (2 + EPS) + EPS))
    assert logq[0, 1, 0, 0].item() > 0
    assert cce_loss(logq, torch.ones(1, 1, 1, dtype=torch.int64)).item() < 0


def test_cce_reductions():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64)
    _, logq = class_aware_softmax(z, torch.ones(2, 3))
    target = torch.randint(0, 3, (2, 2, 3), generator=g)
    target[0, 1, :] = 255
    per_pixel = cce_loss(logq, target, reduction="none")
    assert per_pixel.shape == (2, 2, 3)
    assert per_pixel[0, 1].eq(0).all()
    want = -logq.gather(1, target.clamp(max=2)[:, None])[:, 0]
    valid = target != 255
    assert torch.allclose(per_pixel[valid], want[valid], rtol=1e-15, atol=0)
    mean = cce_loss(logq, target)
    assert mean.item() == pytest.approx(want[valid].mean().item(), rel=1e-14)
    # all pixels ignored: 0 with zero gradient instead of nll_loss's NaN
    zz = z.clone().requires_grad_()
    _, lq = class_aware_softmax(zz, torch.ones(2, 3))
    out = cce_loss(lq, torch.full((2, 2, 3), 255))
    out.backward()
    assert out.item() == 0 and zz.grad.eq(0).all()
    with pytest.raises(ValueError, match="reduction"):
        cce_loss(logq, target, reduction="sum")
    with pytest.raises(ValueError, match=r"target must be \[B,H,W\]"):
        cce_loss(logq, target[:, :1])


def test_label_shape_error():
    with pytest.raises(ValueError, match=r"image-level labels y must be \[B,C\]"):
        class_aware_softmax(torch.zeros(2, 3, 1, 1), torch.ones(2, 4))


# --------------------------------------------------------------------------- classification

def test_multilabel_cls_loss_matches_formula():
    g = torch.Generator().manual_seed(2)
    z = (2 * torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.float64)
    loss = multilabel_cls_loss(z, y[:, :, None, None])
    assert loss.dtype == torch.float64 and loss.dim() == 0
    s = z.detach().amax(dim=(2, 3)).tolist()
    y = y.tolist()
    terms = [-(y[i][c] * math.log(1 / (1 + math.exp(-s[i][c])))
               + (1 - y[i][c]) * math.log(1 - 1 / (1 + math.exp(-s[i][c]))))
             for i in range(3) for c in range(1, 4)]  # background (class 0) excluded
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    loss.backward()
    assert z.grad[:, 0].eq(0).all()  # no gradient to background
    # only the max pixel of each (image, class) receives gradient
    assert (z.grad[:, 1:] != 0).flatten(2).sum(-1).eq(1).all()


# --------------------------------------------------------------------------- E: replacement

def test_e_gt_replacement_per_image():
    pseudo = torch.tensor([[[1, 1], [2, 2]], [[3, 3], [3, 3]], [[0, 1], [2, 3]]])
    gt = torch.tensor([[[0, 255], [5, 5]], [[4, 4], [255, 255]], [[7, 7], [7, 7]]])
    is_labelled = torch.tensor([True, False, True])
    out = replace_with_gt(pseudo, gt, is_labelled)
    assert torch.equal(out[0], gt[0]) and torch.equal(out[2], gt[2])  # 255 kept
    assert torch.equal(out[1], pseudo[1])
    assert torch.equal(pseudo, torch.tensor([[[1, 1], [2, 2]], [[3, 3], [3, 3]],
                                             [[0, 1], [2, 3]]]))  # input untouched
    with pytest.raises(ValueError, match="is_labelled"):
        replace_with_gt(pseudo, gt, is_labelled[:2])


def test_e_strong_half_is_never_replaced():
    # spec 10.3 E in the order of one iteration: the weak half (index < N) is replaced in both
    # directions, the strong-half predictions the tracker reads are not.
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 3, 2, 2, generator=g)
    y = torch.ones(4, 3)
    gt = torch.tensor([[[0, 1], [2, 255]]] * 4)
    index_in_d, n_labelled, strong = torch.tensor([0, 7, 2, 9]), 5, 2
    labels = restricted_argmax(class_aware_softmax(z, y)[0])
    weak = replace_with_gt(labels[strong:], gt[strong:], index_in_d[strong:] < n_labelled)
    assert torch.equal(weak[0], gt[2])  # index 2 < N: its GT crop, 255 included
    assert torch.equal(weak[1], labels[3])  # index 9 >= N: the restricted argmax
    tracker = IoUTracker(3)
    tracker.update(gt[:strong], labels[:strong])  # strong half: raw predictions
    want = IoUTracker(3)
    want.update(gt[:strong], restricted_argmax(class_aware_softmax(z[:strong], y[:strong])[0]))
    assert torch.equal(tracker.iou(), want.iou())


# --------------------------------------------------------------------------- B: tracker

B1_GT = [0, 0, 0, 1, 1, 255, 255, 2]
B1_PRED = [0, 0, 1, 1, 0, 0, 3, 2]
B2_GT = [0, 0, 3, 3]
B2_PRED = [0, 3, 3, 3]


def _close(got, want, rel=1e-7):
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(list(want), rel=rel, abs=1e-12)


def test_b_tracker_and_weights_two_batches():
    tracker = IoUTracker(4, momentum=0.99)
    _close(tracker.T, [1, 1, 1, 1])
    _close(tracker.Pd, [0, 0, 0, 0])
    _close(tracker.I, [0, 0, 0, 0])
    tracker.update(torch.tensor([[B1_GT]]), torch.tensor([[B1_PRED]]))
    _close(tracker.T, [3.99, 2.99, 1.99, 0.99])
    _close(tracker.Pd, [4, 2, 1, 1])  # the two GT-255 pixels count as predictions of 0 and 3
    _close(tracker.I, [2, 1, 1, 0])
    iou = tracker.iou()
    _close(iou, [0.33388984, 0.25062659, 0.50251257, 0])
    assert iou[3].item() == 0.0
    y = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    w = pct_weights(iou, y)
    _close(w, [1.5567441e-5, 1.5446343e-4, 1.5446343e-4, 1.0])

    tracker.update(torch.tensor([[B2_GT]]), torch.tensor([[B2_PRED]]))
    _close(tracker.T, [5.9501, 2.9601, 1.9701, 2.9801])
    _close(tracker.Pd, [4.96, 1.98, 0.99, 3.99])
    _close(tracker.I, [2.98, 0.99, 0.99, 2.0])
    iou = tracker.iou()
    _close(iou, [0.37578341, 0.25062659, 0.50251251, 0.40240636])
    w = pct_weights(iou, y[:2, :, None, None])
    _close(w, [1.5567441e-5, 3.9764988e-4])
    # float32 arithmetic, exactly as the reference's in-place decay-and-add
    t = torch.ones(4)
    t *= 0.99
    t += torch.tensor([3.0, 2.0, 1.0, 0.0])
    t *= 0.99
    t += torch.tensor([2.0, 0.0, 0.0, 2.0])
    assert torch.equal(tracker.T, t)


def test_pct_weights_zero_iou_rule_and_gamma():
    iou = torch.tensor([0.5, 0.0, 0.9], dtype=torch.float64)
    y = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    w = pct_weights(iou, y, gamma=8.0)
    # present class 1 has IoU exactly 0 -> treated as 1 (quirk 2); no usable class -> 1
    assert w.dtype == torch.float64
    assert w.tolist() == pytest.approx([0.5 ** 8, 1.0, 0.5 ** 8], rel=1e-15)
    assert pct_weights(iou, y, gamma=1.0).tolist() == pytest.approx([0.5, 1.0, 0.5])


def test_tracker_reduce_hook_receives_counts_and_its_result_is_used():
    gt = torch.tensor([[B1_GT]])
    pred = torch.tensor([[B1_PRED]])
    seen = []

    def reduce(counts):
        seen.append(counts.clone())
        return counts * 2  # as if two ranks had the same batch

    tracker = IoUTracker(4)
    tracker.update(gt, pred, reduce=reduce)
    assert len(seen) == 1
    assert seen[0].dtype == torch.float32 and seen[0].shape == (3, 4)
    assert seen[0].tolist() == [[3, 2, 1, 0], [4, 2, 1, 1], [2, 1, 1, 0]]
    doubled = IoUTracker(4)
    doubled.update(torch.cat([gt, gt]), torch.cat([pred, pred]))
    assert torch.equal(tracker.state_dict()["T"], doubled.state_dict()["T"])
    assert torch.equal(tracker.iou(), doubled.iou())
    with pytest.raises(ValueError, match="reduce must return"):
        tracker.update(gt, pred, reduce=lambda c: c[:2])


def test_tracker_state_round_trip(tmp_path):
    tracker = IoUTracker(4, momentum=0.9)
    tracker.update(torch.tensor([[B1_GT]]), torch.tensor([[B1_PRED]]))
    state = tracker.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    path = tmp_path / "tracker.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    fresh = IoUTracker(4)
    fresh.load_state_dict(loaded)
    assert fresh.momentum == 0.9
    for key in ("T", "Pd", "I"):
        assert torch.equal(fresh.state_dict()[key], state[key])
    assert torch.equal(fresh.iou(), tracker.iou())
    # both continue identically
    for t in (tracker, fresh):
        t.update(torch.tensor([[B2_GT]]), torch.tensor([[B2_PRED]]))
    assert torch.equal(fresh.iou(), tracker.iou())
    # the saved state is a copy, not a view of the live state
    assert not torch.equal(state["T"], tracker.T)
    assert tracker.to("cpu") is tracker
    with pytest.raises(ValueError, match="another num_classes"):
        IoUTracker(5).load_state_dict(loaded)
    with pytest.raises(ValueError, match="lacks"):
        IoUTracker(4).load_state_dict({"T": loaded["T"]})


# --------------------------------------------------------------------------- C: L_pct

def test_c_pct_loss_divides_by_all_pixels():
    pixel_loss = torch.tensor([[[0.5, 1.0]], [[2.0, 0.0]]])  # second pixel of image 2 ignored
    weights = torch.tensor([0.5, 0.25])
    assert pct_loss(pixel_loss, weights).item() == pytest.approx(0.3125, rel=1e-7)
    # the same through cce_loss(reduction='none') with an ignored pixel
    logq = torch.log(torch.tensor([[[math.exp(-0.5), math.exp(-1.0)]],
                                   [[math.exp(-2.0), 1.0]]], dtype=torch.float64))[:, None]
    per_pixel = cce_loss(logq, torch.tensor([[[0, 0]], [[0, 255]]]), reduction="none")
    got = pct_loss(per_pixel, weights.double())
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(0.3125, rel=1e-12)
