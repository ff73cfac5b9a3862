"""One engine, many methods: a method defined here plugs in without touching engine files;
checkpoints v2 (method, extra state, safe loading); preemption and mid-epoch resume."""
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from helpers import make_voc
from furnace.config import load_config
from furnace.engine import checkpoint as ck
from furnace.engine.dist import DistInfo
from furnace.engine.trainer import TrainingInterrupted, format_line, train
from furnace.methods import Method, get_method, method_names, register

TINY_DATA = ["labeled_ratio=2", "image_height=32", "image_width=32", "batch_size=2",
             "num_workers=0", "train_scale_array=[1.0]", "snapshot_iter=1",
             "snapshot_from=-1", "tb_images_every=0", "pretrained_model=none",
             "backbone=resnet18", "head_channels=16", "eval_crop_size=32", "eval_mode=whole"]
KILL = {"at": None, "how": "sigterm"}


class TinyNet(torch.nn.Module):
    """conv-BN-ReLU-conv: logits at input size; eval mode returns logits only."""

    def __init__(self, num_classes):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                        torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.classifier = torch.nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        return self.classifier(self.body(x))


@register(replace=True)
class TinyMeanTeacher(Method):
    """A student, an EMA teacher (no optimiser), two streams, random noise from the global
    RNG and a step counter as extra state: the shape of a mean-teacher method."""

    name = "tiny_test"
    streams = ("labeled", "unlabeled0")

    def __init__(self, C, ctx):
        super().__init__(C, ctx)
        self.student = ctx.prepare(TinyNet(C.num_classes))
        self.teacher = ctx.prepare(TinyNet(C.num_classes))
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.modules = {"student": self.student, "teacher": self.teacher}
        self.optimizers = {"opt": torch.optim.SGD(self.student.parameters(), lr=C.lr,
                                                  momentum=0.9)}
        self.ema_steps = 0

    def train_step(self, batches, *, iteration, epoch, backward):
        lab, u0 = batches
        sup = F.cross_entropy(self.student(lab["data"]), lab["label"], ignore_index=255)
        noisy = u0["data"] * u0["mask"] + 0.1 * torch.randn_like(u0["data"])
        with torch.no_grad():
            target = self.teacher(u0["data"]).argmax(1)
        cons = F.cross_entropy(self.student(noisy), target)
        loss = sup + 0.5 * cons
        backward(loss)
        if KILL["at"] == iteration:
            if KILL["how"] == "crash":
                raise RuntimeError("simulated crash")
            if KILL["how"] == "nan":
                sup = sup * float("nan")
            else:
                os.kill(os.getpid(), signal.SIGTERM)
        return loss.detach(), {"loss": loss.detach(), "sup term": sup.detach(),
                               "cons": cons.detach()}, {}

    def after_step(self, *, iteration, epoch):
        self.ema_steps += 1
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), self.student.parameters()):
                t.mul_(0.9).add_(s, alpha=0.1)

    def eval_model(self):
        return self.teacher

    checkpoint_model_key = "teacher"

    @classmethod
    def build_eval_model(cls, C):
        return TinyNet(C.num_classes)

    def extra_state(self):
        return {"ema_steps": self.ema_steps}

    def load_extra_state(self, state):
        self.ema_steps = int(state["ema_steps"])


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), n_train=12, n_val=3, num_classes=21)


def _config(root, log_dir, extra=()):
    return load_config(ROOT / "exp_voc", [f"dataset_path={root}", f"log_dir={log_dir}",
                                          *TINY_DATA, *extra], env={})


def _weights(path, key):
    return ck.load_file(path)[key]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_registry_knows_builtins_and_refuses_unknown():
    assert {"dueb", "supervised", "tiny_test"} <= set(method_names())
    assert set(get_method("dueb").presets) == {"full", "aleatoric", "energy", "cpcl"}
    with pytest.raises(ValueError, match="not a registered method.*dueb"):
        get_method("nope")
    with pytest.raises(ValueError, match="streams"):
        register(type("Bad", (Method,), {"name": "bad", "streams": ("unlabelled",)}))


def test_format_line_takes_any_term_names():
    line = format_line(0, 2, 1, 4, 0.01, {"sup term": 1.0, "loss": 2.0, "x": 3.0})
    assert line == "Epoch 1/2 Iter 2/4: lr=1.0000e-02 loss=2.00 sup term=1.00 x=3.00"


