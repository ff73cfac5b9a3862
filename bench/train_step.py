"""Benchmark: one DUEB training iteration, ours against a literal step in the reference order,
and one U2PL iteration on the same batch.

    python bench/train_step.py [--configs resnet18:128 resnet50:256 ...] [--repeat N]

Both sides run the same dual-branch network (two copies with identical weights), the same
batch (B=2, C=21, VOC-style CE supervision, T=10 aleatoric samples) and the same pass order
(supervised passes, four no-grad teacher passes, two student passes; fp32, no fused passes),
then backward and both SGD steps:

* ours: ``furnace.engine.trainer.DUEBStep`` (the step train.py runs), which backpropagates
  each branch's share of the loss as soon as it is complete (same passes, BatchNorm updates,
  random draws and gradients; one branch's graph alive at a time);
* literal: the reference statements written out with ``bench/literal.py``: the aleatoric loss
  keeping T graphs, a per-class loop for the energy gather, a host-side confusion matrix, and
  a ``.item()`` per loss term for logging as the reference prints every iteration.

Time: median wall time per iteration over ``--repeat`` runs (ours and literal interleaved),
after one warm-up each. Peak memory: CPU, the profiler's allocation events (as in
bench/losses.py: peak bytes allocated above the start of the step, weights and inputs
excluded); CUDA, ``torch.cuda.max_memory_allocated`` above the starting allocation.
On CUDA the speed option is measured against the faithful fp32 default in the same run: ours
with bf16 autocast (``amp=bf16``), ours with ``dueb.fuse_passes`` and bf16, and U2PL with bf16.

The ``u2pl`` row is one U2PL iteration after its warm start (``furnace.methods.u2pl``: teacher
pass on the unlabelled batch, CutMix, student and train-mode teacher passes on [labelled ;
mixed], reliable pseudo-label CE, contrastive loss with its queues, SGD step, EMA update) on
the same labelled and unlabelled images (B=2 each), its own network (U2PL decoder, output
stride 8, representation head); speed-up and memory ratio are against the literal DUEB step.

The ``eln`` row is one ELN iteration in stage 3, the most expensive (``furnace.methods.eln``:
supervised CE, the auxiliary decoders' gated CE and the ELN's BCE on three predictions, the
student on the weak and the strong view, the teacher and the ELN on the weak view, the
filtered pseudo-label CE on both views, the windowed pixel contrastive loss on both, one
AdamW step, the EMA update) on the same labelled and unlabelled images (B=2 each; the
second unlabelled batch serves as the strong view), ELN's own networks at their reference
widths (classic-stem ResNet at output stride 16, DeepLabv3+ decoder with projection head, two
auxiliary decoders, the ELN's ResNet-34), random weights, one reference group; speed-up and
memory ratio against the literal DUEB step. ``bench/eln_reference.py`` compares it with the
original code.

The ``lpl`` row is one LPL stage-1 iteration (``furnace.methods.lpl``: HybridNet and PseudoNet
on the labelled and unlabelled images together (B=2 each), the class-aware CE of both, the
classification loss, the IoU tracker and the weighted cross-training loss, one backward, both
SGD steps) with LPL's network (deep stem, output stride 8 with PyTorch-Encoding's dilations,
its DeepLabv3+ head), random weights; the labelled images' image-level labels from their
labels, the unlabelled ones' two random classes and background. ``bench/lpl_reference.py``
compares it with the original code.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from furnace.config import load_config  # noqa: E402
from furnace.methods.dueb import DUEBStep, make_optimizer  # noqa: E402
from furnace.methods import MethodContext  # noqa: E402
from furnace.methods.u2pl import U2PL  # noqa: E402
from furnace.methods.eln import ELN  # noqa: E402
from furnace.methods.lpl import LPL  # noqa: E402
from furnace.methods.presets import script_overrides  # noqa: E402
from furnace.models import build_network  # noqa: E402
from literal import LiteralBayesCE, literal_energy, literal_pseudo, literal_unsup_ce  # noqa: E402
from losses import peak_bytes  # noqa: E402

ROOT = os.path.dirname(HERE)
NUM_CLASSES = 21


def make_batch(B, H, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lab = {"data": torch.randn(B, 3, H, H, generator=g),
           "label": torch.randint(0, NUM_CLASSES, (B, H, H), generator=g)}
    lab["label"][torch.rand(B, H, H, generator=g) < 0.05] = 255
    mask = torch.zeros(B, 1, H, H)
    mask[:, :, H // 4: 3 * H // 4, H // 8: H // 2] = 1
    u0 = {"data": torch.randn(B, 3, H, H, generator=g), "mask": mask}
    u1 = {"data": torch.randn(B, 3, H, H, generator=g)}
    return [{k: v.to(device) for k, v in b.items()} for b in (lab, u0, u1)]


def literal_step(model, opts, batch, unsup_weight=1.0, T=10):
    """One iteration the way the reference train.py writes it."""
    lab, u0, u1 = batch
    for o in opts:
        o.zero_grad()
    imgs, gts = lab["data"], lab["label"]
    M = u0["mask"]
    mixed = u0["data"] * (1 - M) + u1["data"] * M
    ce = nn.CrossEntropyLoss(ignore_index=255)
    A = LiteralBayesCE(T, NUM_CLASSES)
    _, z1s, v1s = model(imgs, step=1)
    _, z2s, v2s = model(imgs, step=2)
    s1, s2 = ce(z1s, gts), ce(z2s, gts)
    e1 = literal_energy(F.softmax(z1s, 1), gts, NUM_CLASSES)
    e2 = literal_energy(F.softmax(z2s, 1), gts, NUM_CLASSES)
    a1, a2 = A(z1s, v1s, gts), A(z2s, v2s, gts)
    with torch.no_grad():
        _, z10, _ = model(u0["data"], step=1)
        _, z11, _ = model(u1["data"], step=1)
        _, z20, _ = model(u0["data"], step=2)
        _, z21, _ = model(u1["data"], step=2)
        t1 = z10 * (1 - M) + z11 * M
        t2 = z20 * (1 - M) + z21 * M
    pl = literal_pseudo(t1, t2, NUM_CLASSES)
    _, z1u, v1u = model(mixed, step=1)
    _, z2u, v2u = model(mixed, step=2)
    ui = literal_unsup_ce(z1u, pl["inter"], pl["weight_inter"])
    uu = literal_unsup_ce(z2u, pl["union"], pl["weight_union"])
    au = A(z1u, v1u, pl["inter"]) + A(z2u, v2u, pl["union"])
    eu = literal_energy(F.softmax(z1u, 1), pl["inter"], NUM_CLASSES) + \
        literal_energy(F.softmax(z2u, 1), pl["union"], NUM_CLASSES)
    loss = s1 + s2 + 0.5 * (a1 + a2) + 0.5 * (e1 + e2) + unsup_weight * (ui + uu) + au + eu
    loss.backward()
    for o in opts:
        o.step()
    # the reference prints every term each iteration
    return [t.item() for t in (loss, s1, s2, a1, a2, e1, e2, ui, uu, au, eu)]


def our_step(step, opts, batch):
    for o in opts:
        o.zero_grad(set_to_none=True)
    _, terms, _ = step(*batch, backward=torch.Tensor.backward)
    values = torch.stack([v.float() for v in terms.values()]).tolist()  # one sync
    for o in opts:
        o.step()
    return values


def u2pl_step(method, batch):
    """One engine iteration of U2PL in its semi-supervised phase (epoch 2, EMA active)."""
    lab, u0, _ = batch
    opt = method.optimizers["optimizer"]
    opt.zero_grad(set_to_none=True)
    _, terms, _ = method.train_step([lab, u0], iteration=25, epoch=2,
                                    backward=torch.Tensor.backward)
    values = torch.stack([v.float() for v in terms.values()]).tolist()
    opt.step()
    method.after_step(iteration=25, epoch=2)
    return values


def eln_config(backbone, size, B, amp="off"):
    """ELN's VOC settings (its network: classic stem, output stride 16, 256-channel decoder)
    at the bench's backbone, crop and batch, random weights, one reference group."""
    return load_config(os.path.join(ROOT, "exp_voc"),
                       [f"backbone={backbone}", "pretrained_model=none", f"batch_size={B}",
                        f"image_height={size}", f"image_width={size}", f"amp={amp}",
                        "eln.eln_pretrained=none", "reference_gpus=1",
                        f"num_classes={NUM_CLASSES}"],
                       env={}, preset=script_overrides("eln", "voc"))


