"""Invariants, options, dtypes, devices and error handling of furnace.losses."""
import logging
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import furnace.losses.aleatoric as aleatoric_mod
import furnace.losses.energy as energy_mod
from furnace.losses import (CITYSCAPES_CLASS_WEIGHTS, AleatoricLoss, OhemCrossEntropy,
                            cross_entropy, energy_term, label_and_confidence, pseudo_labels,
                            unsup_ce)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import literal  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(B=2, C=5, H=6, W=7, seed=0, dtype=torch.float64, p_ignore=0.2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(B, C, H, W, generator=g, dtype=dtype)
    var = F.softplus(torch.randn(B, 1, H, W, generator=g, dtype=dtype))
    y = torch.randint(0, C, (B, H, W), generator=g)
    y[torch.rand(B, H, W, generator=g) < p_ignore] = 255
    return z.to(device), var.to(device), y.to(device)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.fixture
def one_thread():
    """Many tiny calls: one thread (OpenMP hand-offs dominate on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- aleatoric
def naive_aleatoric(z, var, y, noise, per_pixel=False, learn_variance=False):
    """Straightforward autograd version (all T graphs alive) with injected noise [T,B,C,H,W]."""
    T = noise.shape[0]
    if learn_variance:
        sig = torch.sqrt(var) + 1e-15
        perts = [sig * (noise[t] / sig.detach()) for t in range(T)]
    else:
        perts = [noise[t] for t in range(T)]
    if per_pixel:
        valid = y != 255
        l0 = F.cross_entropy(z, y, ignore_index=255, reduction="none")
        ms = [-F.elu(l0 - F.cross_entropy(z + n, y, ignore_index=255, reduction="none"))
              for n in perts]
        M = torch.stack(ms).mean(0)
        ce = ((1 + M) * l0)[valid].sum() / valid.sum()
    else:
        L0 = F.cross_entropy(z, y, ignore_index=255)
        ms = [-F.elu(L0 - F.cross_entropy(z + n, y, ignore_index=255)) for n in perts]
        ce = L0 + torch.stack(ms).mean() * L0
    return ce + (var.exp() - 1).mean()


def hand_per_pixel(z, var, y, noise):
    """Per-pixel option written out pixel by pixel from the docstring formula (no autograd)."""
    B, C, H, W = z.shape
    T = noise.shape[0]
    num, nv = 0.0, 0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                c = int(y[b, i, j])
                if c == 255:
                    continue
                nv += 1
                l0 = -torch.log_softmax(z[b, :, i, j], 0)[c]
                Ms = 0.0
                for t in range(T):
                    lt = -torch.log_softmax(z[b, :, i, j] + noise[t, b, :, i, j], 0)[c]
                    d = float(l0 - lt)
                    Ms += -(d if d > 0 else math.expm1(d))
                num += (1 + Ms / T) * float(l0)
    return num / nv + float((var.exp() - 1).mean())


@pytest.fixture(params=["cpu", "cpu_valid_only", "device_path", "max_each", "all_valid",
                        "huge_noise"])
def al_path(request, monkeypatch):
    """Code paths of the aleatoric loop: CPU with injected noise (masks, shift by max_c z),
    CPU on the valid pixels only (the layout of the random draws), the path used off CPU
    (masks, per-sample max; forced on CPU here), the per-sample max on CPU, nothing ignored,
    and noise large enough that exp would overflow without the fallback (valid pixels only)."""
    if request.param in ("cpu_valid_only", "huge_noise"):
        monkeypatch.setattr(aleatoric_mod, "_COMPACT_INJECTED", True)
    if request.param == "device_path":
        monkeypatch.setattr(aleatoric_mod, "_syncs_ok", lambda device: False)
    if request.param == "max_each":
        monkeypatch.setattr(aleatoric_mod, "_CHECKED_SHIFT", False)
    return request.param


@pytest.mark.parametrize("per_pixel", [False, True])
@pytest.mark.parametrize("learn_variance", [False, True])
def test_aleatoric_matches_naive_autograd(per_pixel, learn_variance, al_path):
    z, var, y = make(seed=1, p_ignore=0.0 if al_path == "all_valid" else 0.2)
    noise = torch.sqrt(var).unsqueeze(0) * torch.randn(4, *z.shape, dtype=z.dtype,
                                                       generator=torch.Generator().manual_seed(7))
    if al_path == "huge_noise":
        noise[1:3] *= 800.0                 # |noise| ~ 1e3: exp(1e3) overflows float64
    z1, v1, z2, v2 = leaf(z), leaf(var), leaf(z), leaf(var)
    ours = AleatoricLoss(samples=4, per_pixel=per_pixel, learn_variance=learn_variance)(
        z1, v1, y, noise=noise)
    ref = naive_aleatoric(z2, v2, y, noise, per_pixel, learn_variance)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-10, atol=1e-15)


def test_aleatoric_per_pixel_hand_formula():
    z, var, y = make(B=1, C=4, H=3, W=4, seed=2)
    noise = torch.randn(3, *z.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(3))
    ours = AleatoricLoss(samples=3, per_pixel=True)(z, var, y, noise=noise)
    assert abs(float(ours) - hand_per_pixel(z, var, y, noise)) < 1e-12


def test_aleatoric_var_grad_is_depressor_only():
    z, var, y = make(seed=3, dtype=torch.float32)
    v = leaf(var)
    torch.manual_seed(0)
    AleatoricLoss()(leaf(z), v, y).backward()
    torch.testing.assert_close(v.grad, var.exp() / var.numel(), rtol=1e-6, atol=0)


def test_aleatoric_learn_variance_gives_data_gradient():
    z, var, y = make(seed=4, dtype=torch.float32)
    v = leaf(var)
    torch.manual_seed(0)
    AleatoricLoss(learn_variance=True)(leaf(z), v, y).backward()
    data = v.grad - var.exp() / var.numel()
    ignored = (y == 255).unsqueeze(1)
    assert data[~ignored].abs().max() > 1e-4
    assert data[ignored].abs().max() < 1e-7       # ignored pixels only see the depressor


def test_aleatoric_noise_is_gaussian_with_std_sigma(one_thread):
    """The random draws are N(0, sigma^2), sigma = sqrt(var) + 1e-15, i.i.d. over classes and
    samples.  One valid pixel, two classes, T = 1, per-pixel mode: the loss is
    (1 + m) l0 + depressor with m = -ELU(l0 - l1) and l1 = softplus(z1 - z0 + n1 - n0), so every
    call reveals the noise difference delta = n1 - n0 ~ N(0, 2 sigma^2)."""
    var = torch.full((1, 1, 1, 1), 1.44, dtype=torch.float64)    # sigma = 1.2
    z = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    y = torch.zeros(1, 1, 1, dtype=torch.long)
    crit = AleatoricLoss(samples=1, per_pixel=True)
    l0 = math.log(2.0)
    dep = math.expm1(1.44)
    g = torch.Generator().manual_seed(3)
    deltas = []
    for _ in range(3000):
        m = (float(crit(z, var, y, generator=g)) - dep) / l0 - 1
        d = -m if m < 0 else math.log1p(-m)                      # ELU inverse
        deltas.append(math.log(math.expm1(l0 - d)))              # softplus inverse
    x = torch.tensor(deltas, dtype=torch.float64) / (math.sqrt(2.0) * 1.2)   # ~ N(0, 1)
    n = x.numel()
    assert abs(float(x.mean())) < 4 / math.sqrt(n)
    assert abs(float(x.std()) - 1) < 4 / math.sqrt(2 * n)
    assert abs(float((x ** 4).mean()) - 3) < 4 * math.sqrt(96 / n)   # kurtosis of a normal
    assert abs(float((x[1:] * x[:-1]).mean())) < 4 / math.sqrt(n)    # successive draws
    # Kolmogorov-Smirnov distance to the normal CDF (critical value 1.63/sqrt(n) at 1%)
    cdf = 0.5 * (1 + torch.erf(x.sort().values / math.sqrt(2)))
    k = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float(torch.maximum(k - cdf, cdf - (k - 1 / n)).max()) < 1.63 / math.sqrt(n)


def test_aleatoric_random_draws_agree_with_reference_in_distribution(one_thread):
    """Mean loss and gradient over many seeds: ours vs the literal reference formulation (it
    draws Normal(0, sigma).sample((C,)); we draw the same distribution in another order)."""
    z, var, y = make(B=2, C=5, H=8, W=9, seed=5, dtype=torch.float64)
    var = var * 3                                  # stronger noise, larger effect to resolve
    crit = AleatoricLoss(samples=10)
    vals = {"ours": [], "ref": []}
    grads = {"ours": [], "ref": []}
    for k in range(150):
        for name in vals:
            torch.manual_seed(k)
            zl = leaf(z)
            if name == "ours":
                out = crit(zl, var, y)
            else:
                out = literal.literal_aleatoric(zl, var, y, T=10, num_classes=5)
            out.backward()
            vals[name].append(float(out.detach()))
            grads[name].append(zl.grad)
    a, b = torch.tensor(vals["ours"]), torch.tensor(vals["ref"])
    se = math.sqrt((a.var() + b.var()) / a.numel())
    assert float(a.std()) > 1e-3                           # the noise does matter
    assert abs(float(a.mean() - b.mean())) < 4 * se
    ga, gb = torch.stack(grads["ours"]), torch.stack(grads["ref"])
    se_g = ((ga.var(0) + gb.var(0)) / ga.shape[0]).sqrt()
    assert float(((ga.mean(0) - gb.mean(0)).abs() - 5 * se_g).max()) < 1e-12


def test_aleatoric_overflow_fallback_redraws_same_noise(monkeypatch):
    """Huge variance: the shift by max_c z would overflow exp; the sample is redone with the
    same draw (generator state restored) and the per-sample max, so the result equals the
    always-per-sample-max computation and the stream stays in step."""
    z, var, y = make(seed=27, dtype=torch.float32)
    var = var * 1e4                                         # sigma ~ 100
    out = {}
    for checked in (True, False):
        monkeypatch.setattr(aleatoric_mod, "_CHECKED_SHIFT", checked)
        zl = leaf(z)
        g = torch.Generator().manual_seed(4)
        loss = AleatoricLoss()(zl, var, y, generator=g)    # inf: exp(var) in the depressor
        loss.backward()
        assert torch.isfinite(zl.grad).all()                # the CE part is finite
        out[checked] = (zl.grad, torch.randn(3, generator=g))
    assert out[True][0].abs().max() > 0
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-9)
    assert torch.equal(out[True][1], out[False][1])        # same number of draws


def test_aleatoric_reproducible():
    z, var, y = make(seed=6, dtype=torch.float32)
    crit = AleatoricLoss()
    torch.manual_seed(11)
    a = crit(z, var, y)
    b = crit(z, var, y)
    torch.manual_seed(11)
    assert torch.equal(crit(z, var, y), a)
    assert not torch.equal(a, b)
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    assert torch.equal(crit(z, var, y, generator=g1), crit(z, var, y, generator=g2))


def test_aleatoric_memory_independent_of_T():
    """Only the [B,C,H,W] gradient is kept for backward, whatever T (reference: T+1 graphs)."""
    z, var, y = make(seed=7, dtype=torch.float32)

    def saved_bytes(T):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            AleatoricLoss(samples=T)(leaf(z), leaf(var), y)
        return sum(total)
    assert saved_bytes(2) == saved_bytes(20) <= 2 * z.numel() * z.element_size()


def test_aleatoric_ignored_pixels_do_not_matter():
    z, var, y = make(seed=8)
    noise = torch.randn(3, *z.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(1))
    ign = (y == 255).unsqueeze(1).expand_as(z)
    z2 = z.clone()
    z2[ign] = 100.0
    crit = AleatoricLoss(samples=3)
    zl = leaf(z)
    a = crit(zl, var, y, noise=noise)
    torch.testing.assert_close(a, crit(z2, var, y, noise=noise), rtol=1e-14, atol=0)
    a.backward()
    assert zl.grad[ign].abs().max() == 0


def test_aleatoric_all_ignored_and_no_grad():
    z, var, y = make(seed=9, dtype=torch.float32)
    y255 = torch.full_like(y, 255)
    out = AleatoricLoss()(z, var, y255)
    torch.testing.assert_close(out, (var.exp() - 1).mean())     # reference: NaN
    torch.manual_seed(1)
    with torch.no_grad():
        a = AleatoricLoss()(leaf(z), var, y)
    torch.manual_seed(1)
    torch.testing.assert_close(a, AleatoricLoss()(leaf(z), var, y).detach())


def test_aleatoric_bf16_and_errors():
    z, var, y = make(seed=10, dtype=torch.float32)
    zb, vb = leaf(z.bfloat16()), leaf(var.bfloat16())
    out = AleatoricLoss()(zb, vb, y)
    assert out.dtype == torch.float32
    out.backward()
    assert zb.grad.dtype == torch.bfloat16 and vb.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="var must be"):
        AleatoricLoss()(z, var[:, 0], y)
    with pytest.raises(ValueError, match="noise must be"):
        AleatoricLoss(samples=3)(z, var, y, noise=torch.zeros(2, *z.shape))
    bad = y.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match="outside"):
        AleatoricLoss()(z, var, bad)


# ----------------------------------------------------------------------------- energy
def test_energy_matches_literal_and_drops_zeros():
    z, _, y = make(seed=11)
    z[0, :, 0, 0] = torch.tensor([-900.0, 0, 0, 0, 0])          # p = 0.0 exactly
    y[0, 0, 0] = 0
    z1, z2 = leaf(z), leaf(z)
    e1 = energy_term(F.softmax(z1, 1), y)
    e2 = literal.literal_energy(F.softmax(z2, 1), y, 5)
    torch.testing.assert_close(e1, e2, rtol=1e-13, atol=0)
    e1.backward()
    e2.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-12, atol=1e-16)


def test_energy_bad_labels_raise():
    z, _, y = make(seed=12)
    y[0, 1, 1] = 5                                  # == C
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        energy_term(F.softmax(z, 1), y)
    y[0, 1, 1] = -1
    with pytest.raises(ValueError):
        energy_term(F.softmax(z, 1), y)
    with pytest.raises(ValueError, match="integer"):
        energy_term(F.softmax(z, 1), y.double())


def test_energy_empty_selection(monkeypatch):
    monkeypatch.setattr(energy_mod, "_warned_empty", False)
    z, _, y = make(seed=13)
    zl = leaf(z)
    with pytest.warns(RuntimeWarning, match="no pixel selected"):
        e = energy_term(F.softmax(zl, 1), torch.full_like(y, 255))
    assert float(e.detach()) == 0.0 and e.requires_grad
    e.backward()
    assert torch.isfinite(zl.grad).all() and zl.grad.abs().max() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # one-time: no second warning
        energy_term(F.softmax(z, 1), torch.full_like(y, 255))


# ----------------------------------------------------------------------------- OHEM / CE
def test_ohem_matches_literal_random():
    for seed, k in ((14, 30), (15, 5), (16, 1000), (17, 0)):
        z, _, y = make(B=2, C=19, H=8, W=9, seed=seed)
        z1, z2 = leaf(z), leaf(z)
        ours = OhemCrossEntropy(min_kept=k, weight=CITYSCAPES_CLASS_WEIGHTS)
        ref = literal.LiteralOhem(min_kept=k, use_weight=True)
        a, b = ours(z1, y), ref(z2, y)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        assert int(ours.last_kept) == ref.last_kept
        a.backward()
        b.backward()
        torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-10, atol=1e-15)


def test_ohem_keep_rule_and_min_kept_zero():
    z, _, y = make(B=2, C=5, H=10, W=10, seed=18)
    valid = y != 255
    crit = OhemCrossEntropy(min_kept=0)
    crit(z, y)
    assert int(crit.last_kept) == int(valid.sum())
    q = F.softmax(z, 1).gather(1, y.clamp(max=4).unsqueeze(1)).squeeze(1)
    q = torch.where(valid, q, torch.ones_like(q))
    k = 60
    tau = q.flatten().sort().values[k - 1]
    crit = OhemCrossEntropy(min_kept=k, thresh=0.3)
    crit(z, y)
    assert int(crit.last_kept) == int((valid & (q <= max(0.3, float(tau)))).sum())


def test_ohem_logs_labels_without_mining(caplog):
    z, _, y = make(seed=19)
    with caplog.at_level(logging.DEBUG, logger="furnace.losses.ohem"):
        OhemCrossEntropy(min_kept=10**6)(z, y)
    assert f"Labels: {int((y != 255).sum())}" in caplog.text


def test_ohem_ignore_and_errors():
    z, _, y = make(seed=20)
    zl = leaf(z)
    OhemCrossEntropy(min_kept=20)(zl, y).backward()
    assert zl.grad.permute(1, 0, 2, 3)[:, y == 255].abs().max() == 0
    with pytest.raises(ValueError, match="class weights"):
        OhemCrossEntropy(weight=CITYSCAPES_CLASS_WEIGHTS)(z, y)
    bad = y.clone()
    bad[0, 0, 0] = 9
    with pytest.raises(ValueError, match="outside"):
        OhemCrossEntropy()(z, bad)
    # all ignored: 0 with a zero gradient instead of the reference's NaN
    zl.grad = None
    out = cross_entropy(zl, torch.full_like(y, 255))
    assert float(out.detach()) == 0.0
    out.backward()
    assert zl.grad.abs().max() == 0


# ----------------------------------------------------------------------------- pseudo labels
def test_label_and_confidence_matches_argmax_softmax():
    t = 3 * torch.randn(2, 21, 9, 11, generator=torch.Generator().manual_seed(21))
    t[0, 3, 0, 0] = t[0, 7, 0, 0] = t[0, :, 0, 0].max() + 1     # tie: first index wins
    lab, conf = label_and_confidence(t)
    assert torch.equal(lab, t.argmax(1)) and int(lab[0, 0, 0]) == 3
    torch.testing.assert_close(conf, F.softmax(t, 1).amax(1))


def test_label_and_confidence_many_ties_nan_and_float64():
    # integer logits: ties at the maximum everywhere; argmax takes the first maximal class
    g = torch.Generator().manual_seed(28)
    for dtype in (torch.float32, torch.float64):
        t = torch.randint(0, 3, (2, 21, 7, 9), generator=g).to(dtype)
        lab, conf = label_and_confidence(t)
        assert torch.equal(lab, t.argmax(1))
        torch.testing.assert_close(conf, F.softmax(t, 1).amax(1), rtol=1e-12 if dtype ==
                                   torch.float64 else 1e-6, atol=0)
    t = torch.randn(1, 5, 2, 3, generator=g)
    t[0, :, 0, 0] = float("nan")                          # no maximum: class 0
    t[0, 3, 1, 2] = float("inf")
    lab, _ = label_and_confidence(t)
    assert int(lab[0, 0, 0]) == 0 and int(lab[0, 1, 2]) == 3
    assert torch.equal(lab[0, 0, 1:], t[0, :, 0, 1:].argmax(0))


def test_pseudo_labels_invariants():
    g = torch.Generator().manual_seed(22)
    t1 = 3 * torch.randn(2, 7, 12, 13, generator=g)
    t2 = t1 + 2 * torch.randn(2, 7, 12, 13, generator=g)
    pl = pseudo_labels(t1, t2)
    agree = pl.label1 == pl.label2
    assert (~agree).any() and agree.any()
    assert torch.equal(pl.inter == 255, ~agree)
    assert torch.equal(pl.inter[agree], pl.label1[agree])
    w = pl.class_weight
    assert abs(float(w.sum()) - 1) < 1e-5
    w1, w2 = w[pl.label1], w[pl.label2]
    assert torch.equal(pl.union, torch.where(w1 > w2, pl.label1, pl.label2))
    assert (w[pl.union] == torch.maximum(w1, w2)).all()
    wi = (pl.conf1 + pl.conf2) / 2
    assert torch.equal(pl.weight_inter, wi)
    assert torch.equal(pl.weight_union[agree], wi[agree])
    assert torch.equal(pl.weight_union[~agree],
                       torch.where(w1 > w2, pl.conf1, pl.conf2)[~agree])
    assert int(pl.confusion.sum()) == pl.label1.numel() + 7
    r = literal.literal_pseudo(t1, t2, 7)
    for k in ("label1", "label2", "inter", "union"):
        assert torch.equal(getattr(pl, k), r[k]), k
    torch.testing.assert_close(pl.class_weight, r["class_weight"], rtol=1e-14, atol=0)
    torch.testing.assert_close(pl.weight_union, r["weight_union"])
    assert abs(float(pl.overlap) - r["overlap"]) < 1e-15


def test_pseudo_labels_detached_and_bf16():
    t1 = torch.randn(1, 4, 5, 6, requires_grad=True)
    t2 = torch.randn(1, 4, 5, 6)
    pl = pseudo_labels(t1.bfloat16(), t2.bfloat16())
    assert not pl.conf1.requires_grad and pl.conf1.dtype == torch.float32
    assert pl.label1.shape == (1, 5, 6)                       # B=1 works


def test_unsup_ce_definition_and_ignore():
    z, _, y = make(seed=23)
    w = torch.rand(y.shape, dtype=z.dtype, generator=torch.Generator().manual_seed(1))
    z1, z2 = leaf(z), leaf(z)
    a = unsup_ce(z1, y, w)
    b = (F.cross_entropy(z2, y, ignore_index=255, reduction="none") * w).mean()
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    a.backward()
    b.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-12, atol=1e-17)
    assert z1.grad.permute(1, 0, 2, 3)[:, y == 255].abs().max() == 0


# ----------------------------------------------------------------------------- devices
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_losses_run_b1(device, dtype):
    z, var, y = make(B=1, C=19, H=5, W=6, seed=24, dtype=torch.float32, device=device)
    zl, vl = leaf(z.to(dtype)), leaf(var.to(dtype))
    losses = [
        AleatoricLoss()(zl, vl, y),
        energy_term(F.softmax(zl, 1), y),
        OhemCrossEntropy(min_kept=10, weight=CITYSCAPES_CLASS_WEIGHTS)(zl, y),
        cross_entropy(zl, y),
    ]
    pl = pseudo_labels(z, z + torch.randn_like(z))
    losses += [unsup_ce(zl, pl.inter, pl.weight_inter), unsup_ce(zl, pl.union, pl.weight_union)]
    for out in losses:
        assert out.dim() == 0 and out.dtype == torch.float32 and torch.isfinite(out)
    sum(losses).backward()
    assert zl.grad.dtype == dtype and torch.isfinite(zl.grad.float()).all()


def test_second_backward_through_same_graph_is_refused():
    # gradients are formed in place in the saved buffers; autograd's version check guards it
    z, var, y = make(seed=25)
    for fn in (lambda zl: AleatoricLoss(samples=2)(zl, var, y),
               lambda zl: OhemCrossEntropy(min_kept=5)(zl, y),
               lambda zl: unsup_ce(zl, y, torch.ones(y.shape, dtype=z.dtype))):
        zl = leaf(z)
        out = fn(zl)
        out.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="inplace"):
            out.backward()


def test_losses_under_cpu_autocast():
    z, var, y = make(B=1, C=6, H=5, W=6, seed=26, dtype=torch.float32)
    zl = leaf(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = zl * 1.0                                   # stays float32: mul is not autocast
        torch.manual_seed(0)
        a = AleatoricLoss()(zb, var, y)
        o = OhemCrossEntropy(min_kept=3)(zb, y)
    torch.manual_seed(0)
    torch.testing.assert_close(a, AleatoricLoss()(z, var, y))
    torch.testing.assert_close(o, OhemCrossEntropy(min_kept=3)(z, y))
    (a + o).backward()
    assert torch.isfinite(zl.grad).all()
