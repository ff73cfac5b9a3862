"""Tiny datasets on disk in the VOC and Cityscapes layouts of the CPS archives (for tests)."""
import hashlib
import os
import runpy
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np


def _sample(rng, h, w, num_classes):
    """A noisy image with a few filled rectangles; the label is the rectangle's class."""
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.zeros((h, w), np.uint8)
    for _ in range(3):
        c = int(rng.integers(1, num_classes))
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        y1, x1 = y0 + int(rng.integers(6, h // 2)), x0 + int(rng.integers(6, w // 2))
        label[y0:y1, x0:x1] = c
        img[y0:y1, x0:x1] = (rng.integers(0, 256, 3) // 2 + c * 10).astype(np.uint8)
    label[0, :4] = 255  # a few ignore pixels
    return img, label


def make_voc(root, n_train=16, n_val=4, num_classes=5, size=(48, 64), ratios=(2, 4), seed=0):
    """VOC layout: train_aug/{image,label}, val/{image,label}, val.txt, subset_train_aug lists."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = {"train_aug": [f"t{i:04d}" for i in range(n_train)],
           "val": [f"v{i:04d}" for i in range(n_val)]}
    for folder, names in ids.items():
        (root / folder / "image").mkdir(parents=True, exist_ok=True)
        (root / folder / "label").mkdir(parents=True, exist_ok=True)
        for name in names:
            img, label = _sample(rng, *size, num_classes)
            cv2.imwrite(str(root / folder / "image" / f"{name}.jpg"), img[:, :, ::-1])
            cv2.imwrite(str(root / folder / "label" / f"{name}.png"), label)
    (root / "val.txt").write_text("\n".join(ids["val"]) + "\n")
    (root / "train_aug.txt").write_text("\n".join(ids["train_aug"]) + "\n")
    sub = root / "subset_train_aug"
    sub.mkdir(exist_ok=True)
    for r in ratios:
        k = -(-n_train // r)
        (sub / f"train_aug_labeled_1-{r}.txt").write_text("\n".join(ids["train_aug"][:k]) + "\n")
        (sub / f"train_aug_unlabeled_1-{r}.txt").write_text("\n".join(ids["train_aug"][k:]) + "\n")
    return root


def make_city(root, n_train=16, n_val=4, num_classes=19, size=(48, 96), ratios=(2, 4), seed=0):
    """Cityscapes layout: images/, segmentation/, config_new/ two-column lists."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    lines = {}
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "segmentation" / split).mkdir(parents=True, exist_ok=True)
        lines[split] = []
        for i in range(n):
            name = f"city_{split}_{i:06d}_000019"
            img, label = _sample(rng, *size, num_classes)
            cv2.imwrite(str(root / "images" / split / f"{name}.png"), img[:, :, ::-1])
            cv2.imwrite(str(root / "segmentation" / split / f"{name}_gtFine.png"), label)
            lines[split].append(f"/images/{split}/{name}.png\t/segmentation/{split}/{name}_gtFine.png")
    cfg = root / "config_new"
    (cfg / "subset_train").mkdir(parents=True, exist_ok=True)
    (cfg / "val.txt").write_text("\n".join(lines["val"]) + "\n")
    (cfg / "train.txt").write_text("\n".join(lines["train"]) + "\n")
    for r in ratios:
        k = -(-n_train // r)
        (cfg / "subset_train" / f"train_aug_labeled_1-{r}.txt").write_text(
            "\n".join(lines["train"][:k]) + "\n")
        (cfg / "subset_train" / f"train_aug_unlabeled_1-{r}.txt").write_text(
            "\n".join(lines["train"][k:]) + "\n")
    return root


def tree_digest(root):
    """sha256 over the relative paths and bytes of every file under root, in sorted order."""
    h = hashlib.sha256()
    for dp, dn, fs in sorted(os.walk(root)):
        dn.sort()
        for f in sorted(fs):
            p = os.path.join(dp, f)
            h.update(os.path.relpath(p, root).encode())
            h.update(Path(p).read_bytes())
    return h.hexdigest()


def free_port():
    """A TCP port free on 127.0.0.1 now (for torchrun / gloo process groups in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_args(root, out, tiny, extra=()):
    """A tiny experiment script's command line on the fake VOC data at ``root`` (5 classes,
    CPU), writing under ``out``: the script's ``tiny`` keys, then ``extra``."""
    return ["-d", "cpu", "--set", f"dataset_path={root}", f"log_dir={out / 'log'}",
            "num_classes=5", "class_names=none", *tiny, *extra]


def torchrun_script(path, args, nproc=2, timeout=500):
    """Run an experiment script under ``torchrun --nproc_per_node=nproc`` (one CPU thread a
    process) and return the finished process, checked to have exited 0."""
    import os
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(path), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def run_script(path, args, monkeypatch):
    """Run an experiment script as ``python path args...`` in this process."""
    monkeypatch.setattr(sys, "argv", [str(path)] + list(args))
    runpy.run_path(str(path), run_name="__main__")


_STALLING_SAVE = """
import sys, time, torch
sys.path.insert(0, {root!r})
from furnace.engine.checkpoint import atomic_save, save_checkpoint

class Slow:
    # pickling this stalls the save mid-write, after telling the parent
    def __reduce__(self):
        print("writing", flush=True)
        time.sleep(60)
        return (int, (0,))

"""


def kill_while_saving(calls: str, during=None) -> None:
    """Run ``calls`` (Python using ``atomic_save``/``save_checkpoint`` and ``Slow()``, an
    object whose pickling stalls) in a child process and SIGKILL it mid-write; ``during()``
    runs just before the kill."""
    root = Path(__file__).resolve().parent.parent
    script = _STALLING_SAVE.format(root=str(root)) + textwrap.dedent(calls)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(0.2)
        if during is not None:
            during()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
