"""torchrun with 2 CPU processes (gloo): one set of checkpoints, identical replicas."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers import free_port, make_voc
from furnace.engine import checkpoint as ck

TINY = ["backbone=resnet18", "head_channels=16", "pretrained_model=none", "image_height=48",
        "image_width=48",
        "batch_size=4", "nepochs=2", "niters_per_epoch=2", "num_workers=0", "snapshot_iter=1",
        "snapshot_from=-1", "aleatoric.samples=2"]


def test_torchrun_two_processes(tmp_path):
    root = make_voc(tmp_path / "voc", n_train=12, n_val=2, num_classes=21)
    log = tmp_path / "log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(ROOT / "exp_voc" / "train.py"), "-d", "cpu",
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


PLUGIN = '''
import os, signal
import torch
import torch.nn.functional as F
from furnace.methods import Method, register


class Net(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                        torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.classifier = torch.nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        return self.classifier(self.body(x))


@register
class TinyDDP(Method):
    name = "tiny_ddp"
    streams = ("labeled",)

    def __init__(self, C, ctx):
        super().__init__(C, ctx)
        self.net = ctx.prepare(Net(C.num_classes))
        self.modules = {"model": self.net}
        self.optimizers = {"opt": torch.optim.SGD(self.net.parameters(), lr=C.lr)}

    def train_step(self, batches, *, iteration, epoch, backward):
        (lab,) = batches
        loss = F.cross_entropy(self.net(lab["data"]), lab["label"], ignore_index=255)
        backward(loss)
        if iteration == 2 and os.environ.get("RANK") == "1":   # only rank 1 is signalled
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss.detach(), {"loss": loss.detach()}, {}

    @classmethod
    def build_eval_model(cls, C):
        return Net(C.num_classes)
'''

SCRIPT = '''
import os, sys
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [{root!r}, HERE]
import tiny_plugin  # noqa: F401  (registers the method)
from furnace.engine.cli import train_main
train_main(HERE, method="tiny_ddp")
'''


def test_torchrun_signal_on_one_rank_stops_all_ranks_together(tmp_path):
    """A method from a file outside the package, under torchrun: SIGUSR1 reaches rank 1 only;
    the stop request rides on the loss all-reduce, so both ranks finish iteration 2, rank 0
    writes a resumable checkpoint, and nobody hangs."""
    root = make_voc(tmp_path / "voc", n_train=12, n_val=2, num_classes=21)
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "tiny_plugin.py").write_text(PLUGIN)
    (exp / "train.py").write_text(SCRIPT.format(root=str(ROOT)))
    (exp / "config.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from furnace.config import base_config\nconfig = base_config()\n")
    log = tmp_path / "log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(exp / "train.py"), "-d", "cpu",
           "--set", f"dataset_path={root}", f"log_dir={log}", "labeled_ratio=2",
           "pretrained_model=none", "image_height=32", "image_width=32", "batch_size=4",
           "nepochs=2", "niters_per_epoch=5", "num_workers=0", "train_scale_array=[1.0]",
           "tb_images_every=0"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode != 0                       # 128 + SIGUSR1 from both workers
    assert res.stderr.count("interrupted by SIGUSR1 at epoch 0 iteration 2") == 2, \
        res.stderr[-3000:]
    state = ck.load_file(log / "snapshot" / "epoch-last.pth")
    assert state["method"] == "tiny_ddp" and state["resume_at"] == [0, 3]
    text = next(log.glob("train_*.log")).read_text()
    assert text.count("\nEpoch 1/2 Iter") == 3 and "# stopped: interrupted (SIGUSR1)" in text


def test_one_image_per_process_needs_a_global_batch_of_two():
    from furnace.data import DataError, per_process_batch
    assert per_process_batch(2, 2) == 1          # SyncBatchNorm sees both processes' images
    assert per_process_batch(4, 2) == 2
    with pytest.raises(DataError, match="batch_size=1 over world_size=1"):
        per_process_batch(1, 1)


def test_torchrun_one_image_per_process(tmp_path):
    """batch_size=2 on 2 processes: SyncBatchNorm normalises over both images, so the ASPP
    pooled branch trains with one image per process."""
    root = make_voc(tmp_path / "voc", n_train=8, n_val=2, num_classes=5)
    log = tmp_path / "log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    tiny = [a for a in TINY if not a.startswith(("batch_size", "nepochs"))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(ROOT / "exp_voc" / "train.py"), "-d", "cpu",
           "--set", f"dataset_path={root}", f"log_dir={log}", "labeled_ratio=2",
           "num_classes=5", "batch_size=2", "nepochs=1", *tiny]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = next(log.glob("train_*.log")).read_text()
    assert "world_size=2" in text
    m = re.search(r"max parameter difference across 2 ranks: (\S+)", text)
    assert m and float(m.group(1)) == 0.0
