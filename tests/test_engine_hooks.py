"""What ELN- and LPL-like methods declare without touching the engine (issue 21): streams of
their own (weak and strong views of one crop), two optimisers with different LR schedules, an
epoch-start hook told whether the run resumed, and two eval models, each validated with its
own best checkpoint."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from conftest import ROOT
from helpers import make_voc
from furnace.config import load_config
from furnace.data import StreamSpec
from furnace.data.cutmix import SEED_KEY
from furnace.engine import checkpoint as ck
from furnace.engine.dist import DistInfo
from furnace.engine.lr import ConstantLR, PolyLR
from furnace.engine.trainer import train
from furnace.methods import Method, register
from test_methods import TINY_DATA, TinyNet


class StrongView:
    """Collate adding ``strong``: the same crop with a per-image contrast and brightness
    jitter drawn from the sample's own seed (so it does not depend on the workers)."""

    def __call__(self, samples):
        seeds = [s.pop(SEED_KEY) for s in samples]
        batch = default_collate(samples)
        jitter = [np.random.default_rng([int(v) for v in sd] + [7]).uniform(0.5, 1.5, 2)
                  for sd in seeds]
        a = torch.tensor([j[0] for j in jitter], dtype=batch["data"].dtype).view(-1, 1, 1, 1)
        b = torch.tensor([j[1] - 1 for j in jitter], dtype=batch["data"].dtype).view(-1, 1, 1, 1)
        batch["strong"] = batch["data"] * a + b
        return batch


def strong_view(C):
    return StrongView()


SEEN = {"epoch_start": [], "views": []}


@register(replace=True)
class WeakStrong(Method):
    """A student on labelled data and on the strong view of an unlabelled crop (target: the
    weak view's argmax), and an auxiliary network with its own optimiser and a constant LR."""

    name = "weak_strong_test"
    streams = (StreamSpec("lab", "train", index=0),
               StreamSpec("views", "unlabeled", index=5, collate=strong_view))

    def __init__(self, C, ctx):
        super().__init__(C, ctx)
        self.student = ctx.prepare(TinyNet(C.num_classes))
        self.aux = ctx.prepare(TinyNet(C.num_classes))
        self.modules = {"student": self.student, "aux": self.aux}
        self.optimizers = {
            "opt_student": torch.optim.SGD(self.student.parameters(), lr=C.lr, momentum=0.9),
            "opt_aux": torch.optim.AdamW(self.aux.parameters(), lr=1e-3)}

    def lr_schedules(self, total_iters, warmup_iters=0):
        return {"opt_student": PolyLR(self.C.lr, self.C.lr_power, total_iters),
                "opt_aux": ConstantLR(1e-3)}

    def on_epoch_start(self, epoch, *, resumed):
        SEEN["epoch_start"].append((epoch, resumed))

    def train_step(self, batches, *, iteration, epoch, backward):
        lab, views = batches
        weak, strong = views["data"], views["strong"]
        # one geometry: the strong view is an affine function of the weak one, per image
        fit = [float(np.corrcoef(w.flatten(), s.flatten())[0, 1]) for w, s in
               zip(weak.numpy(), strong.numpy())]
        SEEN["views"].append((min(fit), float((strong - weak).abs().max())))
        sup = F.cross_entropy(self.student(lab["data"]), lab["label"], ignore_index=255)
        with torch.no_grad():
            target = self.student(weak).argmax(1)
        cons = F.cross_entropy(self.student(strong), target)
        aux = F.cross_entropy(self.aux(lab["data"]), lab["label"], ignore_index=255)
        loss = sup + cons + aux
        backward(loss)
        return loss.detach(), {"loss": loss.detach(), "aux": aux.detach()}, {}

    def eval_models(self):
        return {"student": self.student, "aux": self.aux}

    @classmethod
    def build_eval_model(cls, C):
        return TinyNet(C.num_classes)

    checkpoint_model_key = "student"


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"), n_train=12, n_val=3, num_classes=5)


def config(root, log_dir, extra=()):
    return load_config(ROOT / "exp_voc", [f"dataset_path={root}", f"log_dir={log_dir}",
                                          "num_classes=5", "class_names=none",
                                          "method=weak_strong_test", "nepochs=2",
                                          "niters_per_epoch=3", "eval_every=1", *TINY_DATA,
                                          *extra], env={})


def test_method_declares_streams_schedules_epoch_hook_and_eval_models(voc_root, tmp_path):
    SEEN.update(epoch_start=[], views=[])
    C = config(voc_root, tmp_path / "log", ["stop_after_epoch=0"])
    snap = train(C, DistInfo())
    assert SEEN["epoch_start"] == [(0, False)]
    assert len(SEEN["views"]) == 3
    assert all(fit > 0.999 and diff > 1e-3 for fit, diff in SEEN["views"]), \
        "two different views of one crop"
    # resumed: the hook is told so, once, at the first epoch of the resumed run
    C = config(voc_root, tmp_path / "log")
    train(C, DistInfo(), resume=str(snap / "epoch-0.pth"))
    assert SEEN["epoch_start"] == [(0, False), (1, True)]

    state = ck.load_file(snap / "epoch-1.pth")
    lr_student = [g["lr"] for g in state["opt_student"]["param_groups"]]
    lr_aux = [g["lr"] for g in state["opt_aux"]["param_groups"]]
    poly = PolyLR(C.lr, C.lr_power, 2 * 3).get_lr(5)
    assert lr_student == [pytest.approx(poly)] and poly < C.lr
    assert lr_aux == [1e-3], "the aux optimiser keeps its constant LR"

    log = "".join(p.read_text() for p in sorted((tmp_path / "log").glob("train_*.log")))
    for name in ("student", "aux"):
        lines = [l for l in log.splitlines() if l.startswith(f"# val epoch 2 {name}: mIoU")]
        assert len(lines) == 1
        best = ck.load_file(snap / f"best-{name}.pth")
        assert isinstance(best["best_miou"], dict) and name in best["best_miou"]
    assert not (snap / "best.pth").exists()


def test_streams_must_be_buildable():
    with pytest.raises(ValueError, match="streams"):
        register(type("Bad2", (Method,), {"name": "bad2", "streams": (StreamSpec("x"), 3)}))
