"""Benchmark: one ELN stage-3 training iteration, ours against the original code
(kinux98/SSL_ELN, its ``TrainManager.train_both``), on CPU, at equal settings, in one process.

    python bench/eln_reference.py [--mirror /work/.mirror/kinux98+SSL_ELN] [--backbone 50]
                                  [--size 256] [--batch 2] [--repeat 3] [--threads 0]

The original code is read at run time from a git mirror of kinux98/SSL_ELN (``--mirror``: a
bare git directory, or a folder holding one as ``repo/``): its Python files are extracted
with ``git show`` into a temporary folder and imported from there; nothing of it is copied
into this repository. Without the mirror the script stops with one line saying how to get it
(``git clone --mirror https://github.com/kinux98/SSL_ELN <path>``).

What is stubbed on the original side, and why: ``wandb`` (an empty module: logging only);
``torch.utils.model_zoo.load_url`` returns an empty state dict (the ImageNet files would be
downloaded: random weights instead, never a download); ``Tensor.cuda`` and ``Module.cuda``
return their object (CPU run); ``torch.cuda.amp.autocast``/``GradScaler`` are left as they are:
without CUDA they disable themselves, so the original runs in fp32 like ours. Its ``main()``
builds the networks, the six AdamW groups and the scaler unchanged (its data loaders are
replaced by a fixed batch and its training loop by capturing the trainer).

Equal settings: the same backbone (ResNet-50 or -101, the original's choices), crop, batch
(``--batch`` labelled + ``--batch`` unlabelled, one reference GPU), 21 classes, fp32, stage 3
(student on the weak and strong views, teacher and ELN on the weak view, supervised CE, the
auxiliary decoders' gated CE and the ELN's three BCE terms, pseudo-label CE on both views,
pixel contrastive loss on 8 windows of 32 x 32 per view, backward, AdamW step, EMA update).
Ours gets the original's initial weights (copied tensor by tensor in module order, shapes
checked), so both sides see the same predictions on the same images.

The epoch-start copy (teacher <- student at the first stage-3 epoch) is done once before the
timings on both sides; the original's ``train_both`` repeats it on every call, so on its
timed calls that copy is skipped (the four networks' ``load_state_dict`` made a no-op): it is
per epoch, not per iteration.

Time: median wall time of ``--repeat`` iterations per side, the two sides alternating, after
one warm-up iteration each. Memory, per side, in a separate run after the timings: the peak
bytes allocated above the start of the iteration (torch profiler's allocation events, as in
bench/losses.py; weights, optimiser state and inputs excluded, gradients included: both
sides' ``.grad`` are dropped before). The resident set size cannot be split by side in one
process (the allocator reuses the pages one side frees for the other): the process's peak RSS
is printed once. Ratios are ours / original (below 1: ours is faster or smaller).
``--profile N`` adds each side's N most expensive ops (torch profiler: by self CPU time and
by self memory).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import resource
import statistics
import sys
import tempfile
import time
import types
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from losses import peak_bytes  # noqa: E402
from mirror import extract, git_dir  # noqa: E402

DEFAULT_MIRROR = "/work/.mirror/kinux98+SSL_ELN"
NUM_CLASSES = 21


# -- the original code --------------------------------------------------------------------
def install_stubs() -> None:
    """wandb, the ImageNet downloads and .cuda() (module docstring)."""
    wandb = types.ModuleType("wandb")
    wandb.log = lambda *a, **k: None
    wandb.init = lambda *a, **k: None
    wandb.run = types.SimpleNamespace(name="")
    sys.modules["wandb"] = wandb
    import torch.utils.model_zoo as model_zoo
    model_zoo.load_url = lambda *a, **k: {}
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    warnings.filterwarnings("ignore", message=".*torch.cuda.amp.*deprecated.*")
    warnings.filterwarnings("ignore", message=".*This overload of add_ is deprecated.*")


def build_original(src: str, backbone: int, batch: int, pre_epoch: int, eln_epoch: int):
    """The original's trainer as its main() builds it (networks, AdamW groups, scaler)."""
    sys.path.insert(0, src)
    for name in ("train", "dataset", "modeling", "utils"):   # its top-level names
        if name in sys.modules:
            raise SystemExit(f"eln_reference: a module '{name}' is already imported; run "
                             "this script on its own")
    import train as ref  # noqa: E402  (the original train.py)
    captured = []
    ref.init = lambda **kw: (None, None, None)
    ref.TrainManager.train = lambda self: captured.append(self)
    args = argparse.Namespace(
        exp_name="bench", dataset="voc", seed=0, pretrained_ckpt=None,
        batch_size_labeled=batch, batch_size_unlabeled=batch, sets_id=0, train_split=20,
        save_ckpt=10, backbone="resnet", start_epoch=0, num_epochs=1,
        backbone_name=backbone, pre_epoch=pre_epoch, eln_epoch=eln_epoch - pre_epoch,
        temp=0.5, lr=1e-4, weight_decay=1e-5)
    with contextlib.redirect_stdout(io.StringIO()):
        ref.main(args)
    return captured[0]