def test_tiny_method_trains_end_to_end_and_evaluates(voc_root, tmp_path):
    """A method registered in this file trains with the unchanged engine; its checkpoint
    records the method, its modules and extra state; eval builds its network from it."""
    C = _config(voc_root, tmp_path / "log", ["method=tiny_test", "nepochs=2",
                                             "niters_per_epoch=3", "eval_every=1"])
    snap = train(C, DistInfo())
    state = ck.load_file(snap / "epoch-last.pth")
    assert state["method"] == "tiny_test" and state["format"] == 2
    assert {"student", "teacher", "opt", "epoch", "iteration"} <= set(state)
    assert state["extra"] == {"ema_steps": 6} and state["resume_at"] == [2, 0]
    log = next((tmp_path / "log").glob("train_*.log")).read_text()
    assert "method=tiny_test" in log and "sup term=" in log
    assert log.count("# val epoch") == 2 and "# stopped: finished" in log
    assert (snap / "best.pth").is_file()
    assert ck.load_file(snap / "best.pth")["best_miou"] == pytest.approx(
        max(float(l.split("mIoU ")[1].split("%")[0]) for l in log.splitlines()
            if l.startswith("# val")) / 100, abs=1e-5)
    from furnace.eval.cli import run
    res = run(C, "last", ["cpu"])
    assert 0 <= res[0]["miou"] <= 1 and res[0]["epoch"] == 1


def test_sigterm_mid_epoch_then_resume_equals_straight_run(voc_root, tmp_path):
    """SIGTERM at iteration 4 of 3 x 3: the engine finishes that iteration, writes a
    resumable epoch-last.pth, stops; -c resumes at epoch 1 iteration 2 and ends with the
    straight run's weights, bit for bit (data order, RNG, optimiser and EMA state)."""
    extra = ["method=tiny_test", "nepochs=3", "niters_per_epoch=3", "deterministic=true"]
    straight = train(_config(voc_root, tmp_path / "a", extra), DistInfo())
    C = _config(voc_root, tmp_path / "b", extra)
    KILL["at"] = 4
    try:
        with pytest.raises(TrainingInterrupted, match="SIGTERM at epoch 1 iteration 1"):
            train(C, DistInfo())
    finally:
        KILL["at"] = None
    snap = tmp_path / "b" / "snapshot"
    mid = ck.load_file(snap / "epoch-last.pth")
    assert mid["resume_at"] == [1, 2] and mid["extra"] == {"ema_steps": 5}
    assert not (snap / "epoch-1.pth").exists()
    log = next((tmp_path / "b").glob("train_*.log")).read_text()
    assert "# stopped: interrupted (SIGTERM)" in log
    C = _config(voc_root, tmp_path / "b", extra)
    train(C, DistInfo(), resume=str(snap / "epoch-last.pth"))
    assert "# resumed from " in Path(C.train_log_file).read_text()
    assert "at epoch 1 iteration 2" in Path(C.train_log_file).read_text()
    for key in ("student", "teacher"):
        _assert_same(_weights(straight / "epoch-2.pth", key), _weights(snap / "epoch-2.pth", key))
    assert ck.load_file(snap / "epoch-2.pth")["extra"] == {"ema_steps": 9}


def test_snapshot_every_iters_survives_a_crash(voc_root, tmp_path):
    """snapshot_every_iters=3 writes epoch-last.pth inside epochs; a run that dies without
    saving (here an exception at global iteration 6) resumes from the snapshot after
    iteration 5 and ends with the straight run's weights."""
    extra = ["method=tiny_test", "nepochs=2", "niters_per_epoch=4", "snapshot_every_iters=3"]
    straight = train(_config(voc_root, tmp_path / "a", extra), DistInfo())
    C = _config(voc_root, tmp_path / "b", extra)
    KILL.update(at=6, how="crash")
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(C, DistInfo())
    finally:
        KILL.update(at=None, how="sigterm")
    snap = tmp_path / "b" / "snapshot"
    assert ck.load_file(snap / "epoch-last.pth")["resume_at"] == [1, 2]
    log = next((tmp_path / "b").glob("train_*.log")).read_text()
    assert "(epoch 0 iteration 2)" in log and "(epoch 1 iteration 1)" in log
    assert "# stopped: error (RuntimeError: simulated crash)" in log
    resumed = train(C, DistInfo(), resume=str(snap / "epoch-last.pth"))
    for key in ("student", "teacher"):
        _assert_same(_weights(straight / "epoch-1.pth", key),
                     _weights(resumed / "epoch-1.pth", key))


