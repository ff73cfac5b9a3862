"""Uncertainty quality: binned AUROC / AUPR / ECE against exact numpy versions, special
scorers, merging across processes, and the eval.py --uncertainty path."""
import contextlib
import io
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from helpers import free_port
from furnace.eval.uncertainty import (ECE_BINS, SCORES, UncertaintyMeter, binned_aupr,
                                      binned_auroc, format_uncertainty, js_divergence,
                                      softmax_scores)

# the eval.py fixtures (tiny VOC data, checkpoints) and the spawn-safe tiny model
from test_eval_cli import tiny_factory, voc_exp  # noqa: F401


# ----------------------------------------------------------------------------- exact versions

def exact_auroc(score, wrong):
    """Mann-Whitney AUROC with average ranks for ties (ties count 1/2)."""
    score, wrong = np.asarray(score, np.float64), np.asarray(wrong, bool)
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    P, N = wrong.sum(), (~wrong).sum()
    return (ranks[wrong].sum() - P * (P + 1) / 2) / (P * N)


def exact_ap(score, wrong):
    """Average precision, thresholds at the distinct scores from the top (sklearn's)."""
    score, wrong = np.asarray(score, np.float64), np.asarray(wrong, bool)
    order = np.argsort(-score, kind="mergesort")
    s, w = score[order], wrong[order]
    tp, fp = np.cumsum(w), np.cumsum(~w)
    last = np.r_[s[1:] != s[:-1], True]          # end of each group of equal scores
    tp, fp = tp[last], fp[last]
    recall = tp / wrong.sum()
    prec = tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * prec))


def exact_scores(logits, logits2, pred):
    """float64 entropy, 1 - p(pred), p(pred) and JS divergence; logits [C, N]."""
    def softmax(x):
        e = np.exp(x - x.max(0))
        return e / e.sum(0)
    p = softmax(logits.astype(np.float64))
    p2 = softmax(logits2.astype(np.float64))
    ent = -(p * np.log(np.maximum(p, 1e-300))).sum(0)
    conf = p[pred, np.arange(p.shape[1])]
    m = (p + p2) / 2

    def kl(a, b):
        return (a * (np.log(np.maximum(a, 1e-300)) - np.log(np.maximum(b, 1e-300)))).sum(0)
    return ent, 1 - conf, conf, 0.5 * (kl(p, m) + kl(p2, m))


def exact_ece(conf, correct, bins=ECE_BINS):
    b = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for k in range(bins):
        sel = b == k
        if sel.any():
            ece += sel.sum() / len(conf) * abs(correct[sel].mean() - conf[sel].mean())
    return ece


def _random_case(seed, C=6, B=2, H=30, W=40):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, H, W, generator=g) * 2.5
    logits2 = logits + torch.randn(B, C, H, W, generator=g)
    label = torch.randint(0, C, (B, H, W), generator=g)
    label[:, :4, :6] = 255                                   # ignored
    # the label agrees with the prediction more often where the softmax is confident and
    # the variance is low, so every score carries some signal
    var = torch.exp(torch.randn(B, 1, H, W, generator=g) * 2)
    conf = torch.softmax(logits, 1).max(1).values
    agree = torch.rand(B, H, W, generator=g) < 0.5 * conf + 0.5 / (1 + var[:, 0])
    label = torch.where(agree & (label != 255), logits.argmax(1), label)
    return logits, logits2, label, var


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("seed", [0, 1])
def test_binned_metrics_match_exact_within_binning_error(seed):
    logits, logits2, label, var = _random_case(seed)
    meter = UncertaintyMeter(6)
    meter.update(logits[0], var[0], label[0], logits2[0])    # [C, H, W] ...
    meter.update(logits[1:], var[1:], label[1:], logits2[1:])  # ... and a batch
    res = meter.compute()

    x = logits.permute(1, 0, 2, 3).reshape(6, -1).numpy()
    x2 = logits2.permute(1, 0, 2, 3).reshape(6, -1).numpy()
    lab = label.reshape(-1).numpy()
    keep = lab != 255
    x, x2, lab, v = x[:, keep], x2[:, keep], lab[keep], var.reshape(-1).numpy()[keep]
    pred = x.argmax(0)
    wrong = pred != lab
    assert res["pixels"] == keep.sum() == 2 * 30 * 40 - 2 * 24      # ignore left out
    assert res["wrong"] == wrong.sum() and 0.1 < wrong.mean() < 0.9
    ent, msp, conf, js = exact_scores(x, x2, pred)
    exact = {"variance": v, "entropy": ent, "1-msp": msp, "disagreement": js}
    assert set(res["scores"]) == set(SCORES)
    for name in SCORES:
        s = res["scores"][name]
        auroc, ap = exact_auroc(exact[name], wrong), exact_ap(exact[name], wrong)
        # the bound must be small for the comparison to mean anything
        assert s["auroc_err"] < 2e-3 and s["aupr_err"] < 5e-3, (name, s)
        assert abs(s["auroc"] - auroc) <= s["auroc_err"] + 1e-9, (name, s, auroc)
        assert s["aupr_lo"] - 1e-9 <= ap <= s["aupr_hi"] + 1e-9, (name, s, ap)
        assert abs(s["aupr"] - ap) <= s["aupr_err"] + 1e-9
        assert 0.52 < s["auroc"] < 1, name                 # scores carry signal here
    assert res["ece"] == pytest.approx(exact_ece(conf, ~wrong), abs=1e-6)
    rel = res["reliability"]
    assert rel["count"].sum() == res["pixels"] and len(rel["edges"]) == ECE_BINS + 1


