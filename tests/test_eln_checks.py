"""The numeric checks T1-T8 of spec methods/ELN.md 9.2 (values from running the reference,
float32, atol 1e-6) and the behaviours of its section 10 (window draws, gate ties, empty
terms)."""
import math
import random

import pytest
import torch
from torch import nn

from furnace.losses.eln import (IGNORE, class_contrastive, draw_windows, eln_bce,
                                eln_loss, eln_pseudo_labels, eln_target,
                                filtered_pseudo_ce, gated_aux_loss, pixel_contrastive)
from furnace.models.eln import (ELNDecoder, ELNSegNet, ErrorLocalizationNet, count_tensors,
                                eln_input, upsample)

ATOL = 1e-6


def _k(h, w):
    return torch.arange(h * w, dtype=torch.float64).reshape(h, w)


def t1_inputs():
    label = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1], [255, 2, 2, 1], [0, 0, 255, 1]])[None]
    k = _k(4, 4)
    pred = torch.stack([3 * torch.cos(c + k) for c in range(3)])[None].float()
    z = (2 * torch.sin(k))[None, None].float()
    return label, pred, z


# -- T1 ---------------------------------------------------------------------------------
def test_t1_eln_target_and_balanced_bce():
    label, pred, z = t1_inputs()
    assert pred.argmax(1)[0].tolist() == [[0, 0, 0, 2], [2, 1, 0, 0], [0, 2, 2, 2],
                                          [1, 0, 0, 2]]
    t = eln_target(pred, label)
    assert t[0].tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 0, 0]]
    assert int(t.sum()) == 5 and int((t == 0).sum()) == 11
    loss = eln_loss(z, pred, label)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - 0.50727844) < ATOL


def test_t1_no_error_pixel_raises_or_unit_weight():
    z = torch.zeros(1, 1, 2, 2)
    t = torch.ones(1, 2, 2)
    with pytest.raises(ZeroDivisionError):
        eln_bce(z, t)
    assert abs(eln_bce(z, t, "unit").item() - math.log(2)) < ATOL
    # n1 = 0: the error pixels weigh 0
    assert eln_bce(z, torch.zeros(1, 2, 2)).item() == 0.0


def test_t1_error_weight_scales_the_gradient():
    label, pred, z = t1_inputs()
    z = z.clone().requires_grad_(True)
    eln_loss(z, pred, label).backward()
    t = eln_target(pred, label)[0]
    g_plain = (torch.sigmoid(z.detach()[0, 0]) - t) / 16
    w = torch.where(t == 1, 1.0, 5 / 11)
    assert torch.allclose(z.grad[0, 0], g_plain * w, atol=1e-7)


# -- T2 ---------------------------------------------------------------------------------
def test_t2_filtered_pseudo_ce():
    label, teacher, z = t1_inputs()
    k = _k(4, 4)
    student = torch.stack([2 * torch.sin(2 * c + k) for c in range(3)])[None].float()
    pseudo, keep, _ = eln_pseudo_labels(teacher, z)
    assert keep[0].long().tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 1]]
    assert pseudo[0].tolist() == [[255, 0, 0, 2], [255, 255, 255, 0], [0, 2, 255, 255],
                                  [255, 0, 0, 2]]
    assert abs(filtered_pseudo_ce(student, pseudo).item() - 0.49104941) < ATOL
    none = torch.full_like(pseudo, IGNORE)
    assert math.isnan(filtered_pseudo_ce(student, none).item())
    s = student.clone().requires_grad_(True)
    zero = filtered_pseudo_ce(s, none, empty="zero")
    assert zero.item() == 0.0
    zero.backward()
    assert s.grad is not None and s.grad.abs().sum() == 0


def test_t2_zero_logit_is_dropped():
    t = torch.zeros(1, 2, 1, 2)
    z = torch.tensor([[[[0.0, 1e-6]]]])
    pseudo, keep, _ = eln_pseudo_labels(t, z)
    assert keep[0].tolist() == [[False, True]]
    assert pseudo[0].tolist() == [[255, 0]]
    # from fp16 (the reference's autocast) a tiny positive logit rounds to "error" too
    _, keep16, _ = eln_pseudo_labels(t.half(), torch.tensor([[[[1e-4, 1e-2]]]]).half())
    assert keep16[0].tolist() == [[False, True]]