def test_sigterm_subprocess_exits_cleanly_and_resumes(voc_root, tmp_path):
    """The real thing: SIGTERM from outside while a train.py process runs; it writes a
    resumable checkpoint, exits with 128 + 15 and no traceback; -c last finishes the run."""
    args = ["-d", "cpu", "--set", f"dataset_path={voc_root}", f"log_dir={tmp_path / 'log'}",
            *TINY_DATA, "method=supervised", "nepochs=2", "niters_per_epoch=400"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "exp_voc" / "train.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log_dir = tmp_path / "log"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a few iterations in the log
        logs = list(log_dir.glob("train_*.log"))
        if logs and logs[0].read_text().count("\nEpoch 1/2 Iter") >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "interrupted by SIGTERM" in err and "-c last" in err
    state = ck.load_file(log_dir / "snapshot" / "epoch-last.pth")
    assert state["method"] == "supervised" and state["resume_at"][0] == 0
    assert 3 <= state["resume_at"][1] < 400


def test_supervised_method_uses_one_network_and_the_labelled_stream(voc_root, tmp_path,
                                                                     monkeypatch):
    from furnace.data.datasets import SegmentationDataset
    seen = set()
    real = SegmentationDataset.__getitem__

    def spy(self, key):
        seen.add(self.mode)
        return real(self, key)

    monkeypatch.setattr(SegmentationDataset, "__getitem__", spy)
    # the legacy switch selects the method
    C = _config(voc_root, tmp_path / "log", ["supervised_only=true", "nepochs=1",
                                             "niters_per_epoch=2"])
    snap = train(C, DistInfo())
    assert seen == {"train"}
    state = ck.load_file(snap / "epoch-last.pth")
    assert state["method"] == "supervised" and "optimizer" in state
    assert "optimizer_1" not in state
    assert state["model"] and all(k.startswith("branch1.") for k in state["model"])
    from furnace.eval.cli import run
    res = run(C, "last", ["cpu"])                       # eval.py builds the one-branch network
    assert res[0]["hist"].sum() > 0


def test_nan_stop_is_recorded_in_the_log(voc_root, tmp_path):
    from furnace.engine.trainer import NonFiniteLossError
    C = _config(voc_root, tmp_path / "log", ["method=tiny_test", "nepochs=2",
                                             "niters_per_epoch=2"])
    KILL.update(at=3, how="nan")
    try:
        with pytest.raises(NonFiniteLossError, match="'sup term' is nan at epoch 1 iteration 1"):
            train(C, DistInfo())
    finally:
        KILL.update(at=None, how="sigterm")
    log = next((tmp_path / "log").glob("train_*.log")).read_text()
    assert log.rstrip().endswith("# stopped: NaN")
    assert ck.load_file(tmp_path / "log" / "snapshot" / "epoch-last.pth")["epoch"] == 0


def test_precision_follows_the_model():
    """float64 models keep float64 losses (no float32 round trip); float32 stays float32."""
    from furnace.methods.dueb import DUEBStep
    from furnace.models import network_from_config
    C = load_config(ROOT / "exp_voc", ["backbone=resnet18", "pretrained_model=none",
                                       "aleatoric.samples=2"], env={})
    torch.manual_seed(0)
    model = network_from_config(C).double().train()
    step = DUEBStep(model, C, batch_per_process=2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    z, v = step.forward(1, x)
    assert z.dtype == torch.float64 and v.dtype == torch.float64
    _, ref, _ = model(x, step=1)
    assert torch.equal(z, ref)
    lab = {"data": x, "label": torch.randint(0, 21, (2, 32, 32))}
    u0 = {"data": torch.randn_like(x), "mask": torch.ones(2, 1, 32, 32, dtype=torch.float64)}
    u1 = {"data": torch.randn_like(x)}
    loss, terms, _ = step(lab, u0, u1)
    assert loss.dtype == torch.float64 and terms["sup_1"].dtype == torch.float64
    from furnace.methods import upcast
    assert upcast(torch.zeros(1, dtype=torch.bfloat16)).dtype == torch.float32
    assert upcast(torch.zeros(1, dtype=torch.float16)).dtype == torch.float32


# ----------------------------------------------------------------------------- checkpoints

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/furnace-pwned",))


def test_crafted_checkpoint_never_runs_code(voc_root, tmp_path, capsys, monkeypatch):
    marker = "/tmp/furnace-pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    bad = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": _Evil()}, bad)
    with pytest.raises(ck.CheckpointError, match="--trust-pickle"):
        ck.load_file(bad)
    from furnace.eval.cli import main as eval_main
    with pytest.raises(SystemExit) as e:
        eval_main(ROOT / "exp_voc", ["-e", str(bad), "-d", "cpu", "--set",
                                     f"dataset_path={voc_root}", f"log_dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "evil.pth" in err[0]
    monkeypatch.setattr(sys, "argv", ["train.py", "-c", str(bad), "-d", "cpu", "--set",
                                      f"dataset_path={voc_root}", f"log_dir={tmp_path}",
                                      *TINY_DATA])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "exp_voc" / "train.py"), run_name="__main__")
    assert e.value.code == 2 and "--trust-pickle" in capsys.readouterr().err
    assert not os.path.exists(marker)