def test_unbinned_ties_give_no_binning_error():
    """Scores on a few exact values: each value is its own bin, so the bound is exact."""
    rng = np.random.default_rng(3)
    correct = rng.integers(0, 50, 20)
    wrong = rng.integers(0, 50, 20)
    auroc, err = binned_auroc(correct, wrong)
    score = np.repeat(np.arange(20), correct + wrong)
    w = np.concatenate([np.r_[np.zeros(c, bool), np.ones(k, bool)]
                        for c, k in zip(correct, wrong)])
    assert auroc == pytest.approx(exact_auroc(score, w), abs=1e-12)
    ap, lo, hi = binned_aupr(correct, wrong)
    assert ap == pytest.approx(exact_ap(score, w), abs=1e-12)
    assert lo <= ap <= hi
    # the AP bounds are the extreme orders within the bins: wrong pixels first (tied) and
    # wrong pixels last (one by one)
    ap_first = exact_ap(score + np.where(w, 0.5, 0.0), w)
    jitter = np.where(w, rng.random(len(w)) * 0.1, 0.5)
    ap_last = exact_ap(score + jitter, w)
    assert ap_first == pytest.approx(hi, abs=1e-12)
    assert lo <= ap_last < ap and ap_last == pytest.approx(lo, abs=1e-3)


def _scorer_case(n=50_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 4, 1, n, generator=g)
    label = torch.randint(0, 4, (1, 1, n), generator=g)
    wrong = logits.argmax(1) != label
    return logits, label, wrong


def test_perfect_random_and_inverted_scorers():
    logits, label, wrong = _scorer_case()
    perfect = torch.where(wrong, 1.0, 1e-3)[:, None]
    m = UncertaintyMeter(4)
    m.update(logits, perfect, label)
    s = m.compute()["scores"]["variance"]
    assert s["auroc"] == 1.0 and s["aupr"] == 1.0 and s["auroc_err"] == 0.0
    m = UncertaintyMeter(4)
    m.update(logits, torch.where(wrong, 1e-3, 1.0)[:, None], label)
    s = m.compute()["scores"]["variance"]
    assert s["auroc"] == 0.0
    m = UncertaintyMeter(4)
    rand = torch.rand(logits.shape[0], 1, *logits.shape[2:],
                      generator=torch.Generator().manual_seed(9))
    m.update(logits, rand, label)
    res = m.compute()
    s = res["scores"]["variance"]
    assert s["auroc"] == pytest.approx(0.5, abs=0.01)
    assert s["aupr"] == pytest.approx(res["error_rate"], abs=0.01)   # precision = base rate
    assert res["error_rate"] == pytest.approx(0.75, abs=0.01)


