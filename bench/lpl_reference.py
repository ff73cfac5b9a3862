"""Benchmark: one LPL stage-1 iteration, ours against the original code, on CPU at equal
settings (same network and weights, same batch, fp32).

    python bench/lpl_reference.py [--mirror PATH] [--backbone resnet50] [--crop 128]
                                  [--half 2] [--repeat 3]

* original: YudeWang/Learning-Pseudo-Label's own modules (its DeepLabv3+ with the
  PyTorch-Encoding ResNet, its ``ClassLogSoftMax`` and ``SegLoss``), read at run time from a
  local mirror of the repository (``fetch github:YudeWang/Learning-Pseudo-Label`` gives one;
  nothing of it is copied here), driven through one iteration in the order of its
  ``train.py`` (spec methods/LPL.md 3.7): both forwards, the two class-aware softmaxes, GT
  replacement, the four losses, the IoU counts with ``torch.unique``, backward, both SGD steps;
* ours: ``furnace.methods.lpl.LPL.train_step`` and both SGD steps, the networks holding the
  original's weights (the state-dict keys are the same).

First one iteration of each from the same RNG state: the loss terms must agree (printed with
their largest difference). Then time (median of ``--repeat``, the two interleaved, after a
warm-up) and peak memory (CPU profiler allocation events above the start of the step,
weights and inputs excluded, as bench/train_step.py). Ratios are ours / original.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from losses import peak_bytes  # noqa: E402
from mirror import extract, git_dir  # noqa: E402

MIRROR = "/work/.mirror/YudeWang+Learning-Pseudo-Label/repo"
C_VOC = 21


def load_original(mirror: str, tmp: str) -> types.SimpleNamespace:
    """The original ``lib`` package tree, extracted from the mirror's HEAD into ``tmp``."""
    commit = extract(git_dir(mirror, "YudeWang/Learning-Pseudo-Label"), tmp)
    sys.path.insert(0, os.path.join(tmp, "lib"))
    import net  # noqa: F401  (registers the network and the backbones)
    from net.generateNet import generate_net
    from net.loss import ClassLogSoftMax, SegLoss
    return types.SimpleNamespace(generate_net=generate_net, cls_log_softmax=ClassLogSoftMax,
                                 seg_loss=SegLoss, commit=commit)


def original_net(orig, backbone: str) -> torch.nn.Module:
    cfg = types.SimpleNamespace(
        MODEL_NAME="deeplabv3plus", MODEL_BACKBONE=backbone, MODEL_BACKBONE_PRETRAIN=False,
        MODEL_ASPP_OUTDIM=256, MODEL_SHORTCUT_DIM=48, MODEL_ASPP_HASGLOBAL=True,
        MODEL_NUM_CLASSES=C_VOC, MODEL_FREEZEBN=False, TRAIN_BN_MOM=0.1)
    return orig.generate_net(cfg, dilated=True, multi_grid=False, deep_base=True)


def sgd(net, lr=0.001, mults=(1.0, 1.0, 10.0)) -> torch.optim.SGD:
    """The original's three groups (backbone, others, cls_conv), weight decay on all."""
    groups = {"backbone": [], "others": [], "cls": []}
    for name, p in net.named_parameters():
        key = "backbone" if name.startswith("backbone.") else \
            "cls" if name.startswith("cls_conv.") else "others"
        groups[key].append(p)
    return torch.optim.SGD([{"params": groups[k], "lr": lr * m}
                            for k, m in zip(("backbone", "others", "cls"), mults)],
                           lr=lr, momentum=0.9, weight_decay=4e-5)


