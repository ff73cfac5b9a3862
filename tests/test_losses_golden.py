"""furnace.losses against the golden vectors of the reference code (tests/golden/losses.npz).

Tolerances as golden/README.md section 3: scalars rtol 1e-10 (energy_f32 1e-6), float32-stored
gradients abs <= 1e-6 * max|g|, float64 probes rtol 1e-9 + atol 1e-15, labels exact.
The literal baseline of bench/literal.py is checked against the same vectors, so the benchmark
compares against a formulation that really is the reference.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from furnace.losses import (CITYSCAPES_CLASS_WEIGHTS, AleatoricLoss, OhemCrossEntropy,
                            cross_entropy, energy_term, pseudo_labels, unsup_ce)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import literal  # noqa: E402


@pytest.fixture(scope="module")
def gold(golden_dir):
    with np.load(golden_dir / "losses.npz") as f:
        return {k: f[k] for k in f.files}


def f64(a):
    return torch.from_numpy(np.asarray(a)).double()


def labels(a):
    return torch.from_numpy(np.asarray(a)).long()


def assert_scalar(got, want, rtol=1e-10):
    got = float(got.detach()) if isinstance(got, torch.Tensor) else float(got)
    assert abs(got - float(want)) <= rtol * abs(float(want)), (got, float(want))


def assert_grad(got, want, probe_idx=None, probe=None):
    got = got.detach().double().numpy()
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max()
    assert err <= 1e-6 * np.abs(want).max(), err
    if probe is not None:
        np.testing.assert_allclose(got.ravel()[probe_idx], probe, rtol=1e-9, atol=1e-15)


# ----------------------------------------------------------------------------- aleatoric
def test_aleatoric_golden(gold):
    z = f64(gold["z"]).requires_grad_()
    var = f64(gold["var"]).requires_grad_()
    y = labels(gold["y"])
    loss = AleatoricLoss(samples=10)(z, var, y, noise=torch.from_numpy(gold["noise"]))
    assert loss.dtype == torch.float64
    assert_scalar(loss, gold["al_loss"])
    loss.backward()
    assert_grad(z.grad, gold["al_dz"], gold["probe_idx_c21"], gold["al_dz__probe_f64"])
    np.testing.assert_allclose(var.grad.numpy(), gold["al_dvar"], rtol=1e-10, atol=0)


def test_aleatoric_golden_components(gold):
    # L0 is the plain CE (al_ce_calls[0] == ce_loss); the depressor is A minus the CE part
    z, var, y = f64(gold["z"]), f64(gold["var"]), labels(gold["y"])
    L = gold["al_ce_calls"]
    m = gold["al_m"]
    assert_scalar(cross_entropy(z, y), L[0])
    dep = float((var.exp() - 1).mean())
    assert_scalar(L[0] + m.mean() * L[0] + dep, gold["al_loss"])
    ce = AleatoricLoss()(z, var, y, noise=torch.from_numpy(gold["noise"])) - dep
    assert_scalar(ce, L[0] * (1 + m.mean()), rtol=1e-12)


def test_aleatoric_golden_float32_inputs(gold):
    z = torch.from_numpy(gold["z"]).requires_grad_()
    var = torch.from_numpy(gold["var"])
    loss = AleatoricLoss()(z, var, labels(gold["y"]), noise=torch.from_numpy(gold["noise"]))
    assert loss.dtype == torch.float32
    assert_scalar(loss, gold["al_loss"], rtol=2e-6)
    loss.backward()
    g = gold["al_dz"]
    assert np.abs(z.grad.numpy() - g).max() <= 2e-4 * np.abs(g).max()


def test_literal_aleatoric_golden(gold):
    z = f64(gold["z"]).requires_grad_()
    var = f64(gold["var"]).requires_grad_()
    loss = literal.literal_aleatoric(z, var, labels(gold["y"]), T=10, num_classes=21,
                                     noise=torch.from_numpy(gold["noise"]))
    assert_scalar(loss, gold["al_loss"])
    loss.backward()
    assert_grad(z.grad, gold["al_dz"], gold["probe_idx_c21"], gold["al_dz__probe_f64"])


# ----------------------------------------------------------------------------- energy
def _energy_with_count(z, y):
    """(E, #kept pixels, dE/dz): #kept = nonzero entries of dE/dprob (one per kept pixel)."""
    z = z.clone().requires_grad_()
    prob = F.softmax(z, 1)
    prob.retain_grad()
    e = energy_term(prob, y)
    e.backward()
    return e, int((prob.grad != 0).sum()), z.grad


def test_energy_golden_f64(gold):
    e, n, dz = _energy_with_count(f64(gold["z"]), labels(gold["y"]))
    assert e.dtype == torch.float64
    assert_scalar(e, gold["energy_f64_value"])
    assert n == int(gold["energy_f64_count"])
    assert_grad(dz, gold["energy_f64_dz"], gold["probe_idx_c21"],
                gold["energy_f64_dz__probe_f64"])


def test_energy_golden_f32(gold):
    e, n, dz = _energy_with_count(torch.from_numpy(gold["z"]), labels(gold["y"]))
    assert e.dtype == torch.float32
    assert_scalar(e, gold["energy_f32_value"], rtol=1e-6)
    assert n == int(gold["energy_f32_count"])
    g = gold["energy_f64_dz"]                    # README: f32 grad within 1.2e-6 relative
    assert np.abs(dz.double().numpy() - g).max() <= 1e-5 * np.abs(g).max()


@pytest.mark.parametrize("prec", ["f32", "f64"])
def test_energy_golden_edge(gold, prec):
    z = f64(gold["energy_edge_z"])
    if prec == "f32":
        z = z.float()
    e, n, dz = _energy_with_count(z, labels(gold["energy_edge_y"]))
    assert_scalar(e, gold[f"energy_edge_{prec}_value"], rtol=1e-6 if prec == "f32" else 1e-10)
    assert n == int(gold[f"energy_edge_{prec}_count"])
    want = gold[f"energy_edge_{prec}_dz"]
    tol = 1e-6 * np.abs(want).max() if prec == "f32" else 1e-12 * np.abs(want).max()
    assert np.abs(dz.double().numpy() - want).max() <= tol


def test_literal_energy_golden(gold):
    z = f64(gold["z"]).requires_grad_()
    e = literal.literal_energy(F.softmax(z, 1), labels(gold["y"]), 21)
    assert_scalar(e, gold["energy_f64_value"])
    e.backward()
    assert_grad(z.grad, gold["energy_f64_dz"], gold["probe_idx_c21"],
                gold["energy_f64_dz__probe_f64"])


# ----------------------------------------------------------------------------- OHEM / CE
def _ohem_case(gold, case):
    z = f64(gold["z19"])
    y = labels(gold["y19"])
    if case == "raise":                          # z19c: +10 on the labelled class (exact)
        b, h, w = torch.nonzero(y != 255, as_tuple=True)
        z[b, y[b, h, w], h, w] += 10.0
    k = 100000 if case == "nomine" else 500
    return z, y, k


def test_ohem_class_weights_exact(gold):
    assert CITYSCAPES_CLASS_WEIGHTS.dtype == torch.float32
    np.testing.assert_array_equal(CITYSCAPES_CLASS_WEIGHTS.double().numpy(),
                                  gold["ohem_class_weight"])


@pytest.mark.parametrize("case", ["mine", "raise", "nomine"])
def test_ohem_golden(gold, case):
    z, y, k = _ohem_case(gold, case)
    z.requires_grad_()
    crit = OhemCrossEntropy(ignore_index=255, thresh=0.7, min_kept=k,
                            weight=CITYSCAPES_CLASS_WEIGHTS)
    loss = crit(z, y)
    assert_scalar(loss, gold[f"ohem_{case}_loss"])
    assert int(crit.last_kept) == int(gold[f"ohem_{case}_kept"])
    loss.backward()
    assert_grad(z.grad, gold[f"ohem_{case}_dz"], gold["probe_idx_c19"],
                gold[f"ohem_{case}_dz__probe_f64"])


@pytest.mark.parametrize("case", ["mine", "raise", "nomine"])
def test_literal_ohem_golden(gold, case):
    z, y, k = _ohem_case(gold, case)
    z.requires_grad_()
    crit = literal.LiteralOhem(ignore_label=255, thresh=0.7, min_kept=k, use_weight=True)
    loss = crit(z, y)
    assert_scalar(loss, gold[f"ohem_{case}_loss"])
    assert crit.last_kept == int(gold[f"ohem_{case}_kept"])
    loss.backward()
    assert_grad(z.grad, gold[f"ohem_{case}_dz"], gold["probe_idx_c19"],
                gold[f"ohem_{case}_dz__probe_f64"])


def test_ce_golden(gold):
    z, y = f64(gold["z"]), labels(gold["y"])
    assert_scalar(cross_entropy(z, y), gold["ce_loss"])
    assert_scalar(OhemCrossEntropy(min_kept=0)(z, y), gold["ce_loss"])
    zg = z.clone().requires_grad_()
    cross_entropy(zg, y).backward()
    zr = z.clone().requires_grad_()
    F.cross_entropy(zr, y, ignore_index=255).backward()
    torch.testing.assert_close(zg.grad, zr.grad, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- pseudo labels
@pytest.fixture(scope="module")
def pl_gold(gold):
    return pseudo_labels(f64(gold["pl_t1"]), f64(gold["pl_t2"]))


def test_pseudo_labels_golden(gold, pl_gold):
    pl = pl_gold
    for name, key in (("label1", "pl_ps_label_1"), ("label2", "pl_ps_label_2"),
                      ("inter", "pl_inter"), ("union", "pl_union")):
        t = getattr(pl, name)
        assert t.dtype == torch.int64
        np.testing.assert_array_equal(t.numpy(), gold[key].astype(np.int64), err_msg=name)
    np.testing.assert_array_equal(pl.confusion.numpy(), gold["pl_confusion"])
    assert pl.class_weight.dtype == torch.float64
    np.testing.assert_allclose(pl.class_weight.numpy(), gold["pl_w"], rtol=1e-12, atol=0)
    assert isinstance(pl.overlap, torch.Tensor)
    assert_scalar(pl.overlap, gold["pl_overlap"], rtol=1e-14)
    for name, key in (("conf1", "pl_loss_w_1"), ("conf2", "pl_loss_w_2"),
                      ("weight_inter", "pl_weight_inter"), ("weight_union", "pl_weight_union")):
        np.testing.assert_allclose(getattr(pl, name).numpy(), gold[key], rtol=1e-12, atol=0,
                                   err_msg=name)


def test_pseudo_labels_golden_tie(gold, pl_gold):
    pl = pl_gold
    w = pl.class_weight
    assert float(w[19]) == float(w[20])                         # the deliberate tie
    # (0,0,0): ps1=19, ps2=20 -> union 20 with loss_w_2; (0,0,1): ps1=20, ps2=19 -> 19
    assert (int(pl.label1[0, 0, 0]), int(pl.label2[0, 0, 0])) == (19, 20)
    assert int(pl.union[0, 0, 0]) == 20 and int(pl.union[0, 0, 1]) == 19
    assert float(pl.weight_union[0, 0, 0]) == float(pl.conf2[0, 0, 0])
    assert float(pl.weight_union[0, 0, 1]) == float(pl.conf2[0, 0, 1])


def test_unsup_ce_golden(gold, pl_gold):
    pl = pl_gold
    s1 = f64(gold["pl_s1"]).requires_grad_()
    s2 = f64(gold["pl_s2"]).requires_grad_()
    li = unsup_ce(s1, pl.inter, pl.weight_inter)
    lu = unsup_ce(s2, pl.union, pl.weight_union)
    assert_scalar(li, gold["pl_loss_inter"])
    assert_scalar(lu, gold["pl_loss_union"])
    (li + lu).backward()
    assert_grad(s1.grad, gold["pl_ds1"], gold["probe_idx_c21"], gold["pl_ds1__probe_f64"])
    assert_grad(s2.grad, gold["pl_ds2"], gold["probe_idx_c21"], gold["pl_ds2__probe_f64"])


def test_literal_pseudo_golden(gold):
    r = literal.literal_pseudo(f64(gold["pl_t1"]), f64(gold["pl_t2"]), 21)
    np.testing.assert_array_equal(r["union"].numpy(), gold["pl_union"].astype(np.int64))
    np.testing.assert_array_equal(r["inter"].numpy(), gold["pl_inter"].astype(np.int64))
    np.testing.assert_array_equal(r["confusion"], gold["pl_confusion"])
    np.testing.assert_allclose(r["class_weight"].numpy(), gold["pl_w"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(r["weight_union"].numpy(), gold["pl_weight_union"], rtol=1e-12)
    s1 = f64(gold["pl_s1"])
    assert_scalar(literal.literal_unsup_ce(s1, r["inter"], r["weight_inter"]),
                  gold["pl_loss_inter"])