def test_near_uniform_softmax_keeps_its_resolution():
    """An untrained net's softmax is near uniform: entropy within 1e-3 of log C. Bins equal
    in log(x) would put every pixel in one bin; log(x / (bound - x)) keeps them apart."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 6, 100, 200, generator=g) * 0.03
    label = torch.randint(0, 6, (1, 100, 200), generator=g)
    m = UncertaintyMeter(6)
    m.update(logits, None, label, logits + 0.01 * torch.randn(logits.shape, generator=g))
    res = m.compute()
    x = logits[0].reshape(6, -1).numpy()
    ent, msp, _, _ = exact_scores(x, x, x.argmax(0))
    assert np.log(6) - ent.min() < 2e-3
    wrong = x.argmax(0) != label.reshape(-1).numpy()
    for name, exact in (("entropy", ent), ("1-msp", msp)):
        s = res["scores"][name]
        assert s["auroc_err"] < 2e-3 and s["aupr_err"] < 2e-3, (name, s)
        assert abs(s["auroc"] - exact_auroc(exact, wrong)) <= s["auroc_err"] + 1e-9
    assert res["scores"]["disagreement"]["auroc_err"] < 2e-3


def test_ece_by_hand_and_reliability_bins():
    # p(class 0) = 0.9 everywhere (logit gap log(9 * 3) over 3 equal others), 70 % correct
    gap = np.log(0.9 / (0.1 / 3))
    logits = torch.zeros(4, 10, 10)
    logits[0] = float(gap)
    label = torch.zeros(10, 10, dtype=torch.int64)
    label.view(-1)[:30] = 2
    m = UncertaintyMeter(4)
    m.update(logits, None, label)
    res = m.compute()
    assert res["ece"] == pytest.approx(0.2, abs=1e-6)
    rel = res["reliability"]
    k = int(0.9 * ECE_BINS)                      # 0.9 falls in bin [13/15, 14/15)
    assert rel["count"][k] == 100 and rel["count"].sum() == 100
    assert rel["accuracy"][k] == pytest.approx(0.7)
    assert rel["confidence"][k] == pytest.approx(0.9, abs=1e-6)
    assert np.isnan(rel["accuracy"][0])
    assert set(res["scores"]) == {"entropy", "1-msp"}     # no variance, no second branch
    text = format_uncertainty(res)
    assert "ECE (15 bins" in text and "20.000%" in text and "variance" not in text


def test_softmax_scores_keep_relative_precision():
    """1 - p and the entropy of a near-certain pixel: naive float32 gives 0 for both."""
    x = torch.tensor([[0.0, 0.0, 3.0], [-40.0, -60.0, -1.0], [-45.0, -80.0, -2.0]])
    ent, msp, conf = softmax_scores(x)
    xd = x.double()
    p = torch.softmax(xd, 0)
    ref_msp = 1 - p.max(0).values
    ref_msp[:2] = torch.exp(xd[1:, :2]).sum(0) / (1 + torch.exp(xd[1:, :2]).sum(0))
    # float64 reference per pixel, log p_max = -log1p(s) (plain -p log p rounds p_max to 1)
    ref_ent = []
    for col in x.double().T.tolist():
        m = max(col)
        others = [v - m for v in col if v != m]
        s_ = sum(math.exp(d) for d in others)
        lz = math.log1p(s_)
        ref_ent.append(sum(math.exp(d) / (1 + s_) * (lz - d) for d in others) + lz / (1 + s_))
    ref_ent = torch.tensor(ref_ent, dtype=torch.float64)
    torch.testing.assert_close(msp.double(), ref_msp, rtol=1e-5, atol=0)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=0)
    assert msp[0] > 0 and ent[0] > 0 and float(conf[0]) == 1.0
    # p(pred) for a prediction that is not the argmax (multi-scale can give one)
    _, msp2, conf2 = softmax_scores(x, torch.tensor([1, 0, 0]))
    torch.testing.assert_close(conf2.double(), p[[1, 0, 0], [0, 1, 2]], rtol=1e-5, atol=0)
    js = js_divergence(x, x)
    assert float(js.max()) < 1e-7 and float(js.min()) >= 0       # rounding level, never < 0
    far = js_divergence(torch.tensor([[50.0], [0.0]]), torch.tensor([[0.0], [50.0]]))
    assert float(far) == pytest.approx(np.log(2), rel=1e-5)


def test_merge_state_and_errors():
    logits, logits2, label, var = _random_case(5)
    whole = UncertaintyMeter(6)
    whole.update(logits, var, label, logits2)
    a, b = UncertaintyMeter(6), UncertaintyMeter(6)
    a.update(logits[:1], var[:1], label[:1], logits2[:1])
    b.update(logits[1:], var[1:], label[1:], logits2[1:])
    a.merge(b.state())
    assert np.array_equal(a.state()["hist"], whole.state()["hist"])
    assert np.array_equal(a.state()["ece_counts"], whole.state()["ece_counts"])
    # float32 exp differs in the last bit between vector lanes and the scalar tail
    np.testing.assert_allclose(a.state()["ece_conf"], whole.state()["ece_conf"], rtol=1e-6)
    with pytest.raises(ValueError, match="same bins"):
        a.merge(UncertaintyMeter(6, bins=16))
    with pytest.raises(ValueError, match="classes"):
        a.update(torch.zeros(3, 4, 4), None, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="0 < low < high"):
        UncertaintyMeter(6, ranges={"variance": (0.0, 1.0)})


def _gloo_worker(rank, port, case, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    logits, logits2, label, var = case
    meter = UncertaintyMeter(6)
    meter.update(logits[rank], var[rank], label[rank], logits2[rank])   # one image each
    meter.all_reduce()
    out[rank] = meter.state()
    tdist.destroy_process_group()


def test_all_reduce_across_two_gloo_processes():
    case = _random_case(7)
    out = mp.Manager().dict()
    mp.spawn(_gloo_worker, args=(free_port(), case, out), nprocs=2, join=True)
    whole = UncertaintyMeter(6)
    whole.update(case[0], case[3], case[2], case[1])
    ref = whole.state()
    for rank in (0, 1):
        assert np.array_equal(out[rank]["hist"], ref["hist"])
        assert np.array_equal(out[rank]["ece_counts"], ref["ece_counts"])
        np.testing.assert_allclose(out[rank]["ece_conf"], ref["ece_conf"], rtol=1e-6)


# ----------------------------------------------------------------------------- eval.py

def test_eval_cli_uncertainty_one_and_two_processes(voc_exp, tmp_path):  # noqa: F811
    from furnace.config import load_config
    from furnace.engine.checkpoint import atomic_save
    from furnace.eval import cli, loop
    from test_eval_cli import TinyDual
    C = load_config(voc_exp["exp"], [f"snapshot_dir={tmp_path / 'snap'}",
                                      f"log_dir={tmp_path / 'log'}"])
    torch.manual_seed(3)
    atomic_save({"model": TinyDual(21).state_dict(), "epoch": 7, "iteration": 1},
                tmp_path / "snap" / "epoch-last.pth")
    plain = cli.run(C, "last", ["cpu"], model_factory=tiny_factory)[0]
    one = cli.run(C, "last", ["cpu"], model_factory=tiny_factory, uncertainty=True)[0]
    two = cli.run(C, "last", ["cpu", "cpu"], model_factory=tiny_factory, uncertainty=True)[0]
    assert np.array_equal(one["hist"], plain["hist"])           # predictions unchanged
    u1, u2 = one["uncertainty"], two["uncertainty"]
    assert u1["pixels"] == one["hist"].sum() == u2["pixels"]
    assert u1["wrong"] == one["hist"].sum() - np.trace(one["hist"])
    assert set(u1["scores"]) == set(SCORES)
    for name in SCORES:
        assert u1["scores"][name] == u2["scores"][name]
    assert u1["ece"] == pytest.approx(u2["ece"], rel=1e-12)
    log = (tmp_path / "log" / "val_last.log").read_text()
    assert log.count("Model: ") == 3 and log.count("ECE (15 bins") == 2
    assert one["uncertainty_text"] in log
    png = tmp_path / "log" / "reliability" / "epoch-last.png"
    assert one["reliability_png"] == str(png) and png.stat().st_size > 1000
    # validation inside training gives the same numbers (same memory format as eval.py:
    # the last float32 bits of the logits depend on it, and can move a pixel across a bin)
    model = tiny_factory(C)
    model.load_state_dict(torch.load(tmp_path / "snap" / "epoch-last.pth")["model"])
    m = loop.evaluate_model(model, C, "cpu", uncertainty=True, channels_last=True)
    assert m["uncertainty"]["scores"] == u1["scores"]


def test_eval_main_flag_prints_the_table(voc_exp, tmp_path):  # noqa: F811
    from furnace.eval import cli
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = cli.main(str(voc_exp["exp"]), ["-e", str(voc_exp["snap"] / "epoch-3.pth"),
                                             "-d", "cpu", "--uncertainty",
                                             "--set", f"log_dir={tmp_path / 'log'}"])
    out = buf.getvalue()
    assert "mIou: " in out and "uncertainty: " in out and "disagreement" in out
    assert res[0]["uncertainty"]["pixels"] == res[0]["hist"].sum()
