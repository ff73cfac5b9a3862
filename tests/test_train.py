"""Training engine: every script runs, loss = sum of public-API terms, switches, resume, NaN."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from helpers import make_city, make_voc, run_script
from furnace.config import load_config
from furnace.engine import checkpoint as ck
from furnace.methods.dueb import DUEBStep
from furnace.models import network_from_config
from furnace.losses import AleatoricLoss, energy_term, pseudo_labels, unsup_ce

TINY = ["backbone=resnet18", "head_channels=16", "pretrained_model=none", "image_height=48",
        "image_width=48",
        "batch_size=2", "nepochs=2", "niters_per_epoch=2", "num_workers=0", "snapshot_iter=1",
        "snapshot_from=-1", "train_scale_array=[1.0]", "aleatoric.samples=2",
        "tb_images_every=1"]
REFERENCE_KEYS = {"model", "optimizer_1", "optimizer_2", "epoch", "iteration"}


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), n_train=12, n_val=3, num_classes=21)


@pytest.fixture(scope="module")
def city_root(tmp_path_factory):
    return make_city(tmp_path_factory.mktemp("city"), n_train=12, n_val=3)


def overrides(root, tmp_path, extra=()):
    return ["--set", f"dataset_path={root}", f"log_dir={tmp_path / 'log'}", "labeled_ratio=2",
            *TINY, *extra]


@pytest.mark.parametrize("exp, script", [("exp_voc", "train.py"), ("exp_voc", "trainal.py"),
                                         ("exp_voc", "traine.py"), ("exp_voc", "traincpcl.py"),
                                         ("exp_city", "train.py"), ("exp_city", "trainal.py"),
                                         ("exp_city", "traine.py")])
def test_scripts_write_reference_checkpoints(exp, script, voc_root, city_root, tmp_path,
                                             monkeypatch):
    root = voc_root if exp == "exp_voc" else city_root
    extra = ["ohem_min_kept_per_image=200"] if exp == "exp_city" else []
    run_script(ROOT / exp / script, overrides(root, tmp_path, extra), monkeypatch)
    snap = tmp_path / "log" / "snapshot"
    assert sorted(p.name for p in snap.iterdir()) == ["epoch-0.pth", "epoch-1.pth",
                                                      "epoch-last.pth"]
    state = ck.load_file(snap / "epoch-last.pth")
    assert REFERENCE_KEYS <= set(state) and state["epoch"] == 1 and state["iteration"] == 1
    assert any(k.startswith("branch2.variancelayer") for k in state["model"])
    logs = list((tmp_path / "log").glob("train_*.log"))
    assert len(logs) == 1
    lines = [l for l in logs[0].read_text().splitlines() if l.startswith("Epoch")]
    assert len(lines) == 4
    assert all(l.count("[") == l.count("]") and l.count("(") == l.count(")") for l in lines)
    has_energy = script in ("train.py", "traine.py")
    has_al = script in ("train.py", "trainal.py")
    assert ("predlog_sup1" in lines[0]) == has_energy
    assert ("loss_all=" in lines[0]) == has_al
    assert list((tmp_path / "log" / "tb").glob("events.*"))


def _batches(C, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, W = 2, 48, 48
    lab = {"data": torch.randn(B, 3, H, W, generator=g),
           "label": torch.randint(0, C.num_classes, (B, H, W), generator=g)}
    lab["label"][:, :3] = 255
    mask = torch.zeros(B, 1, H, W)
    mask[:, :, 10:30, 5:25] = 1
    u0 = {"data": torch.randn(B, 3, H, W, generator=g), "mask": mask}
    u1 = {"data": torch.randn(B, 3, H, W, generator=g)}
    return lab, u0, u1


def _config(extra=()):
    return load_config(ROOT / "exp_voc", TINY + list(extra), env={})


def test_loss_is_the_sum_of_public_terms():
    C = _config()
    torch.manual_seed(0)
    model = network_from_config(C).train()
    lab, u0, u1 = _batches(C)
    step = DUEBStep(model, C, batch_per_process=2)
    torch.manual_seed(7)
    loss, terms, _ = step(lab, u0, u1)

    torch.manual_seed(7)
    A = AleatoricLoss(2)
    y = lab["label"]
    _, z1s, v1s = model(lab["data"], step=1)
    _, z2s, v2s = model(lab["data"], step=2)
    s = F.cross_entropy(z1s, y, ignore_index=255) + F.cross_entropy(z2s, y, ignore_index=255)
    e_sup = energy_term(z1s.softmax(1), y) + energy_term(z2s.softmax(1), y)
    a_sup = 0.5 * A(z1s, v1s, y) + 0.5 * A(z2s, v2s, y)
    M = u0["mask"]
    with torch.no_grad():
        t = [model(u0["data"], step=k)[1] * (1 - M) + model(u1["data"], step=k)[1] * M
             for k in (1, 2)]
    pl = pseudo_labels(*t)
    mixed = u0["data"] * (1 - M) + u1["data"] * M
    _, z1u, v1u = model(mixed, step=1)
    _, z2u, v2u = model(mixed, step=2)
    u = unsup_ce(z1u, pl.inter, pl.weight_inter) + unsup_ce(z2u, pl.union, pl.weight_union)
    a_u = A(z1u, v1u, pl.inter) + A(z2u, v2u, pl.union)
    e_u = energy_term(z1u.softmax(1), pl.inter) + energy_term(z2u.softmax(1), pl.union)
    want = s + 0.5 * e_sup + a_sup + C.unsup_weight * u + a_u + e_u
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_all"], a_sup, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_all_unsup"], a_u, rtol=1e-5, atol=1e-6)
    assert 0 <= float(terms["overlap"]) <= 1


def _step_counting_aleatoric(C, monkeypatch, value):
    """A DUEBStep whose AleatoricLoss calls are counted (each returns `value`)."""
    torch.manual_seed(0)
    model = network_from_config(C).train()
    calls = []
    monkeypatch.setattr(AleatoricLoss, "forward", lambda self, *a, **k: calls.append(1) or value)
    return DUEBStep(model, C, batch_per_process=2), calls


@pytest.mark.parametrize("al, en, sup_only, expected", [
    (True, True, False, {"loss_all", "loss_all_unsup", "predlog_sup1", "predlog_sup2",
                         "predlog_unsup1", "predlog_unsup2", "inter", "union", "loss_unsup",
                         "overlap"}),
    (True, False, False, {"loss_all", "loss_all_unsup", "inter", "union", "loss_unsup",
                          "overlap"}),
    (False, True, False, {"predlog_sup1", "predlog_sup2", "predlog_unsup1", "predlog_unsup2",
                          "inter", "union", "loss_unsup", "overlap"}),
    (False, False, False, {"inter", "union", "loss_unsup", "overlap"}),
    (False, False, True, set()),
])
def test_switches_change_exactly_their_terms(al, en, sup_only, expected, monkeypatch):
    C = _config([f"aleatoric.enabled={al}", f"energy.enabled={en}",
                 f"supervised_only={sup_only}"])
    step, calls = _step_counting_aleatoric(C, monkeypatch, torch.zeros(()))
    loss, terms, _ = step(*_batches(C))
    assert set(terms) == expected | {"sup_1", "sup_2", "loss_sup", "loss"}
    assert len(calls) == (0 if not al else (2 if sup_only else 4))
    base = terms["sup_1"] + terms["sup_2"]
    if sup_only and not al and not en:
        torch.testing.assert_close(loss, base)


def test_aleatoric_start_iter_leaves_the_terms_out_before_it(monkeypatch):
    C = _config(["aleatoric.start_iter=3"])
    step, calls = _step_counting_aleatoric(C, monkeypatch, torch.ones(()))
    batches = _batches(C)
    for it, n_calls in ((0, 0), (2, 0), (3, 4), (7, 8)):
        _, terms, _ = step(*batches, iteration=it)
        assert len(calls) == n_calls
        assert ("loss_all" in terms) == (it >= 3) and ("loss_all_unsup" in terms) == (it >= 3)
    step(*batches)                          # no iteration given: always in
    assert len(calls) == 12


def test_fused_passes_run_and_keep_terms():
    C = _config(["fuse_passes=true"])
    torch.manual_seed(0)
    model = network_from_config(C).train()
    loss, terms, _ = DUEBStep(model, C, batch_per_process=2)(*_batches(C))
    assert torch.isfinite(loss) and "loss_all_unsup" in terms
    loss.backward()


def _params(path):
    return ck.load_file(path)["model"]


def test_resume_equals_straight_run(voc_root, tmp_path, monkeypatch):
    base = ["deterministic=true", "aleatoric.samples=2"]
    straight, split = tmp_path / "a", tmp_path / "b"
    script = ROOT / "exp_voc" / "train.py"
    run_script(script, overrides(voc_root, straight, base), monkeypatch)
    run_script(script, overrides(voc_root, split, base + ["stop_after_epoch=0"]), monkeypatch)
    assert not (split / "log" / "snapshot" / "epoch-1.pth").exists()
    run_script(script, ["-c", "last"] + overrides(voc_root, split, base), monkeypatch)
    a = _params(straight / "log" / "snapshot" / "epoch-1.pth")
    b = _params(split / "log" / "snapshot" / "epoch-1.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_with_named_term(voc_root, tmp_path, monkeypatch, capsys):
    real = DUEBStep.__call__
    count = {"n": 0}

    def poisoned(self, *a, **k):
        loss, terms, extras = real(self, *a, **k)
        count["n"] += 1
        if count["n"] == 3:  # first iteration of epoch 1
            terms["union"] = terms["union"] * float("nan")
            loss = loss + terms["union"]
        return loss, terms, extras

    monkeypatch.setattr(DUEBStep, "__call__", poisoned)
    with pytest.raises(SystemExit) as e:
        run_script(ROOT / "exp_voc" / "train.py", overrides(voc_root, tmp_path), monkeypatch)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'union'" in err and "epoch 1 iteration 0" in err
    last = ck.load_file(tmp_path / "log" / "snapshot" / "epoch-last.pth")
    assert last["epoch"] == 0


def test_resume_missing_checkpoint_is_clear(voc_root, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_script(ROOT / "exp_voc" / "train.py",
                   ["-c", str(tmp_path / "nope.pth")] + overrides(voc_root, tmp_path),
                   monkeypatch)
    assert "nope.pth" in capsys.readouterr().err


def test_batch_of_one_is_rejected(voc_root, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_script(ROOT / "exp_voc" / "train.py",
                   overrides(voc_root, tmp_path, ["batch_size=1"]), monkeypatch)
    assert "batch_size=1" in capsys.readouterr().err


def test_train_then_evaluate_last_and_range(voc_root, tmp_path, monkeypatch, capsys):
    args = overrides(voc_root, tmp_path)
    run_script(ROOT / "exp_voc" / "train.py", args, monkeypatch)
    from furnace.eval.cli import main as eval_main
    eval_args = ["-d", "cpu", "--set"] + args[1:] + ["eval_crop_size=48"]
    last = eval_main(ROOT / "exp_voc", ["-e", "last", "-s"] + eval_args)
    ranged = eval_main(ROOT / "exp_voc", ["-e", "0-"] + eval_args)
    assert len(last) == 1 and [r["epoch"] for r in ranged] == [0, 1]
    # epoch-last is a copy of epoch 1: same numbers
    assert last[0]["miou"] == ranged[1]["miou"]
    val_last = tmp_path / "log" / "val_last.log"
    text = val_last.read_text()  # the log of the latest eval run (the range)
    assert "epoch-0.pth" in text and "epoch-1.pth" in text
    assert "mIoU(no_back)" in text and "mACC" in text
    assert len(list(Path(last[0]["save_dir"]).glob("*.png"))) == 3


def test_streamed_backward_gives_the_same_gradients():
    C = _config()
    torch.manual_seed(0)
    model = network_from_config(C).train()
    batch = _batches(C)
    step = DUEBStep(model, C, batch_per_process=2)
    torch.manual_seed(3)
    loss, _, _ = step(*batch)
    loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    calls = []
    loss2, terms, _ = step(*batch, backward=lambda l: calls.append(1) or l.backward())
    assert len(calls) == 4 and not loss2.requires_grad  # sup b1, sup b2, student b1, b2
    torch.testing.assert_close(loss2, loss.detach(), rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        if n in whole:
            torch.testing.assert_close(p.grad, whole[n], rtol=1e-4, atol=1e-6, msg=n)


def test_progress_bar_text_fits_and_leads_with_progress():
    """The bar shows iteration/total, it/s and ETA first, then the main losses, within 100
    columns; the full reference line stays in the log file."""
    from tqdm import tqdm
    from furnace.engine.trainer import BAR_FORMAT, BAR_WIDTH, bar_text
    values = {n: 123.456 for n in ("loss", "loss_sup", "loss_unsup", "loss_all",
                                   "loss_all_unsup", "inter", "union", "sup_1", "sup_2")}
    text = bar_text(9, 40, values)
    assert text.startswith("epoch 10/40 loss=123.456 sup=123.456 unsup=123.456 al=123.456")
    assert "inter" not in text and "sup_1" not in text
    shown = tqdm.format_meter(1234, 5291, 700.0, ncols=BAR_WIDTH, prefix=text,
                              bar_format=BAR_FORMAT)
    assert len(shown) <= 100
    assert re.match(r"1234/5291 +1\.76it/s ETA 38:21 epoch 10/40 loss=123\.456", shown), shown


def test_p_means_one_thing_in_train_and_eval(capsys):
    """-p is eval.py's image folder; train.py takes the master port as --port and refuses -p
    with one line that says so."""
    from furnace.engine.cli import build_parser, train_main
    with pytest.raises(SystemExit) as e:
        train_main(str(ROOT / "exp_voc"), argv=["-p", "16005"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: -p 16005: -p is eval.py's folder for saved images; the master port "
                   "of train.py is --port (e.g. --port 16005)"]
    assert build_parser("x").parse_args(["--port", "16005"]).port == "16005"


def test_validation_during_training_reports_uncertainty(voc_root, tmp_path, monkeypatch,
                                                        capsys):
    run_script(ROOT / "exp_voc" / "train.py",
               overrides(voc_root, tmp_path, ["nepochs=1", "eval_every=1",
                                              "eval_uncertainty=true", "eval_crop_size=48",
                                              # the reference width: with 16 channels the
                                              # untrained net gets every pixel wrong
                                              "head_channels=256"]),
               monkeypatch)
    log = next((tmp_path / "log").glob("train_*.log")).read_text()
    assert "# val epoch 1: mIoU" in log
    rows = re.findall(r"# val epoch 1 (variance|entropy|1-msp|disagreement)\s+([\d.]+)\s+"
                      r"([\d.]+)", log)
    assert [r[0] for r in rows] == ["variance", "entropy", "1-msp", "disagreement"]
    assert all(0.0 <= float(a) <= 1.0 and 0.0 <= float(b) <= 1.0 for _, a, b in rows)
    assert re.search(r"# val epoch 1 ECE \(15 bins, softmax confidence\): [\d.]+%", log)
    assert "ECE (15 bins" in capsys.readouterr().out
