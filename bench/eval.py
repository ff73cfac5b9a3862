"""Benchmark: sliding-window evaluation of one image, ours against the reference's way.

    python bench/eval.py [--device cpu] [--reps 3] [--backbone resnet50]

Variants (same random-init dual network in eval mode, one 512x1024 image, crop 512, so 3
windows):
  (a) ours, batched: only the evaluated branch, the windows of the image in one forward,
      channels-last layout (as eval.py runs);
  (a') the same in the default (contiguous) layout;
  (b) ours, per window: eval_batch_windows=1, channels-last;
  (c) the reference: both branches computed for every window (its eval-mode Network runs
      branch 2 and discards it, QUIRK 9), one window per forward.
Prints per-variant times (best and median of the repetitions, interleaved so that machine
load affects all alike), the ratios, and whether the predictions are identical.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from furnace.eval.evaluator import SegEvaluator, sliding_windows  # noqa: E402
from furnace.models import build_network  # noqa: E402


class ReferenceEvalNetwork(torch.nn.Module):
    """Eval forward as the reference: run both branches, return branch 1's logits."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        logits1 = self.net.branch1(x)[1]
        self.net.branch2(x)  # computed and thrown away, as in the reference
        return logits1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    torch.manual_seed(0)
    net = build_network(args.classes, args.backbone, 16, None).eval().to(dev)
    img = np.random.RandomState(0).randint(0, 256, (args.height, args.width, 3)).astype(np.uint8)
    grid = sliding_windows(args.height, args.width, args.crop)
    net_cl = copy.deepcopy(net)        # converted to channels-last in place by the evaluator
    common = dict(crop_size=args.crop, device=dev, amp="off")
    nwin = len(grid.windows)
    variants = {
        "(a) ours, batched": SegEvaluator(net_cl, args.classes, batch_windows=nwin,
                                          channels_last=True, **common),
        "(a') batched, NCHW": SegEvaluator(net, args.classes, batch_windows=nwin, **common),
        "(b) ours, per window": SegEvaluator(net_cl, args.classes, batch_windows=1,
                                             channels_last=True, **common),
        "(c) reference way": SegEvaluator(ReferenceEvalNetwork(net), args.classes,
                                          batch_windows=1, **common),
    }

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    print(f"device {dev}, threads {torch.get_num_threads()}, {args.backbone} dual network "
          f"(random init, eval, float32), image {args.height}x{args.width}, crop {args.crop}, "
          f"{len(grid.windows)} windows, {args.reps} reps", flush=True)
    with torch.inference_mode():           # warm-up: one small batch through each layout
        for ev in variants.values():
            ev._forward(torch.zeros(1, 3, 64, 64, device=dev))
    times = {name: [] for name in variants}
    preds, peak = {}, {}
    for _ in range(args.reps):
        for name, ev in variants.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            sync()
            t = time.perf_counter()
            preds[name] = ev.predict(img).pred.cpu()
            sync()
            times[name].append(time.perf_counter() - t)
            if dev.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(dev) / 2 ** 20

    ref = "(c) reference way"
    best_ref = min(times[ref])
    print(f"{'variant':<24}{'best s':>9}{'median s':>10}{'speed-up vs (c)':>17}"
          + (f"{'peak MiB':>10}" if peak else ""))
    for name, ts in times.items():
        line = (f"{name:<24}{min(ts):>9.3f}{statistics.median(ts):>10.3f}"
                f"{best_ref / min(ts):>16.2f}x")
        if peak:
            line += f"{peak[name]:>10.0f}"
        print(line)
    a, b = "(a) ours, batched", "(b) ours, per window"
    print(f"batched vs per-window: {min(times[b]) / min(times[a]):.2f}x")
    for name in (a, "(a') batched, NCHW", b):
        same = torch.equal(preds[name], preds[ref])
        diff = int((preds[name] != preds[ref]).sum())
        print(f"predictions {name} == (c): {same} ({diff} differing pixels)")


if __name__ == "__main__":
    main()
