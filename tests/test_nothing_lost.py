"""Nothing lost, round 2 (issue 22): reused folders, full disks, dying writers, crafted
checkpoints, options that change the method. One test (or more) per item of the issue, each
reproducing the fault; runs that could hang run in a subprocess under a timeout."""
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from conftest import ROOT
from helpers import kill_while_saving, make_voc, run_script
from furnace.config import ConfigError, load_config
from furnace.engine import checkpoint as ck
from furnace.engine.runlock import run_guard

# the smallest network that still runs every path: resnet18, 16-channel heads
TINY = ["backbone=resnet18", "pretrained_model=none", "head_channels=16", "image_height=48",
        "image_width=48", "batch_size=2", "nepochs=2", "niters_per_epoch=2", "num_workers=0",
        "snapshot_iter=1", "snapshot_from=-1", "train_scale_array=[1.0]", "aleatoric.samples=2",
        "num_classes=5", "class_names=none", "labeled_ratio=2"]
TRAIN = ROOT / "exp_voc" / "train.py"
TIMEOUT = 240  # seconds for one subprocess run (a hang fails the test instead of the suite)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), n_train=8, n_val=2, num_classes=5)


def args_for(root, log, extra=()):
    return ["-d", "cpu", "--set", f"dataset_path={root}", f"log_dir={log}", *TINY, *extra]