def eln_method(C, device, B, amp=None):
    """An ELN ready for stage-3 iterations (the teacher copied from the student)."""
    m = ELN(C, MethodContext(device=device, batch_per_process=B, amp=amp, niters_per_epoch=10))
    m.train_mode()
    m.on_epoch_start(m.eln_epoch, resumed=False)
    return m


def eln_step(method, batch):
    """One engine iteration of ELN in stage 3 (epoch eln.eln_epoch)."""
    lab, u0, u1 = batch
    epoch = method.eln_epoch
    opt = method.optimizers["optimizer"]
    opt.zero_grad(set_to_none=method.zero_grad_set_to_none)
    _, terms, _ = method.train_step([lab, {"data": u0["data"], "strong": u1["data"]}],
                                    iteration=25, epoch=epoch, backward=torch.Tensor.backward)
    values = torch.stack([v.float() for v in terms.values()]).tolist()
    opt.step()
    method.after_step(iteration=25, epoch=epoch)
    return values


def lpl_method(backbone, size, B, device, amp=None):
    """LPL's stage 1 with its VOC settings at the bench's backbone, crop and batch."""
    C = load_config(os.path.join(ROOT, "exp_voc"),
                    [f"backbone={backbone}", "pretrained_model=none", f"batch_size={B}",
                     f"image_height={size}", f"image_width={size}",
                     f"amp={'bf16' if amp is torch.bfloat16 else 'off'}",
                     f"num_classes={NUM_CLASSES}"],
                    env={}, preset=script_overrides("lpl", "voc"))
    m = LPL(C, MethodContext(device=device, batch_per_process=B, amp=amp, niters_per_epoch=10))
    m.train_mode()
    return m


