"""The semi-supervised table on the demo data: baselines and ablations at one iteration budget.

    python bench/demo_table.py [--seeds 0 1] [--ratio 8] [--set key=value ...]

Trains, on DATA/demo at 1/ratio labels and with the exp_demo settings, the supervised-only
baseline (labelled data only), the CPCL baseline (both DUEB switches off), trainal (aleatoric
only), traine (energy only) and train (full DUEB); evaluates branch 1 of each on the val list;
writes img/demo_table.md and img/demo_table.png and prints the table. Each run is the same
code path as the experiment scripts (furnace.engine.trainer.train, furnace.eval.cli.run).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from furnace.config import load_config  # noqa: E402
from furnace.data.demo import ensure_demo_data  # noqa: E402
from furnace.engine.dist import DistInfo, parse_device  # noqa: E402
from furnace.engine.trainer import train  # noqa: E402
from furnace.eval.cli import run as evaluate  # noqa: E402

VARIANTS = [  # (name, aleatoric, energy, supervised_only)
    ("supervised only", False, False, True),
    ("CPCL (switches off)", False, False, False),
    ("trainal (aleatoric)", True, False, False),
    ("traine (energy)", False, True, False),
    ("train (DUEB)", True, True, False),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[12345])
    ap.add_argument("--ratio", type=int, default=8)
    ap.add_argument("--device", default="")
    ap.add_argument("--out", default=str(ROOT / "img" / "demo_table"))
    ap.add_argument("--set", dest="overrides", nargs="+", default=[])
    args = ap.parse_args(argv)
    ensure_demo_data()
    device = parse_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, al, en, sup in VARIANTS:
            for seed in args.seeds:
                log_dir = Path(tmp) / f"{name.split()[0]}_{seed}"
                preset = [f"aleatoric.enabled={al}", f"energy.enabled={en}",
                          f"supervised_only={sup}"]
                C = load_config(ROOT / "exp_demo",
                                [f"labeled_ratio={args.ratio}", f"seed={seed}",
                                 f"log_dir={log_dir}", "snapshot_keep=1", "tb_images_every=0",
                                 *args.overrides], env={}, preset=preset)
                t0 = time.time()
                train(C, DistInfo(device=device))
                wall = time.time() - t0
                res = evaluate(C, "last", [str(device)])[0]
                rows.append((name, seed, res["miou"], res["pixel_acc"], wall))
                print(f"{name} seed {seed}: mIoU {100 * res['miou']:.2f} "
                      f"pixel acc {100 * res['pixel_acc']:.2f} train {wall:.0f}s", flush=True)
    C0 = load_config(ROOT / "exp_demo", [f"labeled_ratio={args.ratio}", *args.overrides], env={})
    header = (f"Demo data, 1/{args.ratio} labels ({C0.num_train_imgs} labelled images), "
              f"{C0.backbone} from scratch, {C0.nepochs} x {C0.niters_per_epoch} iterations "
              f"at batch {C0.batch_size}, crop {C0.image_height}, aleatoric terms from "
              f"iteration {C0.aleatoric.start_iter}, seeds {args.seeds}, device {device}.\n\n")
    lines = ["| method | mIoU (%) | pixel acc. (%) | train wall time (s) |",
             "|---|---:|---:|---:|"]
    summary = []
    for name, *_ in VARIANTS:
        r = [row for row in rows if row[0] == name]
        miou = sum(x[2] for x in r) / len(r)
        acc = sum(x[3] for x in r) / len(r)
        wall = sum(x[4] for x in r) / len(r)
        spread = f" ± {100 * (max(x[2] for x in r) - min(x[2] for x in r)) / 2:.2f}" \
            if len(r) > 1 else ""
        lines.append(f"| {name} | {100 * miou:.2f}{spread} | {100 * acc:.2f} | {wall:.0f} |")
        summary.append((name, 100 * miou))
    table = header + "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names, vals = zip(*summary)
    bars = ax.barh(range(len(vals)), vals, color=["#999", "#6a9", "#59c", "#c95", "#c55"])
    ax.set_yticks(range(len(vals)), names)
    ax.invert_yaxis()
    ax.set_xlabel("mIoU (%) on demo val")
    for b, v in zip(bars, vals):
        ax.text(v + 0.3, b.get_y() + b.get_height() / 2, f"{v:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, max(vals) * 1.15)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