def test_format1_numpy_rng_loads_safely_and_restores(tmp_path):
    """Our format-1 files stored NumPy's RNG tuple: it loads with weights_only (arrays only)."""
    np.random.seed(3)
    old = {"model": {}, "epoch": 0, "iteration": 1,
           "rng": {"python": __import__("random").getstate(), "numpy": np.random.get_state(),
                   "torch": torch.get_rng_state()}}
    torch.save(old, tmp_path / "v1.pth")
    want = np.random.rand(3)
    ck.set_rng_state(ck.load_file(tmp_path / "v1.pth")["rng"])
    assert np.array_equal(np.random.rand(3), want)
    # format 2 stores it as tensors and numbers
    state = ck.rng_state()
    assert isinstance(state["numpy"]["key"], torch.Tensor)


def test_resume_errors_are_one_line(voc_root, tmp_path, capsys, monkeypatch):
    only_model = tmp_path / "weights.pth"
    torch.save({"model": {"branch1.classifier.weight": torch.zeros(21, 8, 1, 1)}}, only_model)

    def run(*extra):
        monkeypatch.setattr(sys, "argv", ["train.py", "-d", "cpu", *extra, "--set",
                                          f"dataset_path={voc_root}",
                                          f"log_dir={tmp_path / 'log'}", *TINY_DATA,
                                          "method=supervised", "nepochs=1",
                                          "niters_per_epoch=1"])
        runpy.run_path(str(ROOT / "exp_voc" / "train.py"), run_name="__main__")

    with pytest.raises(SystemExit):
        run("-c", str(only_model))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights.pth" in err[0] and "not a training checkpoint" in err[0]
    run()                                            # a finished one-epoch run
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run("-c", "last")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "already finished" in err[0]
    assert "nepochs" in err[0]


def test_failed_save_names_the_file_and_keeps_the_previous(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 0, {"epoch": 0})

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ck.CheckpointError) as e:
        ck.save_checkpoint(tmp_path, 1, {"epoch": 1})
    msg = str(e.value)
    assert "epoch-1.pth" in msg and "No space left" in msg and "intact" in msg
    monkeypatch.undo()
    assert ck.load_file(tmp_path / "epoch-last.pth")["epoch"] == 0
    assert sorted(os.listdir(tmp_path)) == ["epoch-0.pth", "epoch-last.pth"]


def test_eval_reads_reference_v1_and_our_v2_dueb_checkpoints(voc_root, tmp_path):
    """A reference-format checkpoint (module. prefixes, optimizer_1/2, no method) and the same
    weights in format 2 give the same histogram with the network built from the file."""
    from furnace.eval.cli import run
    from furnace.models import network_from_config
    C = _config(voc_root, tmp_path / "log", ["snapshot_dir=" + str(tmp_path / "snap")])
    torch.manual_seed(5)
    state = network_from_config(C, pretrained=False).state_dict()
    v1, v2 = tmp_path / "ref.pth", tmp_path / "v2.pth"
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "optimizer_1": {},
                "optimizer_2": {}, "epoch": 39, "iteration": 991}, v1)
    ck.atomic_save({"format": 2, "method": "dueb", "model": state, "epoch": 3,
                    "iteration": 0, "extra": {}}, v2)
    a, b = run(C, str(v1), ["cpu"]), run(C, str(v2), ["cpu"])
    assert np.array_equal(a[0]["hist"], b[0]["hist"]) and a[0]["hist"].sum() > 0
    assert (a[0]["epoch"], b[0]["epoch"]) == (39, 3)