def train_proc(args, preexec=None, patch="", **kw):
    """``exp_voc/train.py args`` in a subprocess (after the Python code ``patch``)."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
    """) + textwrap.dedent(patch) + textwrap.dedent(f"""
        from furnace.engine.cli import train_main
        sys.exit(train_main({str(ROOT / 'exp_voc')!r}, argv=sys.argv[1:]))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=preexec, **kw)


def run_train(args, **kw):
    proc = train_proc(args, **kw)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"training hung (killed after {TIMEOUT} s); stderr: {err[-2000:]}")
    return proc.returncode, out, err


def error_lines(err):
    """stderr lines that are not logging records (those carry a level name)."""
    return [l for l in err.splitlines()
            if l.strip() and not any(f" {lvl} " in l for lvl in ("INFO", "WARNING", "DEBUG"))]


def train_log(log):
    logs = sorted(log.glob("train_*.log"))
    assert logs, f"no train log in {log}"
    return logs[-1].read_text()


# ----------------------------------------------------------------------- 1. reused folders

def test_keep_prunes_only_files_this_run_wrote(tmp_path):
    # an older run's epoch files in the folder: epoch-7 above ours, epoch-3 in between
    older = {n: os.urandom(64) for n in ("epoch-3.pth", "epoch-7.pth")}
    for name, data in older.items():
        (tmp_path / name).write_bytes(data)
    owned = {}
    for e in range(3):
        path = ck.save_checkpoint(tmp_path, e, {"epoch": e}, keep=1, owned=owned)
        assert path.is_file(), f"epoch {e}: the file just saved was deleted"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["epoch-2.pth", "epoch-3.pth", "epoch-7.pth", "epoch-last.pth"]
    assert all((tmp_path / n).read_bytes() == d for n, d in older.items())
    assert list(owned) == ["epoch-2.pth"]


def test_keep_spares_a_file_replaced_since_it_was_written(tmp_path):
    owned = {}
    ck.save_checkpoint(tmp_path, 0, {"epoch": 0}, keep=1, owned=owned)
    (tmp_path / "epoch-0.pth").write_bytes(b"another run's file now")
    ck.save_checkpoint(tmp_path, 1, {"epoch": 1}, keep=1, owned=owned)
    assert (tmp_path / "epoch-0.pth").read_bytes() == b"another run's file now"


def test_training_in_a_reused_folder_keeps_the_older_runs_files(voc_root, tmp_path,
                                                                 monkeypatch):
    snap = tmp_path / "log" / "snapshot"
    snap.mkdir(parents=True)
    (snap / "epoch-7.pth").write_bytes(b"older run, epoch 7")
    (snap / "epoch-0.pth").write_bytes(b"older run, epoch 0")
    keep = ["snapshot_keep=1", "tb_images_every=0"]
    run_script(TRAIN, args_for(voc_root, tmp_path / "log", keep + ["stop_after_epoch=0"]),
               monkeypatch)
    # this run's epoch-0.pth replaced the older one (same name); epoch-7 is untouched
    assert ck.load_file(snap / "epoch-0.pth")["epoch"] == 0
    assert (snap / "epoch-7.pth").read_bytes() == b"older run, epoch 7"
    # the resumed run knows (from the checkpoint) that epoch-0.pth is its own: pruned
    run_script(TRAIN, ["-c", "last"] + args_for(voc_root, tmp_path / "log", keep), monkeypatch)
    names = sorted(p.name for p in snap.iterdir() if not p.name.startswith("."))
    assert names == ["epoch-1.pth", "epoch-7.pth", "epoch-last.pth"]
    assert ck.load_file(snap / "epoch-1.pth")["epoch"] == 1
    assert (snap / "epoch-7.pth").read_bytes() == b"older run, epoch 7"


# ----------------------------------------------------------------------- 2. demo folder

def test_regenerating_the_demo_keeps_user_files(tmp_path, capsys):
    from furnace.data import demo
    root = tmp_path / "demo"
    small = ["--root", str(root), "--n-train", "4", "--n-val", "2", "--size", "32"]
    assert demo.main(small) == 0
    assert demo.main(small + ["--seed", "1"]) == 0           # only its own files: replaced
    assert json.loads((root / demo.STAMP_NAME).read_text())["seed"] == 1
    (root / "notes.txt").write_text("mine")
    (root / "val" / "image" / "extra.png").write_bytes(b"mine too")
    capsys.readouterr()
    assert demo.main(small + ["--seed", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: demo data root") and "notes.txt" in err[0]
    assert (root / "notes.txt").read_text() == "mine"
    assert (root / "val" / "image" / "extra.png").read_bytes() == b"mine too"
    assert json.loads((root / demo.STAMP_NAME).read_text())["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo.tmp")]


# ----------------------------------------------------------------------- 3. dying writer

WRITER_DIES = """
    import errno
    import tensorboardX.event_file_writer as efw
    _real, _n = efw.EventsWriter.write_event, [0]

    def _dying(self, event):
        _n[0] += 1
        if _n[0] > 3:                       # the log folder is full from the 4th event on
            raise OSError(errno.ENOSPC, "No space left on device")
        return _real(self, event)
    efw.EventsWriter.write_event = _dying
"""


def test_a_dying_tensorboard_writer_is_dropped_and_training_finishes(voc_root, tmp_path):
    log = tmp_path / "log"
    # 2 x 4 iterations, about 16 events each: the writer's queue (10) fills many times over
    rc, out, err = run_train(args_for(voc_root, log, ["niters_per_epoch=4",
                                                      "tb_images_every=1"]),
                             patch=WRITER_DIES)
    assert rc == 0, err[-3000:]
    warned = [l for l in err.splitlines() if "tensorboard events stop here" in l]
    assert len(warned) == 1 and "No space left on device" in warned[0], err[-3000:]
    assert "Traceback" not in err
    text = train_log(log)
    assert text.count("Epoch 2/2 Iter") == 4 and "# stopped: finished" in text
    assert ck.load_file(log / "snapshot" / "epoch-1.pth")["epoch"] == 1


def test_sigterm_is_honoured_after_the_writer_died(voc_root, tmp_path):
    log = tmp_path / "log"
    proc = train_proc(args_for(voc_root, log, ["nepochs=1", "niters_per_epoch=400",
                                               "tb_images_every=1"]), patch=WRITER_DIES)
    lines = queue.Queue()
    # a hung run writes nothing more: read stderr in a thread, wait on it with a deadline
    reader = threading.Thread(target=lambda: [lines.put(l) for l in proc.stderr], daemon=True)
    reader.start()
    seen, err = "", ""
    try:
        deadline = time.time() + TIMEOUT
        while "tensorboard events stop here" not in seen and time.time() < deadline:
            try:
                seen += lines.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                break
        assert "tensorboard events stop here" in seen, seen[-3000:]
        time.sleep(3)                           # well past the point the old loop blocked
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        while not lines.empty():
            err += lines.get()
    assert proc.returncode == 128 + signal.SIGTERM, (seen + err)[-3000:]
    assert "interrupted by SIGTERM" in err and "resume with -c last" in err
    last = ck.load_file(log / "snapshot" / "epoch-last.pth")
    assert last["epoch"] == 0 and 0 < last["resume_at"][1] < 400
    assert "# stopped: interrupted (SIGTERM)" in train_log(log)


# ----------------------------------------------------------------------- 4. full disk

def _file_size_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_file(voc_root, tmp_path):
    log = tmp_path / "log"
    snap = log / "snapshot"
    snap.mkdir(parents=True)
    previous = {"epoch": 0, "w": torch.arange(10.0)}
    torch.save(previous, snap / "epoch-last.pth")
    before = (snap / "epoch-last.pth").read_bytes()
    # logs and events fit in 4 MB, a checkpoint (tens of MB) does not
    rc, out, err = run_train(args_for(voc_root, log, ["tb_images_every=0"]),
                             preexec=_file_size_limit(4 << 20))
    assert rc == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"error: cannot write checkpoint {snap / 'epoch-0.pth'}: ")
    assert "previous checkpoint there (if any) is intact" in lines[0]
    assert (snap / "epoch-last.pth").read_bytes() == before
    assert sorted(p.name for p in snap.iterdir()) == ["epoch-last.pth"]   # no .tmp left


def test_atomic_save_over_the_size_limit_removes_its_temporary(tmp_path):
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from furnace.engine.checkpoint import CheckpointError, atomic_save
        atomic_save({{"w": torch.ones(10)}}, {str(tmp_path / 'a.pth')!r})
        try:
            atomic_save({{"w": torch.ones(1 << 20)}}, {str(tmp_path / 'a.pth')!r})
        except CheckpointError as e:
            print(str(e))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, preexec_fn=_file_size_limit(1 << 20))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"cannot write checkpoint {tmp_path / 'a.pth'}: ")
    assert res.stdout.count("\n") == 1 and "Traceback" not in res.stderr
    assert torch.equal(ck.load_file(tmp_path / "a.pth")["w"], torch.ones(10))
    assert sorted(os.listdir(tmp_path)) == ["a.pth"]


# ----------------------------------------------------------------------- 5. stale temporaries

def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_run_removes_temporaries_of_killed_saves_only(tmp_path, caplog):
    snap = tmp_path / "log" / "snapshot"
    snap.mkdir(parents=True)
    # a save killed by SIGKILL mid-write (as in test_killed_while_saving_leaves_last_loadable)
    kill_while_saving(f"""
        atomic_save({{"w": torch.ones(10**6), "s": Slow()}}, {str(snap / 'epoch-2.pth')!r})
    """)
    killed = [n for n in os.listdir(snap) if n.startswith(".epoch-2.pth.tmp")]
    assert killed, "the killed save left no temporary to test with"
    dead = snap / f".epoch-3.pth.tmp{_dead_pid()}"
    dead.write_bytes(b"x" * 1000)
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = snap / f".epoch-4.pth.tmp{live_proc.pid}"      # a save in progress elsewhere
        live.write_bytes(b"y")
        other = snap / ".notes.tmp123"                        # not this framework's
        other.write_bytes(b"z")
        C = {"log_dir": str(tmp_path / "log"), "snapshot_dir": str(snap),
             "backbone": "resnet18"}
        with caplog.at_level("WARNING", logger="furnace.engine"):
            with run_guard(C):
                pass
        left = sorted(os.listdir(snap))
        assert left == sorted([live.name, other.name])
        msgs = [r.getMessage() for r in caplog.records if "stale temporary" in r.getMessage()]
        assert len(msgs) == 1 and "removed 2 stale temporary file(s)" in msgs[0]
        assert "\n" not in msgs[0]
    finally:
        live_proc.kill()
        live_proc.wait()


# ----------------------------------------------------------------------- 6. late failures

def test_missing_val_list_fails_at_start(voc_root, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run_script(TRAIN, args_for(voc_root, tmp_path / "log",
                                   ["eval_every=1", "eval_source=missing_val.txt"]),
                   monkeypatch)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing_val.txt" in err[0] and err[0].startswith("error: ")
    log = train_log(tmp_path / "log") if list((tmp_path / "log").glob("train_*.log")) else ""
    assert "Epoch 1/2 Iter" not in log                        # failed before any training


def test_epoch_checkpoint_is_written_before_its_validation(voc_root, tmp_path, monkeypatch):
    import furnace.eval.loop

    def broken(*a, **k):
        raise RuntimeError("validation crashed")
    monkeypatch.setattr(furnace.eval.loop, "evaluate_model", broken)
    with pytest.raises(RuntimeError, match="validation crashed"):
        run_script(TRAIN, args_for(voc_root, tmp_path / "log",
                                   ["eval_every=1", "eval_crop_size=48", "tb_images_every=0"]),
                   monkeypatch)
    state = ck.load_file(tmp_path / "log" / "snapshot" / "epoch-0.pth")
    assert state["epoch"] == 0 and state["resume_at"] == [1, 0]


def test_best_survives_a_resume_although_epoch_files_precede_validation(voc_root, tmp_path,
                                                                         monkeypatch):
    # epoch 0 validates at 0.5, epoch 1 at 0.3; epoch-0.pth was written before its validation
    # (best None in it), so the resumed run must take 0.5 from the run's best.pth
    import furnace.eval.loop
    scores = iter([0.5, 0.3])
    monkeypatch.setattr(furnace.eval.loop, "evaluate_model",
                        lambda *a, **k: {"miou": next(scores), "pixel_acc": 0.9})
    extra = ["eval_every=1", "tb_images_every=0", "niters_per_epoch=1"]
    log = tmp_path / "log"
    run_script(TRAIN, args_for(voc_root, log, extra + ["stop_after_epoch=0"]), monkeypatch)
    assert ck.load_file(log / "snapshot" / "epoch-0.pth")["best_miou"] is None
    run_script(TRAIN, ["-c", "last"] + args_for(voc_root, log, extra), monkeypatch)
    best = ck.load_file(log / "snapshot" / "best.pth")
    assert best["best_miou"] == 0.5 and best["epoch"] == 0
    assert ck.load_file(log / "snapshot" / "epoch-1.pth")["best_miou"] == 0.5
    assert "(best 50.000%)" in train_log(log)


# ----------------------------------------------------------------------- 7. crafted fields

@pytest.fixture(scope="module")
def real_checkpoint(voc_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("crafted")
    rc, _, err = run_train(args_for(voc_root, out / "log", ["nepochs=3", "stop_after_epoch=0",
                                                           "tb_images_every=0"]))
    assert rc == 0, err[-3000:]
    return ck.load_file(out / "log" / "snapshot" / "epoch-last.pth")


@pytest.mark.parametrize("field, value, named", [
    ("resume_at", [-3, -2], "resume_at"),
    ("resume_at", [1], "resume_at"),
    ("resume_at", [1, "0"], "resume_at"),
    ("resume_at", [9, 0], "resume_at"),          # beyond nepochs=3
    ("resume_at", [1, 10 ** 6], "resume_at"),    # beyond the iterations of an epoch
    ("method", 7, "method"),
    ("method", "bogus", "bogus"),
    ("best_miou", float("nan"), "best_miou"),
    ("best_miou", {"hybrid": 1.5}, "best_miou"),      # one best per eval model, each <= 1
    ("extra", [1, 2], "extra"),
    ("rng", {"python": 1}, "rng"),
    ("optimizer_1", {"state": {}, "param_groups": "x"}, "optimizer_1"),
])
def test_crafted_checkpoint_fields_are_refused(real_checkpoint, tmp_path, voc_root, field,
                                               value, named, monkeypatch, capsys):
    state = dict(real_checkpoint)
    state[field] = value
    path = tmp_path / "crafted.pth"
    torch.save(state, path)
    with pytest.raises(SystemExit) as e:
        run_script(TRAIN, ["-c", str(path)] + args_for(voc_root, tmp_path / "log",
                                                        ["nepochs=3", "tb_images_every=0"]),
                   monkeypatch)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert str(path) in lines[0] and named in lines[0]
    assert not list((tmp_path / "log").glob("train_*.log")) or \
        "Epoch" not in train_log(tmp_path / "log")


def test_check_resume_fields_accepts_what_training_writes(real_checkpoint):
    ck.check_resume_fields(real_checkpoint, "x.pth", nepochs=3, max_iter=2)
    assert real_checkpoint["resume_at"] == [1, 0]


# ----------------------------------------------------------------------- 8. method-changing keys

@pytest.mark.parametrize("extra, named", [
    (["u2pl.sup_only_epoch=2", "nepochs=2"], "u2pl.sup_only_epoch"),
    (["u2pl.low_rank=5", "u2pl.high_rank=5"], "u2pl.low_rank"),
    (["u2pl.low_rank=6", "u2pl.high_rank=20", "num_classes=5", "class_names=none"],
     "u2pl.low_rank"),
])
def test_options_that_turn_u2pl_into_another_method_are_refused(extra, named, capsys):
    from furnace.engine.cli import train_main
    with pytest.raises(SystemExit) as e:
        train_main(str(ROOT / "exp_voc"), method="u2pl",
                   argv=["--print-config", "--set", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0]


def test_u2pl_combinations_that_have_a_use_still_load():
    C = load_config(ROOT / "exp_voc", ["method=u2pl", "nepochs=2", "u2pl.sup_only_epoch=1",
                                       "u2pl.low_rank=3", "u2pl.high_rank=20"], env={})
    assert C.u2pl.sup_only_epoch == 1
    # SupOnly trains supervised by design; contrastive off needs no negatives
    load_config(ROOT / "exp_voc", ["method=u2pl_suponly", "nepochs=1"], env={})
    load_config(ROOT / "exp_voc", ["method=u2pl", "u2pl.contrastive=off", "u2pl.low_rank=5",
                                   "u2pl.high_rank=5"], env={})


# ----------------------------------------------------------------------- 9. messages

def test_empty_labelled_list_is_named(tmp_path):
    root = make_voc(tmp_path / "voc", n_train=4, n_val=1, num_classes=5)
    lst = root / "subset_train_aug" / "train_aug_labeled_1-2.txt"
    lst.write_text("\n")
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "exp_voc", [f"dataset_path={root}", "labeled_ratio=2"], env={})
    assert str(lst) in str(e.value) and "is empty" in str(e.value)
    assert "num_train_imgs" not in str(e.value)


def test_print_config_with_an_unknown_method_is_an_error(capsys):
    from furnace.engine.cli import train_main
    with pytest.raises(SystemExit) as e:
        train_main(str(ROOT / "exp_voc"), argv=["--print-config", "--set", "method=bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'bogus'" in err[0] and "known" in err[0]


def test_a_text_file_as_checkpoint_is_one_clear_line(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello world\n")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_file(path)
    msg = str(e.value)
    assert str(path) in msg and "text file" in msg and "KeyError" not in msg
    assert "\n" not in msg


def test_unknown_method_in_a_checkpoint_names_the_file(voc_root, tmp_path, capsys):
    from furnace.eval.cli import main as eval_main
    path = tmp_path / "epoch-3.pth"
    torch.save({"method": "bogus", "model": {}}, path)
    with pytest.raises(SystemExit) as e:
        eval_main(ROOT / "exp_voc", ["-d", "cpu", "-e", str(path), "--set",
                                     f"dataset_path={voc_root}", "num_classes=5",
                                     "class_names=none", f"log_dir={tmp_path / 'log'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "'bogus'" in err[0]
    assert "config key" not in err[0]


def test_eval_p_pointing_at_a_file_is_one_line(tmp_path, capsys):
    from furnace.eval.cli import main as eval_main
    target = tmp_path / "images"
    target.write_text("a file")
    with pytest.raises(SystemExit) as e:
        eval_main(ROOT / "exp_voc", ["-e", "last", "-s", "-p", str(target)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: -p {target} is a file; -p takes the folder the images go to (it "
                   "is created if missing)"]
    assert target.read_text() == "a file"


SLOW_STEPS = """
    import time
    from furnace.methods.dueb import DUEB as _M
    _real = _M.train_step

    def _slow(self, *a, **k):
        print("step", flush=True)
        time.sleep(1.5)                     # both Ctrl-C land inside one iteration
        return _real(self, *a, **k)
    _M.train_step = _slow
"""


def test_ctrl_c_twice_is_one_line_and_logged_as_interrupted(voc_root, tmp_path):
    log = tmp_path / "log"
    proc = train_proc(args_for(voc_root, log, ["nepochs=1", "niters_per_epoch=50",
                                               "tb_images_every=0"]), patch=SLOW_STEPS)
    try:
        steps = 0
        while steps < 2:                        # into the second step: the loop runs
            line = proc.stdout.readline()
            assert line, "the run ended before its second step"
            steps += line.count("step")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "Ctrl-C" in lines[0] and "Traceback" not in err, err[-3000:]
    text = train_log(log)
    # the head line records the config, whose keys may say "error" (eln.zero_errors): look
    # at every line after it
    body = text.splitlines()[1:]
    assert [l for l in body if l.startswith("# stopped:")] == [
        "# stopped: interrupted (second SIGINT, not saved)"], text[-2000:]
    assert not [l for l in body if "error" in l.lower()], text[-2000:]


# ----------------------------------------------------------------------- 10. test disk use

def test_pytest_keeps_only_failed_runs_temporaries():
    import re
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.pytest.ini_options]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^tmp_path_retention_policy = "failed"$', section, re.M)
    count = re.search(r'^tmp_path_retention_count = "?(\d+)"?$', section, re.M)
    assert count and int(count.group(1)) <= 1
