"""The semi-supervised table on the demo data: baselines and ablations at one budget, over seeds.

    python bench/demo_table.py [--seeds 0 1 2] [--ratio 80] [--methods sup cpcl dueb ...]
                               [--set key=value ...] [--out img/demo_table_r80]

Trains, on DATA/demo at 1/ratio labels (default: the exp_demo config's) with the exp_demo
settings (plus --set), every method of --methods for every seed, evaluates each on the val
list and writes <out>.md (per-seed values
and mean ± std over seeds of mIoU, pixel accuracy and train time) and <out>.png (mIoU bars with
the std as error bars). With the rows `sup` and `full` present, each method also gets its share
of the gap recovered, (method - sup) / (full - sup) per seed (0 = supervised on the labelled
subset, 100 % = supervised on every label), its mean ± std, and in how many seeds it is ahead
of `sup`. Rows with more seeds than others: run the script once per seed list into the same
--out, then tabulate them together with --cached-only --seeds <all of them>. Methods:

    sup      supervised only, on the labelled subset
    cpcl     CPCL: both DUEB loss switches off
    trainal  aleatoric terms only
    traine   energy terms only
    dueb     full DUEB (train.py)
    u2pl     U2PL (trainu2pl.py: mean teacher, reliable pseudo labels, contrastive loss)
    u2plsup  U2PL's SupOnly baseline (trainu2pl_suponly.py: its network, labelled data only)
    eln      ELN (traineln.py: mean teacher, pseudo labels filtered by an error-localisation
             network, contrastive loss; three stages)
    lpl      LPL's retrained network (lplpipeline.py: stage 1 with the image-level labels of
             every image, export, retrain; semi-and-weakly supervised, the same pixel labels)
    lplk0    the same with lpl.augtime=0 (no RandAugment-like ops: crop only)
    full     supervised only on all training labels (the upper bound)

Each run is the code path of the experiment scripts (furnace.engine.trainer.train, then
furnace.eval.cli.run). Finished runs are kept in <out>.runs.jsonl and skipped when the table is
rerun with the same settings, so an interrupted table resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from furnace.config import load_config  # noqa: E402
from furnace.methods.presets import script_overrides  # noqa: E402
from furnace.engine.dist import DistInfo, parse_device  # noqa: E402
from furnace.engine.trainer import train  # noqa: E402
from furnace.eval.cli import run as evaluate  # noqa: E402
from furnace.methods import get_method  # noqa: E402

# name -> (label, registered method, its preset, extra keys)
METHODS = {
    "sup": ("supervised only", "supervised", None, []),
    "cpcl": ("CPCL", "dueb", "cpcl", []),
    "trainal": ("trainal (aleatoric)", "dueb", "aleatoric", []),
    "traine": ("traine (energy)", "dueb", "energy", []),
    "dueb": ("DUEB (train.py)", "dueb", "full", []),
    "u2pl": ("U2PL (trainu2pl.py)", "u2pl", "demo", []),
    "u2plsup": ("U2PL SupOnly", "u2pl_suponly", "demo", []),
    "eln": ("ELN (traineln.py)", "eln", "demo", []),
    # the pipeline, not one script: stage 1, export, retrain; the retrained network's mIoU
    "lpl": ("LPL retrained (+ image labels)", "lpl", "demo", []),
    # the demo's classes are hues: LPL's colour ops (invert, solarize, posterize, ...) erase
    # them; K = 0 keeps the crop only (strong half of stage 1 and the retrain)
    "lplk0": ("LPL retrained, augtime 0", "lpl", "demo", ["lpl.augtime=0"]),
    # every training image labelled: the full list as the labelled source
    "full": ("supervised, all labels", "supervised", None,
             ["train_source=train_aug.txt", "num_train_imgs=1000"]),
}
COLOURS = {"sup": "#999", "cpcl": "#6a9", "trainal": "#59c", "traine": "#c95", "dueb": "#c55",
           "u2pl": "#95c", "u2plsup": "#bbb", "eln": "#5a8", "lpl": "#a83", "lplk0": "#d96",
           "full": "#555"}


def run_one(method: str, seed: int, ratio: int, overrides, device, tmp: Path) -> dict:
    """Train and evaluate one method/seed; returns its row."""
    _, name, preset, extra = METHODS[method]
    if name == "lpl":
        return run_lpl(method, seed, ratio, [*extra, *overrides], list(overrides), device, tmp)
    C = load_config(ROOT / "exp_demo",
                    [f"labeled_ratio={ratio}", f"seed={seed}", f"log_dir={tmp / method}_{seed}",
                     "snapshot_keep=1", "tb_images_every=0", "eval_every=0", *extra, *overrides],
                    env={}, preset=script_overrides(name, preset))
    t0 = time.time()
    train(C, DistInfo(device=device))
    wall = time.time() - t0
    res = evaluate(C, "last", [str(device)], model_factory=get_method(name).build_eval_model)[0]
    return {"method": method, "seed": seed, "ratio": ratio, "overrides": list(overrides),
            "miou": 100 * res["miou"], "pixel_acc": 100 * res["pixel_acc"], "train_s": wall,
            "iou": [round(100 * v, 2) for v in res["iou"]],
            "device": str(device)}


def run_lpl(method: str, seed: int, ratio: int, keys, overrides, device, tmp: Path) -> dict:
    """LPL's pipeline on the demo (stage 1, its test, export, retrain, retest) with ``keys``
    in ``tmp/<method>_<seed>``, resumed there if a run stopped; the row is the retrained
    network."""
    from furnace.pipelines.lpl import run_subset
    keys = [f"labeled_ratio={ratio}", f"seed={seed}", "snapshot_keep=1", "tb_images_every=0",
            "eval_every=0", *keys]
    t0 = time.time()
    _, done = run_subset(str(ROOT / "exp_demo"), "demo", None, keys, DistInfo(device=device),
                         eval_devices=[str(device)], out=str(tmp / f"{method}_{seed}"))
    r = done["retest"]
    return {"method": method, "seed": seed, "ratio": ratio, "overrides": list(overrides),
            "miou": 100 * r["miou"], "pixel_acc": 100 * r["pixel_acc"],
            "train_s": time.time() - t0, "iou": [round(100 * v, 2) for v in r["iou"]],
            "stage1_miou": 100 * done["test1"]["miou"], "device": str(device)}


def mean_std(values) -> str:
    m = statistics.mean(values)
    return f"{m:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{m:.2f}"


def gap_shares(rows, method, seeds) -> dict:
    """{seed: share of the gap recovered} for the seeds that have the method, the supervised
    subset ('sup') and the supervised all-labels ('full') rows:
    (method - sup) / (full - sup), so 0 = supervised subset and 1 = every label."""
    by = {(r["method"], r["seed"]): r["miou"] for r in rows}
    out = {}
    for s in seeds:
        if all((m, s) in by for m in (method, "sup", "full")) and by["full", s] != by["sup", s]:
            out[s] = (by[method, s] - by["sup", s]) / (by["full", s] - by["sup", s])
    return out


def table(rows, methods, seeds, header: str) -> str:
    share_cols = any(gap_shares(rows, m, seeds) for m in methods)
    lines = ["| method | " + " | ".join(f"mIoU seed {s}" for s in seeds)
             + " | mIoU (%) mean ± std"
             + (" | " + " | ".join(f"gap share seed {s}" for s in seeds)
                + " | gap share mean ± std | ahead of sup. subset" if share_cols else "")
             + " | pixel acc. (%) | train time (s) |",
             "|---|" + "---:|" * (len(seeds) + 3 + ((len(seeds) + 2) if share_cols else 0))]
    by = {(r["method"], r["seed"]): r["miou"] for r in rows}
    for m in methods:
        r = {row["seed"]: row for row in rows if row["method"] == m}
        if not r:
            continue
        got = [r[s] for s in seeds if s in r]
        line = (f"| {METHODS[m][0]} | "
                + " | ".join(f"{r[s]['miou']:.2f}" if s in r else "–" for s in seeds)
                + f" | {mean_std([x['miou'] for x in got])}")
        if share_cols and m in ("sup", "full"):
            line += " | –" * (len(seeds) + 2)  # 0 and 100 % by definition
        elif share_cols:
            sh = gap_shares(rows, m, seeds)
            pct = [100 * v for v in sh.values()]
            both = [s for s in seeds if (m, s) in by and ("sup", s) in by]
            ahead = sum(by[m, s] > by["sup", s] for s in both)
            line += (" | " + " | ".join(f"{100 * sh[s]:.0f} %" if s in sh else "–"
                                        for s in seeds)
                     + (f" | {statistics.mean(pct):.0f}"
                        + (f" ± {statistics.stdev(pct):.0f}" if len(pct) > 1 else "") + " %"
                        if sh else " | –")
                     + (f" | {ahead}/{len(both)} seeds" if both else " | –"))
        line += (f" | {mean_std([x['pixel_acc'] for x in got])}"
                 + f" | {statistics.mean(x['train_s'] for x in got):.0f} |")
        lines.append(line)
    return header + "\n".join(lines) + "\n"


def plot(rows, methods, seeds, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [m for m in methods if any(r["method"] == m for r in rows)]
    vals = [[r["miou"] for r in rows if r["method"] == m] for m in shown]
    means = [statistics.mean(v) for v in vals]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(shown) + 1.2))
    y = range(len(shown))
    ax.barh(y, means, xerr=stds, capsize=3, color=[COLOURS[m] for m in shown])
    for i, v in enumerate(vals):  # each seed as a dot
        ax.plot(v, [i] * len(v), "k.", ms=3)
    ax.set_yticks(list(y), [METHODS[m][0] for m in shown])
    ax.invert_yaxis()
    ax.set_xlabel("mIoU (%) on demo val, mean ± std over seeds")
    ax.set_title(title, fontsize=9)
    for i, (name, m, s) in enumerate(zip(shown, means, stds)):
        sh = gap_shares(rows, name, seeds)
        share = (f"  (gap {100 * statistics.mean(sh.values()):.0f} %)"
                 if sh and name not in ("sup", "full") else "")
        ax.text(m + s + 0.5, i, f"{m:.1f}{share}", va="center", fontsize=8)
    ax.set_xlim(0, max(m + s for m, s in zip(means, stds)) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratio", type=int, default=None,
                    help="labelled ratio 1/N (default: the exp_demo config's)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--device", default="")
    ap.add_argument("--out", default=None, help="default: img/demo_table_r<ratio>")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[])
    ap.add_argument("--work", default=None,
                    help="folder of the runs (default: a temporary one, deleted at the end)")
    ap.add_argument("--cached-only", action="store_true",
                    help="tabulate the runs in the cache only (missing ones show as –)")
    args = ap.parse_args(argv)
    if args.ratio is None:
        args.ratio = load_config(ROOT / "exp_demo", env={}).labeled_ratio
    out = Path(args.out or ROOT / "img" / f"demo_table_r{args.ratio}")
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = out.with_suffix(".runs.jsonl")
    device = parse_device(args.device)
    done = []
    if cache.exists():
        done = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    key = lambda r: (r["method"], r["seed"], r["ratio"], tuple(r["overrides"]))  # noqa: E731
    have = {key(r): r for r in done}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.work or tmp
        for method in args.methods:
            for seed in args.seeds:
                k = (method, seed, args.ratio, tuple(args.overrides))
                if k not in have and args.cached_only:
                    continue
                if k not in have:
                    have[k] = run_one(method, seed, args.ratio, args.overrides, device,
                                      Path(tmp))
                    with cache.open("a") as f:
                        f.write(json.dumps(have[k]) + "\n")
                r = have[k]
                rows.append(r)
                print(f"{METHODS[method][0]} seed {seed}: mIoU {r['miou']:.2f} pixel acc "
                      f"{r['pixel_acc']:.2f} train {r['train_s']:.0f}s", flush=True)
    C = load_config(ROOT / "exp_demo", [f"labeled_ratio={args.ratio}", *args.overrides], env={})
    title = (f"demo, 1/{args.ratio} labels ({C.num_train_imgs} images), {C.backbone} from "
             f"scratch, {C.nepochs} x {C.niters_per_epoch} its, seeds {args.seeds}")
    command = (f"python bench/demo_table.py --ratio {args.ratio} --seeds "
               f"{' '.join(map(str, args.seeds))}"
               + (f" --methods {' '.join(args.methods)}" if args.methods != list(METHODS) else "")
               + (f" --set {' '.join(args.overrides)}" if args.overrides else ""))
    header = (f"Demo data, 1/{args.ratio} labels ({C.num_train_imgs} labelled of "
              f"{C.num_train_imgs + C.num_unsup_imgs} images), {C.backbone} from scratch, "
              f"backbone_width {C.backbone_width}, head_channels {C.head_channels}, "
              f"{C.nepochs} x {C.niters_per_epoch} iterations "
              f"at batch {C.batch_size}, crop {C.image_height}, lr {C.lr}, aleatoric terms from "
              f"iteration {C.dueb.aleatoric.start_iter}, device {device}. "
              f"Command: `{command}`.\n\n")
    text = table(rows, args.methods, args.seeds, header)
    print(text)
    out.with_suffix(".md").write_text(text)
    if rows:
        plot(rows, args.methods, args.seeds, out.with_suffix(".png"), title)
    print(f"wrote {out.with_suffix('.md')}" + (f" and {out.with_suffix('.png')}" if rows else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