def test_help_and_print_config_answer_without_torch():
    """--help and --print-config (resolved keys with derived values) never import torch, so
    they answer in well under a second."""
    script = ROOT / "exp_voc" / "train.py"
    code = ("import runpy, sys\n"
            "sys.argv = [{s!r}] + sys.argv[1:]\n"
            "try:\n"
            "    runpy.run_path({s!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n").format(s=str(script))
    out = subprocess.run([sys.executable, "-c", code, "--print-config", "--set", "nepochs=7",
                          "labeled_ratio=8"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "# method: dueb" and lines[-1] == "NO-TORCH"
    assert "nepochs = 7" in lines and "niters_per_epoch = 1157" in lines
    # the new layout only: DUEB's keys in their group, no old top-level names
    assert "dueb.aleatoric.enabled = True" in lines and "dueb.unsup_weight = 1.0" in lines
    assert not any(l.startswith(("aleatoric.", "energy.", "unsup_weight ", "fuse_passes ",
                                 "supervised_only ")) for l in lines)
    assert any(l.startswith("train_source = ") and "1-8.txt" in l for l in lines)
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--print-config" in out.stdout and "--trust-pickle" in \
        out.stdout and out.stdout.rstrip().endswith("NO-TORCH")
    # eval.py alike
    code = code.replace("train.py", "eval.py")
    for args in (["--help"], ["--print-config", "--set", "eval_flip=true"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.rstrip().endswith("NO-TORCH"), out.stdout[-300:]
    assert "eval_flip = True" in out.stdout.splitlines()


def test_epoch_size_comes_from_the_list_files(tmp_path, caplog):
    """A 16-image VOC-layout list under the VOC config: 8 + 8 images, 1 iteration per epoch
    at batch 8 (the totals of config.py would give 661), and one warning naming both."""
    root = make_voc(tmp_path / "voc", n_train=16, n_val=2, ratios=(2,))
    with caplog.at_level("WARNING", logger="furnace.config"):
        C = load_config(ROOT / "exp_voc", [f"dataset_path={root}", "labeled_ratio=2"], env={})
    assert (C.num_train_imgs, C.num_unsup_imgs, C.max_samples) == (8, 8, 8)
    assert C.niters_per_epoch == 1
    warns = [r.getMessage() for r in caplog.records if r.name == "furnace.config"]
    assert len(warns) == 1 and "8 labelled and 8 unlabelled" in warns[0]
    assert "total_train_imgs=10582" in warns[0] and "5291" in warns[0]
    # lists that agree with the totals, or no lists at all: the totals, no warning
    caplog.clear()
    C = load_config(ROOT / "exp_voc", [f"dataset_path={root}", "labeled_ratio=2",
                                       "total_train_imgs=16"], env={})
    assert C.niters_per_epoch == 1 and not caplog.records
    C = load_config(ROOT / "exp_voc", [f"dataset_path={tmp_path / 'none'}"], env={})
    assert (C.num_train_imgs, C.niters_per_epoch) == (2645, 992) and not caplog.records


def test_bn_eps_and_momentum_reach_every_batchnorm():
    from furnace.methods.supervised import one_branch_from_config
    from furnace.models import network_from_config
    C = load_config(ROOT / "exp_voc", ["backbone=resnet18", "pretrained_model=none",
                                       "bn_eps=1e-3", "bn_momentum=0.05"], env={})
    for net in (network_from_config(C), one_branch_from_config(C)):
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(bns) > 20 and all(m.eps == 1e-3 and m.momentum == 0.05 for m in bns)
    C = load_config(ROOT / "exp_voc", ["backbone=resnet18", "pretrained_model=none"], env={})
    assert all(m.eps == 1e-5 and m.momentum == 0.1 for m in network_from_config(C).modules()
               if isinstance(m, torch.nn.BatchNorm2d))


def test_legacy_environment_overrides_are_logged(caplog):
    from furnace.engine.cli import log_legacy_env
    with caplog.at_level("WARNING", logger="furnace.config"):
        log_legacy_env({"learning_rate": "0.01", "volna": "/data", "PATH": "/bin",
                        "batch_size": ""})
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2
    assert msgs[0].startswith("environment volna=/data sets the data root")
    assert msgs[1].startswith("environment learning_rate=0.01 sets lr")