# -- ours -----------------------------------------------------------------------------------
def build_ours(backbone: int, size: int, batch: int):
    from furnace.config import load_config
    from furnace.methods import MethodContext
    from furnace.methods.eln import ELN
    from furnace.methods.presets import script_overrides
    C = load_config(os.path.join(ROOT, "exp_voc"),
                    [f"backbone=resnet{backbone}", "pretrained_model=none",
                     "eln.eln_pretrained=none", f"batch_size={batch}", f"image_height={size}",
                     f"image_width={size}", "amp=off", "reference_gpus=1",
                     f"num_classes={NUM_CLASSES}"],
                    env={}, preset=script_overrides("eln", "voc"))
    return ELN(C, MethodContext(batch_per_process=batch, niters_per_epoch=10))


def copy_in_order(dst: nn.Module, srcs) -> int:
    """dst's tensors <- the tensors of ``srcs`` (modules), in registration order, shapes
    checked (BatchNorm's num_batches_tracked left out); returns the number copied."""
    def tensors(state):
        return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    d = tensors(dst.state_dict())
    s = [kv for m in srcs for kv in tensors(m.state_dict())]
    if len(d) != len(s) or any(a.shape != b.shape for (_, a), (_, b) in zip(d, s)):
        bad = next(((ka, kb) for (ka, a), (kb, b) in zip(d, s) if a.shape != b.shape),
                   (len(d), len(s)))
        raise SystemExit(f"eln_reference: the networks do not line up ({bad})")
    with torch.no_grad():
        for (_, a), (_, b) in zip(d, s):
            a.copy_(b)
    return len(d)