# -- T3 ---------------------------------------------------------------------------------
def t3_inputs():
    k = _k(32, 32)
    teacher = torch.stack([torch.stack([torch.cos(0.1 * k * (c + 1) + b) for c in range(4)])
                           for b in range(2)]).float()
    student = torch.stack([torch.stack([torch.sin(0.07 * k * (c + 1) + b) for c in range(4)])
                           for b in range(2)]).float()
    base = (k // 100).long() % 3
    labels = torch.stack([base, (base + 1) % 3])
    keep = (k.long() % 7 != 0)[None].expand(2, 32, 32)
    return teacher, student, labels, keep


def test_t3_pixel_contrastive():
    teacher, student, labels, keep = t3_inputs()
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    ratios = {}
    class_contrastive(teacher.detach(), student.detach(), keep, labels, 0.5, ratios)
    for c, n, r in ((0, 600, 1.0786672), (1, 619, 1.0375971), (2, 535, 1.1860030)):
        assert int(((labels == c) & keep).sum()) == n
        assert abs(ratios[c].item() - r) < ATOL
    rng = random.Random(0)
    windows = draw_windows(rng, 32, 32)
    assert windows == [(0, 0)] * 8
    assert rng.random() == random.Random(0).random()     # a 32 x 32 map draws nothing
    loss = pixel_contrastive(teacher.detach(), student, keep, labels, windows, 0.5)
    assert abs(loss.item() - 0.00189695135) < ATOL
    ref = sum(r / n for n, r in ((600, 1.0786672), (619, 1.0375971), (535, 1.1860030))) / 3
    assert abs(loss.item() - ref) < 1e-7
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_t3_float64_value():
    teacher, student, labels, keep = t3_inputs()
    loss = pixel_contrastive(teacher.double(), student.double(), keep, labels, [(0, 0)], 0.5)
    assert abs(loss.item() - 0.0018969513487) < 1e-10


def test_t3_teacher_gradient_comes_from_the_caller():
    # the function itself does not detach the anchors (section 10)
    teacher, student, labels, keep = t3_inputs()
    teacher.requires_grad_(True)
    pixel_contrastive(teacher, student, keep, labels, [(0, 0)], 0.5).backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0


def test_windows_draw_order_and_bounds():
    rng = random.Random(7)
    win = draw_windows(rng, 40, 50, count=8)
    ref = random.Random(7)
    assert win == [(ref.randint(0, 8), ref.randint(0, 18)) for _ in range(8)]
    with pytest.raises(ValueError, match="do not fit"):
        draw_windows(random.Random(0), 31, 64)
    # h == 32 but w > 32 still draws both coordinates
    rng = random.Random(3)
    ref = random.Random(3)
    assert draw_windows(rng, 32, 40, count=2) == [(ref.randint(0, 0), ref.randint(0, 8))
                                                   for _ in range(2)]


def test_empty_contrastive_is_float_zero():
    teacher, student, labels, keep = t3_inputs()
    none = torch.zeros_like(keep)
    out = pixel_contrastive(teacher, student, none, labels, [(0, 0)] * 8, 0.5)
    assert out == 0.0 and isinstance(out, float)


# -- T4 ---------------------------------------------------------------------------------
def test_t4_eln_input_builder():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 8, 8)
    logits = torch.randn(2, 5, 2, 2)
    x = eln_input(image, logits)
    assert x.shape == (2, 3 + 1 + 5, 8, 8)
    assert torch.equal(x[:, :3], image)
    up = nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=True)
    assert (x[:, 4:] - up).abs().max().item() == 0
    flat = torch.tensor([0.0, 1.0, 2.0]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2)
    e = eln_input(torch.zeros(1, 3, 4, 4), flat)[:, 3]
    assert torch.allclose(e, torch.full_like(e, 0.83239555), atol=ATOL)