def make_batch(half: int, crop: int, seed: int = 0):
    """``half`` strong + ``half`` weak images, labels, image-level labels, labelled flags
    (the first weak image is a labelled one, so the GT replacement runs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * half, 3, crop, crop, generator=g)
    classes = torch.randint(1, C_VOC, (2 * half, 2), generator=g)
    label = torch.zeros(2 * half, crop, crop, dtype=torch.long)
    y = torch.zeros(2 * half, C_VOC)
    y[:, 0] = 1
    for i in range(2 * half):
        a, b = classes[i].tolist()
        label[i, : crop // 2, : crop // 2] = a
        label[i, crop // 2:, crop // 3:] = b
        label[i, :2] = 255
        y[i, a] = y[i, b] = 1
    labelled = torch.zeros(2 * half, dtype=torch.bool)
    labelled[half] = True
    weak_label = label[half:].clone()
    weak_label[~labelled[half:]] = 255          # ours never sees unlabelled ground truth
    strong = {"data": x[:half], "label": label[:half], "category": y[:half],
              "is_labelled": torch.ones(half, dtype=torch.bool)}
    weak = {"data": x[half:], "label": weak_label, "category": y[half:],
            "is_labelled": labelled[half:]}
    return strong, weak, label, labelled


class OriginalStep:
    """One iteration in the order of the original train.py (fp32; its tracker tensors)."""

    def __init__(self, orig, H, P, half):
        self.o, self.H, self.P, self.b = orig, H, P, half
        self.oH, self.oP = sgd(H), sgd(P)
        self.t = torch.ones(C_VOC)
        self.p = torch.zeros(C_VOC)
        self.tp = torch.zeros(C_VOC)

    def __call__(self, strong, weak, label, labelled):
        o, b = self.o, self.b
        self.oH.zero_grad()
        self.oP.zero_grad()
        image = torch.cat([strong["data"], weak["data"]])
        category = torch.cat([strong["category"], weak["category"]])[:, :, None, None]
        mask = labelled.long().view(-1, 1, 1)
        zH, zP = self.H(image), self.P(image)
        pooled = F.adaptive_max_pool2d(zH, (1, 1))
        sH, lH = o.cls_log_softmax(zH, category)
        plH = torch.argmax(sH, dim=1).detach()
        plH[b:] = plH[b:] * (1 - mask[b:]) + label[b:] * mask[b:]
        sP, lP = o.cls_log_softmax(zP, category)
        plP = torch.argmax(sP, dim=1).detach()
        plP[b:] = plP[b:] * (1 - mask[b:]) + label[b:] * mask[b:]
        cls = F.multilabel_soft_margin_loss(pooled[:, 1:], category[:, 1:])
        sup = o.seg_loss(lH[:b], label[:b])
        pse = o.seg_loss(lP[b:], plH[b:])
        gt, pred = label[:b], plP[:b]
        ct, nt = torch.unique(gt, sorted=True, return_counts=True)
        if ct[-1] == 255:
            ct, nt = ct[:-1], nt[:-1]
        cp, n_p = torch.unique(pred, sorted=True, return_counts=True)
        hit = gt.clone()
        hit[gt != pred] = 255
        ctp, ntp = torch.unique(hit, sorted=True, return_counts=True)
        if ctp[-1] == 255:
            ctp, ntp = ctp[:-1], ntp[:-1]
        for v in (self.t, self.p, self.tp):
            v *= 0.99
        self.t[ct] += nt
        self.p[cp] += n_p
        self.tp[ctp] += ntp
        iou = self.tp / (self.t + self.p - self.tp)
        pct = o.seg_loss(lH[b:], plP[b:], reduction="none")
        w = category[b:] * iou.repeat(len(image) - b, 1)[:, :, None, None]
        w[w == 0] = 1
        w = torch.min(w, dim=1)[0] ** 8
        pct = torch.mean(pct * w)
        loss = sup + pse + cls + pct
        loss.backward()
        self.oH.step()
        self.oP.step()
        return {"loss_sup": sup.item(), "loss_pseudo": pse.item(), "loss_cls": cls.item(),
                "loss_pct": pct.item(), "loss": loss.item()}


class OurStep:
    """``LPL.train_step`` and both optimiser steps (what the engine does around it on CPU)."""

    def __init__(self, H, P, backbone, half):
        from furnace.config import load_config
        from furnace.methods import MethodContext
        from furnace.methods.lpl import LPL
        C = load_config(os.path.join(ROOT, "exp_voc"),
                        [f"backbone={backbone}", "pretrained_model=none", "amp=off",
                         f"batch_size={half}", "method=lpl"], env={},
                        preset=["head_channels=256", "backbone_width=64",
                                "weight_decay=4e-05", "lr=0.001"])
        self.m = LPL(C, MethodContext(batch_per_process=half))
        self.m.hybrid.load_state_dict(H.state_dict())
        self.m.pseudo.load_state_dict(P.state_dict())
        self.m.train_mode()

    def __call__(self, strong, weak, label, labelled):
        for opt in self.m.optimizers.values():
            opt.zero_grad(set_to_none=True)
        _, terms, _ = self.m.train_step([strong, weak], iteration=0, epoch=0,
                                        backward=torch.Tensor.backward)
        for opt in self.m.optimizers.values():
            opt.step()
        return {k: float(v) for k, v in terms.items() if k != "pct_weight"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mirror", default=MIRROR)
    ap.add_argument("--backbone", default="resnet50", choices=["resnet50", "resnet101"])
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--half", type=int, default=2, help="images per half (reference: 5)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        orig = load_original(args.mirror, tmp)
        torch.manual_seed(1)
        H, P = original_net(orig, args.backbone), original_net(orig, args.backbone)
        H.train(), P.train()
        ours = OurStep(H, P, args.backbone, args.half)
        theirs = OriginalStep(orig, H, P, args.half)
        batch = make_batch(args.half, args.crop)
        torch.manual_seed(7)
        a = ours(*batch)
        torch.manual_seed(7)
        b = theirs(*batch)
        print(f"LPL stage-1 iteration, {args.backbone} OS8, {args.half}+{args.half} images "
              f"{args.crop}x{args.crop}, C={C_VOC}, fp32, CPU, original "
              f"YudeWang/Learning-Pseudo-Label@{orig.commit[:7]}, torch {torch.__version__}, "
              f"threads {torch.get_num_threads()}, median of {args.repeat}")
        print("first step from the same weights and RNG state: " + " ".join(
            f"{k}={a[k]:.6f}/{b[k]:.6f}" for k in b) +
            f" (ours/original; largest |difference| {max(abs(a[k] - b[k]) for k in b):.2e})")
        runs = {"ours": lambda: ours(*batch), "original": lambda: theirs(*batch)}
        times = {k: [] for k in runs}
        for _ in range(args.repeat):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        leaves = [p for net in (H, P, ours.m.hybrid, ours.m.pseudo) for p in net.parameters()]
        mem = {k: peak_bytes(fn, leaves) for k, fn in runs.items()}
        t = {k: statistics.median(v) for k, v in times.items()}
        print(f"{'variant':10} {'s/iter':>8} {'peak MiB':>9}")
        for k in runs:
            print(f"{k:10} {t[k]:8.3f} {mem[k] / 2 ** 20:9.1f}")
        print(f"ours/original: time {t['ours'] / t['original']:.2f}x, peak memory "
              f"{mem['ours'] / mem['original']:.2f}x")


if __name__ == "__main__":
    main()