# -- measurement ----------------------------------------------------------------------------
def make_batch(B: int, H: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(B, 3, H, H, generator=g)
    y_l = torch.randint(0, NUM_CLASSES, (B, H, H), generator=g)
    y_l[torch.rand(B, H, H, generator=g) < 0.05] = 255
    x_w = torch.randn(B, 3, H, H, generator=g)
    x_s = x_w + 0.2 * torch.randn(B, 3, H, H, generator=g)
    return x_l, y_l, x_w, x_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mirror", default=DEFAULT_MIRROR,
                    help="git mirror of kinux98/SSL_ELN (default: %(default)s)")
    ap.add_argument("--backbone", type=int, choices=(50, 101), default=50)
    ap.add_argument("--size", type=int, default=256, help="crop side (default 256)")
    ap.add_argument("--batch", type=int, default=2, help="labelled = unlabelled batch")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print each side's N ops of most self CPU time and memory")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gdir = git_dir(args.mirror, "kinux98/SSL_ELN")
    tmp = tempfile.TemporaryDirectory(prefix="eln-original-")
    commit = extract(gdir, tmp.name)
    install_stubs()
    pre, first3 = 1, 2           # stage 3 from epoch 2 on both sides
    torch.manual_seed(0)
    tm = build_original(tmp.name, args.backbone, args.batch, pre, first3)
    ours = build_ours(args.backbone, args.size, args.batch)
    ours.o.update(pre_epoch=pre, eln_epoch=first3)
    ours.pre_epoch, ours.eln_epoch = pre, first3
    n = copy_in_order(ours.student.encoder, [tm.enc.backbone])
    n += copy_in_order(ours.student.decoder, [tm.dec])
    n += copy_in_order(ours.eln, [tm.eln])
    for d, r in zip(ours.auxes, tm.dec_list):
        n += copy_in_order(d, [r])
    x_l, y_l, x_w, x_s = make_batch(args.batch, args.size)

    # the original: one train_both call of one iteration at the first stage-3 epoch
    ref_batch = ((x_l, y_l), (x_w, torch.zeros_like(y_l), x_s))
    loader = itertools.repeat(ref_batch)

    def original():
        tm.train_both(first3, loader, 1)

    it = [0]

    def our_step():
        m = ours
        m.train_mode()
        opt = m.optimizers["optimizer"]
        opt.zero_grad(set_to_none=m.zero_grad_set_to_none)
        _, terms, _ = m.train_step([{"data": x_l, "label": y_l}, {"data": x_w, "strong": x_s}],
                                   iteration=it[0], epoch=first3,
                                   backward=torch.Tensor.backward)
        torch.stack([v.float() for v in terms.values()]).tolist()   # the log line's values
        opt.step()
        m.after_step(iteration=it[0], epoch=first3)
        it[0] += 1

    original()                                   # warm-up; teacher <- student (epoch start)
    for net in (tm.enc, tm.dec, tm.enc2, tm.dec2):
        net.load_state_dict = lambda *a, **k: None   # the per-epoch copy: not per iteration
    ours.on_epoch_start(first3, resumed=False)   # teacher <- student
    our_step()                                   # warm-up
    runs = {"original": original, "ours": our_step}
    times = {k: [] for k in runs}
    for _ in range(args.repeat):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    leaves = [p for net in [tm.enc, tm.dec, tm.enc2, tm.dec2, tm.eln, *tm.dec_list]
              for p in net.parameters()] + [p for net in ours.modules.values()
                                            for p in net.parameters()]
    alloc = {k: peak_bytes(fn, leaves) for k, fn in runs.items()}
    if args.profile:
        for k, fn in runs.items():
            for p in leaves:
                p.grad = None
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        profile_memory=True) as p:
                fn()
            for key, what in (("self_cpu_time_total", "self CPU time"),
                              ("self_cpu_memory_usage", "self memory (allocated - freed)")):
                print(f"-- {k}: the {args.profile} ops of most {what}")
                print(p.key_averages().table(sort_by=key, row_limit=args.profile))
    med = {k: statistics.median(v) for k, v in times.items()}
    mib = 2 ** 20
    print(f"ELN stage-3 iteration on CPU: ResNet-{args.backbone} student + teacher, ELN "
          f"ResNet-34, 2 aux decoders, crop {args.size}, batch {args.batch} + {args.batch}, "
          f"{NUM_CLASSES} classes, fp32, random weights (ours = the original's, {n} tensors "
          f"copied); original kinux98/SSL_ELN@{commit[:7]}; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; median of {args.repeat}, sides alternating")
    print(f"{'side':9} {'s/iter':>8}  {'each iteration (s)':<24} {'peak alloc MiB':>15}")
    for k in runs:
        print(f"{k:9} {med[k]:8.3f}  {' '.join(f'{t:.2f}' for t in times[k]):<24} "
              f"{alloc[k] / mib:15.1f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    print(f"ours / original: time {med['ours'] / med['original']:.2f}x, peak alloc "
          f"{alloc['ours'] / max(alloc['original'], 1):.2f}x; peak RSS of the process (both "
          f"sides and their weights): {rss:.0f} MiB")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