@pytest.mark.parametrize("size,out", [((505, 505), (127, 127)), ((64, 96), (16, 24))])
def test_t4_eln_output_size(size, out):
    with torch.device("meta"):
        eln = ErrorLocalizationNet(21, width=8, inner=16).eval()
        z = eln(torch.zeros(1, 3, *size), torch.zeros(1, 21, 5, 5))
    assert tuple(z.shape) == (1, 1) + out


# -- T5 ---------------------------------------------------------------------------------
def test_t5_auxiliary_gate():
    enc = nn.Conv2d(1, 1, 1)
    aux = [nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)]
    x = torch.ones(1, 1, 1, 1)
    feat = enc(x).detach()
    outs = [a(feat).sum() for a in aux]
    # scale each output to the spec's loss values while keeping the graph
    losses = [o * 0 + v for o, v in zip(outs, (1.2, 2.4))]
    total, gates = gated_aux_loss(losses, torch.tensor(0.05), (20, 50))
    assert gates == [True, False]
    assert abs(float(total.detach()) - 1.2) < ATOL
    total.backward()
    assert enc.weight.grad is None
    assert aux[1].weight.grad is None or aux[1].weight.grad.abs().sum() == 0
    assert aux[0].weight.grad is not None


def test_gate_tie_opens_and_closed_is_int_zero():
    sup = torch.tensor(0.5)
    total, gates = gated_aux_loss([torch.tensor(10.0)], sup, (20,))
    assert gates == [True] and float(total) == 10.0
    total, gates = gated_aux_loss([torch.tensor(9.0), torch.tensor(1.0)], sup, (20, 50))
    assert gates == [False, False] and total == 0 and type(total) is int


# -- T7 and T8 (parameter counts and shapes of the reference sizes, on the meta device) --
def test_t8_shapes_resnet101_voc():
    with torch.device("meta"):
        net = ELNSegNet(21, "resnet101").eval()
        eln = ErrorLocalizationNet(21).eval()
        x = torch.zeros(1, 3, 505, 505)
        high, low = net.features(x)
        logits, emb = net(x, raw=True)
        z = eln(x, logits)
        x2 = torch.zeros(1, 3, 512, 1024)
        logits2, _ = net(x2, raw=True)
        z2 = eln(x2, logits2)
    assert tuple(high.shape) == (1, 2048, 32, 32)
    assert tuple(low.shape) == (1, 256, 127, 127)
    assert tuple(logits.shape) == (1, 21, 127, 127)
    assert tuple(emb.shape) == (1, 128, 127, 127)
    assert tuple(z.shape) == (1, 1, 127, 127)
    assert tuple(logits2.shape[-2:]) == (128, 256) and tuple(z2.shape[-2:]) == (128, 256)


def test_t7_tensor_counts():
    with torch.device("meta"):
        net = ELNSegNet(21, "resnet101")
        eln = ErrorLocalizationNet(21)
        dec = ELNDecoder(21, 256, 2048)
    assert count_tensors([net.encoder]) == {"conv": 104, "bn": 208}
    assert count_tensors([dec])["conv"] == 19 and count_tensors([dec])["bn"] == 16
    assert len(list(eln.parameters())) == 139
    assert sum(p.numel() for p in eln.parameters()) == pytest.approx(26.91e6, rel=1e-3)
    assert sum(p.numel() for p in dec.parameters()) == pytest.approx(17.07e6, rel=1e-3)
    assert sum(p.numel() for p in net.encoder.parameters()) == pytest.approx(42.50e6,
                                                                            rel=1e-3)
    # ELN layer4: stride 1, no dilation
    assert all(m.dilation == (1, 1) for m in eln.backbone.layer4.modules()
               if isinstance(m, nn.Conv2d))
    # main layer4: multi-grid 2, 4, 8
    assert [b.conv2.dilation[0] for b in net.encoder.layer4] == [2, 4, 8]


def test_upsample_is_identity_at_same_size():
    x = torch.randn(1, 2, 4, 4)
    assert torch.equal(upsample(x, (4, 4)), x)
