"""Benchmark: our losses (furnace.losses) against the literal reference formulation
(bench/literal.py), forward + backward, on CPU, in one run.

Setting: B=2, C=19, 256x256 logits (float32), 10% ignored labels, T=10 aleatoric samples, the
city OHEM criterion (class weights, min_kept = 50000*B = 100000, i.e. mining is on).  Rows:

* aleatoric: A(z, var, y) + backward, random noise from torch's generator on both sides: the
  same distribution, not the same stream (the literal draws ``Normal(0, sigma).sample((C,))``
  over all pixels; ours draws standard normals for the non-ignored pixels only, in its own
  layout, and scales them).  On CPU the draws are a large, irreducible share of both sides:
  the time of 10 ``normal_`` fills of [C,B,H,W] (the literal's RNG work) is printed below the
  table;
* aleatoric*: the same with the 10 noise tensors drawn beforehand and injected (``noise=``),
  i.e. the loss arithmetic without the random number generation;
* energy: E(softmax(z), y) + backward (the softmax is part of the step on both sides);
* ohem: OHEM CE + backward;
* pseudo labels: REFERENCE 3.7 only -- argmax labels and max-softmax confidences of the two
  teacher logits, confusion matrix and class weights, inter/union labels and their weights
  (``pseudo_labels`` vs the literal's host-side statements), no gradient;
* pseudo + CEs: the same, then both unsup CEs of 3.8 (inter on student 1, union on student 2)
  + backward; the CEs are the same arithmetic on both sides.

Time: each step is run ``--repeat`` times, ours and literal interleaved so background load hits
both alike; the table shows the median wall time per call (ms) and literal/ours.

Peak memory: one extra run of each step under ``torch.profiler.profile(profile_memory=True)``.
The profiler records every allocation and free of the CPU allocator as a ``[memory]`` event with
a signed byte count; the running sum of those events, in time order, is the number of bytes
allocated by the step at each instant, and its maximum is the peak allocated above what existed
before the step (inputs excluded; autograd-saved tensors, temporaries and the ``.grad`` results
included).  That is the CPU analogue of ``torch.cuda.max_memory_allocated``.

Threads: one table per thread count (``--threads``, default 1 and torch's default, i.e. all
cores); both sides always use the same count.  torch's own ``normal_`` is scalar and
single-threaded on CPU (the literal's draws stay serial at any count); ours come from
``furnace.losses.noise``: torch's ``normal_`` filled in fixed, separately seeded chunks on all
threads.

Run: ``python bench/losses.py [--repeat N] [--threads N [N ...]]``.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from furnace.losses import (CITYSCAPES_CLASS_WEIGHTS, AleatoricLoss, OhemCrossEntropy,  # noqa: E402
                            energy_term, pseudo_labels, unsup_ce)
from literal import (LiteralOhem, literal_aleatoric, literal_energy,  # noqa: E402
                     literal_pseudo, literal_unsup_ce)


def make_inputs(B=2, C=19, H=256, W=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(B, C, H, W, generator=g)
    var = F.softplus(torch.randn(B, 1, H, W, generator=g))
    y = torch.randint(0, C, (B, H, W), generator=g)
    y[torch.rand(B, H, W, generator=g) < 0.1] = 255
    t1 = 3.0 * torch.randn(B, C, H, W, generator=g)
    t2 = t1 + 1.5 * torch.randn(B, C, H, W, generator=g)
    s1 = 3.0 * torch.randn(B, C, H, W, generator=g)
    s2 = 3.0 * torch.randn(B, C, H, W, generator=g)
    return dict(z=z, var=var, y=y, t1=t1, t2=t2, s1=s1, s2=s2, C=C, B=B)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def build_steps(d):
    """(leaves, {name: (ours, literal)}): closures doing forward + backward; each clears the
    ``.grad`` of its leaves first, so every call starts from the same state."""
    C, B, y = d["C"], d["B"], d["y"]
    al = AleatoricLoss(samples=10)
    ohem = OhemCrossEntropy(min_kept=50000 * B, weight=CITYSCAPES_CLASS_WEIGHTS)
    lohem = LiteralOhem(min_kept=50000 * B, use_weight=True)
    z0, v0 = leaf(d["z"]), leaf(d["var"])
    s1, s2 = leaf(d["s1"]), leaf(d["s2"])
    t1, t2 = d["t1"], d["t2"]

    def reset(*ts):
        for t in ts:
            t.grad = None

    def al_ours():
        reset(z0, v0)
        al(z0, v0, y).backward()

    def al_lit():
        reset(z0, v0)
        literal_aleatoric(z0, v0, y, T=10, num_classes=C).backward()

    noise = torch.sqrt(d["var"]).unsqueeze(0) * torch.randn((10,) + tuple(d["z"].shape))

    def aln_ours():
        reset(z0, v0)
        al(z0, v0, y, noise=noise).backward()

    def aln_lit():
        reset(z0, v0)
        literal_aleatoric(z0, v0, y, T=10, num_classes=C, noise=noise).backward()

    def en_ours():
        reset(z0)
        energy_term(torch.softmax(z0, 1), y).backward()

    def en_lit():
        reset(z0)
        literal_energy(torch.softmax(z0, 1), y, C).backward()

    def oh_ours():
        reset(z0)
        ohem(z0, y).backward()

    def oh_lit():
        reset(z0)
        lohem(z0, y).backward()

    def pll_ours():
        pseudo_labels(t1, t2)

    def pll_lit():
        literal_pseudo(t1, t2, C)

    def pl_ours():
        reset(s1, s2)
        pl = pseudo_labels(t1, t2)
        (unsup_ce(s1, pl.inter, pl.weight_inter) + unsup_ce(s2, pl.union, pl.weight_union)).backward()

    def pl_lit():
        reset(s1, s2)
        r = literal_pseudo(t1, t2, C)
        (literal_unsup_ce(s1, r["inter"], r["weight_inter"])
         + literal_unsup_ce(s2, r["union"], r["weight_union"])).backward()

    return (z0, v0, s1, s2), {"aleatoric": (al_ours, al_lit), "aleatoric*": (aln_ours, aln_lit),
                              "energy": (en_ours, en_lit), "ohem": (oh_ours, oh_lit),
                              "pseudo labels": (pll_ours, pll_lit),
                              "pseudo + CEs": (pl_ours, pl_lit)}


def peak_bytes(fn, leaves):
    """Peak bytes allocated above the starting point while ``fn`` runs (profiler events).

    The ``.grad`` of ``leaves`` is dropped before profiling starts: the profiler remembers
    the sizes of blocks allocated in an earlier profiling session, so freeing an old gradient
    inside the session would show up as a negative offset and hide real bytes.
    """
    for t in leaves:
        t.grad = None
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def run_table(threads: int, repeat: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d = make_inputs()
    leaves, steps = build_steps(d)

    buf = torch.empty(d["C"], d["B"], *d["z"].shape[2:])

    def draws():                                          # the RNG work of one aleatoric call
        for _ in range(10):
            buf.normal_()

    rows = []
    t_rng = []
    for name, (ours, lit) in steps.items():
        ours(), lit()                                     # warm-up
        t_o, t_l = [], []
        fns = [(ours, t_o), (lit, t_l)]
        if name == "aleatoric":                           # timed alongside, same load
            fns.append((draws, t_rng))
        for _ in range(repeat):
            for fn, acc in fns:
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
        m_o, m_l = peak_bytes(ours, leaves), peak_bytes(lit, leaves)
        rows.append((name, statistics.median(t_o) * 1e3, statistics.median(t_l) * 1e3,
                     m_o / 2**20, m_l / 2**20))

    print(f"losses, CPU ({threads} thread{'s' if threads > 1 else ''}), B=2 C=19 256x256 "
          f"float32, T=10, fwd+bwd, median of {repeat}; torch {torch.__version__}")
    print(f"{'loss':<13} {'ours ms':>9} {'literal ms':>11} {'speedup':>8} "
          f"{'ours MiB':>9} {'literal MiB':>12} {'mem ratio':>10}")
    for name, to, tl, mo, ml in rows:
        print(f"{name:<13} {to:>9.1f} {tl:>11.1f} {tl / to:>7.2f}x "
              f"{mo:>9.1f} {ml:>12.1f} {ml / max(mo, 1e-9):>9.2f}x")
    print(f"random draws alone (10 x normal_ of [C,B,H,W], the literal's RNG work in the "
          f"aleatoric row, on one thread whatever the setting): "
          f"{statistics.median(t_rng) * 1e3:.1f} ms\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="thread counts, one table each (default: 1 and torch's default)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    threads = args.threads or sorted({1, torch.get_num_threads()})
    for n in threads:
        run_table(n, args.repeat)


if __name__ == "__main__":
    main()
