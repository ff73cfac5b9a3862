"""torchrun with 2 CPU processes (gloo): one set of checkpoints, identical replicas."""
import os
import re
import socket
import subprocess
import sys

from conftest import ROOT
from helpers import make_voc
from furnace.engine import checkpoint as ck

TINY = ["backbone=resnet18", "pretrained_model=none", "image_height=48", "image_width=48",
        "batch_size=4", "nepochs=2", "niters_per_epoch=2", "num_workers=0", "snapshot_iter=1",
        "snapshot_from=-1", "aleatoric.samples=2"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tmp_path):
    root = make_voc(tmp_path / "voc", n_train=12, n_val=2, num_classes=21)
    log = tmp_path / "log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(ROOT / "exp_voc" / "train.py"), "-d", "cpu",
           "--set", f"dataset_path={root}", f"log_dir={log}", "labeled_ratio=2", *TINY]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    snap = log / "snapshot"
    assert sorted(p.name for p in snap.iterdir()) == ["epoch-0.pth", "epoch-1.pth",
                                                      "epoch-last.pth"]
    assert ck.load_file(snap / "epoch-last.pth")["epoch"] == 1
    logs = list(log.glob("train_*.log"))
    assert len(logs) == 1, "only rank 0 writes the train log"
    text = logs[0].read_text()
    assert "world_size=2" in text
    m = re.search(r"max parameter difference across 2 ranks: (\S+)", text)
    assert m and float(m.group(1)) == 0.0