def lpl_batch(batch, seed=0):
    """The bench batch as LPL's two streams (image-level labels, labelled flags)."""
    lab, u0, _ = batch
    g = torch.Generator().manual_seed(seed)
    B, dev = len(lab["data"]), lab["data"].device
    y_s = torch.zeros(B, NUM_CLASSES, device=dev)
    for i in range(B):
        present = lab["label"][i].clone()
        present[present == 255] = 0
        y_s[i, present.unique()] = 1
    y_w = torch.zeros(B, NUM_CLASSES, device=dev)
    y_w[:, 0] = 1
    y_w[torch.arange(B).repeat_interleave(2),
        torch.randint(1, NUM_CLASSES, (2 * B,), generator=g).to(dev)] = 1
    strong = {"data": lab["data"], "label": lab["label"], "category": y_s,
              "is_labelled": torch.ones(B, dtype=torch.bool, device=dev)}
    weak = {"data": u0["data"], "label": torch.full_like(lab["label"], 255), "category": y_w,
            "is_labelled": torch.zeros(B, dtype=torch.bool, device=dev)}
    return [strong, weak]


def lpl_step(method, batches):
    """One engine iteration of LPL's stage 1 (both optimisers step)."""
    for opt in method.optimizers.values():
        opt.zero_grad(set_to_none=True)
    _, terms, _ = method.train_step(batches, iteration=25, epoch=0,
                                    backward=torch.Tensor.backward)
    values = torch.stack([v.float() for v in terms.values()]).tolist()
    for opt in method.optimizers.values():
        opt.step()
    return values


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak(fn, device, leaves):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return peak_bytes(fn, leaves)


