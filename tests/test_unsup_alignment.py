"""The unsupervised path end to end on one real batch: u0/u1/mask alignment, pseudo labels
against the mixed image the students see, teachers in train mode without gradients, and the
CutMix of the teacher logits (issue: semi-supervision must not learn from misaligned labels)."""
import torch
from torch import nn

from conftest import ROOT
from helpers import make_voc
from furnace.config import load_config
from furnace.data import TrainLoaders
from furnace.methods.dueb import DUEBStep
import furnace.methods.dueb as dueb_module


class PixelOracle(nn.Module):
    """A per-pixel classifier (1x1 conv, no BatchNorm, no resampling): its labels of a CutMix
    image are exactly the CutMix of its labels of the two source images, so any misalignment of
    images, masks or teacher logits shows up as a label mismatch. Records every call."""

    def __init__(self, num_classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.calls = []

    def forward(self, x, step):
        self.calls.append({"step": step, "input": x.detach().clone(), "training": self.training,
                           "grad": torch.is_grad_enabled()})
        z = self.conv(x)
        return z, z, torch.ones_like(z[:, :1])


def test_pseudo_labels_match_the_mixed_image(tmp_path, monkeypatch):
    root = make_voc(tmp_path / "voc", n_train=16, n_val=2, num_classes=5, size=(40, 56))
    C = load_config(ROOT / "exp_voc", [
        f"dataset_path={root}", "num_classes=5", "labeled_ratio=4", "image_height=32",
        "image_width=32", "batch_size=4", "num_workers=0", "train_scale_array=[0.75,1.25]",
        "total_train_imgs=16", "niters_per_epoch=2", "dueb.aleatoric.enabled=false",
        "dueb.energy.enabled=false", f"log_dir={tmp_path / 'log'}"], env={})
    lab, u0, u1 = next(TrainLoaders(C).epoch(0))
    mask = u0["mask"]
    B, _, H, W = u0["data"].shape
    assert mask.shape == (B, 1, H, W) and u1["data"].shape == (B, 3, H, W)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < float(mask.mean()) < 1                      # both sources appear
    assert not torch.equal(u0["data"], u1["data"])         # two independent streams

    seen = {}
    real_unsup_ce = dueb_module.unsup_ce

    def spy(logits, label, weight, ignore_index=255):
        seen.setdefault("labels", []).append(label.clone())
        return real_unsup_ce(logits, label, weight, ignore_index)

    monkeypatch.setattr(dueb_module, "unsup_ce", spy)
    oracle = PixelOracle(C.num_classes).train()
    DUEBStep(oracle, C, batch_per_process=4)(lab, u0, u1)

    mixed = u0["data"] * (1 - mask) + u1["data"] * mask
    # where the mask is 1 the mixed image is u1, elsewhere u0, pixel for pixel
    assert torch.equal(mixed[mask.expand_as(mixed) == 1], u1["data"][mask.expand_as(mixed) == 1])
    assert torch.equal(mixed[mask.expand_as(mixed) == 0], u0["data"][mask.expand_as(mixed) == 0])
    with torch.no_grad():
        want = oracle.conv(mixed).argmax(1)
    # branch 1 learns the intersection labels, branch 2 the union; with identical teachers
    # both equal the oracle's labels of the mixed image
    assert len(seen["labels"]) == 2
    for label in seen["labels"]:
        assert torch.equal(label, want)

    calls = oracle.calls
    teachers = [c for c in calls if not c["grad"]]
    students = [c for c in calls if c["grad"]]
    assert len(teachers) == 4 and all(c["training"] for c in teachers)  # reference: train mode
    assert [torch.equal(c["input"], x) for c, x in
            zip(teachers, (u0["data"], u1["data"], u0["data"], u1["data"]))] == [True] * 4
    assert [c["step"] for c in teachers] == [1, 1, 2, 2]
    assert torch.equal(students[0]["input"], lab["data"])
    assert [torch.equal(c["input"], mixed) for c in students[2:]] == [True, True]
    assert [c["step"] for c in students] == [1, 2, 1, 2]