def bench_one(backbone, size, device, repeat, B=2):
    C = load_config(os.path.join(ROOT, "exp_voc"),
                    [f"backbone={backbone}", "pretrained_model=none", f"batch_size={B}",
                     "amp=off"], env={})
    torch.manual_seed(0)
    model = build_network(NUM_CLASSES, backbone).to(device).train()
    lit_model = copy.deepcopy(model)
    ours_opts = (make_optimizer(model.branch1, C), make_optimizer(model.branch2, C))
    lit_opts = (make_optimizer(lit_model.branch1, C), make_optimizer(lit_model.branch2, C))
    batch = make_batch(B, size, device)
    step = DUEBStep(model, C, batch_per_process=B, amp=None)
    runs = {"ours": lambda: our_step(step, ours_opts, batch),
            "literal": lambda: literal_step(lit_model, lit_opts, batch)}
    u2pls = [U2PL(C, MethodContext(device=device, batch_per_process=B, niters_per_epoch=10))]
    runs["u2pl"] = lambda: u2pl_step(u2pls[0], batch)
    elns = [eln_method(eln_config(backbone, size, B), device, B)]
    runs["eln"] = lambda: eln_step(elns[0], batch)
    lpls = [lpl_method(backbone, size, B, device)]
    lbatch = lpl_batch(batch)
    runs["lpl"] = lambda: lpl_step(lpls[0], lbatch)
    if device.type == "cuda":
        # the speed option against the faithful fp32 default (amp=bf16, and with fused passes)
        bf16 = torch.bfloat16
        for name, fuse in (("ours bf16", False), ("ours fused+bf16", True)):
            Cf = copy.deepcopy(C)
            Cf.dueb.fuse_passes, Cf.amp = fuse, "bf16"
            fmodel = copy.deepcopy(model)
            fopts = (make_optimizer(fmodel.branch1, C), make_optimizer(fmodel.branch2, C))
            fstep = DUEBStep(fmodel, Cf, batch_per_process=B, amp=bf16)
            runs[name] = lambda s=fstep, o=fopts: our_step(s, o, batch)
        u2pls.append(U2PL(C, MethodContext(device=device, batch_per_process=B, amp=bf16,
                                           niters_per_epoch=10)))
        runs["u2pl bf16"] = lambda: u2pl_step(u2pls[1], batch)
        elns.append(eln_method(eln_config(backbone, size, B, "bf16"), device, B, amp=bf16))
        runs["eln bf16"] = lambda: eln_step(elns[1], batch)
        lpls.append(lpl_method(backbone, size, B, device, amp=bf16))
        runs["lpl bf16"] = lambda: lpl_step(lpls[1], lbatch)
    for u in u2pls:
        u.train_mode()
    times = {k: [] for k in runs}
    for k, fn in runs.items():
        fn()  # warm-up (allocator, oneDNN/cuDNN kernels)
    for _ in range(repeat):
        for k, fn in runs.items():
            times[k].append(timed(fn, device))
    leaves = list(model.parameters()) + list(lit_model.parameters()) + [
        p for u in u2pls for net in (u.student, u.teacher) for p in net.parameters()] + [
        p for e in elns + lpls for net in e.modules.values() for p in net.parameters()]
    mem = {k: peak(fn, device, leaves) for k, fn in runs.items()}
    return {k: (statistics.median(v), mem[k]) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+",
                    default=["resnet18:128", "resnet18:256", "resnet50:128", "resnet50:256"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or all (cpu and cuda if present)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        devices = [torch.device("cuda")] if args.device == "cuda" else \
            [torch.device("cpu"), torch.device("cuda")]
    print(f"DUEB training iteration, B=2, C={NUM_CLASSES}, T=10, fp32 faithful pass order; "
          f"median of {args.repeat}; torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}")
    print(f"{'device':6} {'backbone':9} {'size':>5} {'variant':16} {'s/iter':>8} "
          f"{'peak MiB':>9} {'speed-up':>9} {'mem ratio':>9}")
    for device in devices:
        for spec in args.configs:
            backbone, size = spec.split(":")
            res = bench_one(backbone, int(size), device, args.repeat)
            lt, lm = res["literal"]
            for k, (t, m) in res.items():
                print(f"{device.type:6} {backbone:9} {size:>5} {k:16} {t:8.3f} "
                      f"{m / 2 ** 20:9.1f} {lt / t:8.2f}x {m / lm:9.2f}", flush=True)


if __name__ == "__main__":
    main()
